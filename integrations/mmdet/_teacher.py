"""The teacher: built or given, its checkpoint, its inputs (re-normalized) and how it runs on the student's batch."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from mmdet.registry import MODELS
from mmengine.config import Config, ConfigDict
from mmengine.runner import load_checkpoint
from torch import nn

from ._checkpoints import mmengine_checkpoint_loader


def config_dict(value: Any) -> Any:
    """mmdet reads options as attributes (``test_cfg.nms``): plain dicts become ConfigDicts."""
    return ConfigDict(value) if isinstance(value, dict) and not isinstance(value, ConfigDict) else value


def build_teacher(teacher: Any, teacher_ckpt: str | None, *, load: bool = True) -> nn.Module:
    """A detector from a model config, a config file (its ``model``) or a module, with ``teacher_ckpt`` loaded.

    A module is used as it is given: without ``teacher_ckpt`` its weights are
    kept, never re-initialised. A config without ``teacher_ckpt`` gets the
    weights its ``init_cfg`` gives (with a warning). ``load=False`` builds
    without loading ``teacher_ckpt`` (``DistilledDetector`` loads it itself).
    """
    given = isinstance(teacher, nn.Module)
    if isinstance(teacher, (str, Path)):
        teacher = Config.fromfile(str(teacher)).model
    model = teacher if given else MODELS.build(config_dict(teacher))
    if teacher_ckpt is not None:
        if load:
            load_teacher_checkpoint(model, teacher_ckpt)
    elif not given and hasattr(model, "init_weights"):
        warnings.warn("DistilledDetector: no teacher_ckpt; the teacher has the weights its init_cfg gives",
                      stacklevel=3)
        model.init_weights()
    return model


def load_teacher_checkpoint(teacher: nn.Module, teacher_ckpt: str | Path) -> None:
    """``teacher_ckpt`` into ``teacher`` (strict), with mmengine's checkpoint globals allowed."""
    with mmengine_checkpoint_loader():
        load_checkpoint(teacher, str(teacher_ckpt), map_location="cpu", strict=True, logger="current")


def missing_local_file(path: str | Path) -> bool:
    """A local path (not a URL or an ``s3://``-style address) that does not exist here."""
    return "://" not in str(path) and not Path(path).expanduser().is_file()


class Renormalize:
    """The student's preprocessed images as the teacher's own ``data_preprocessor`` would have made them.

    The student's ``(img - mean_s) / std_s`` (its channel order) is mapped back
    to pixels, the channels reversed where one model converts BGR to RGB and the
    other does not, and normalized with ``mean_t``, ``std_t``. Pixels outside each
    image (the batch padding, from ``img_shape``) get the teacher's ``pad_value``,
    as its own preprocessing pads after normalizing. The batch keeps the
    student's padded size, so both models see the same grid.
    """

    def __init__(self, student: tuple, teacher: tuple):
        (self.mean_s, self.std_s, flip_s, _), (self.mean_t, self.std_t, flip_t, self.pad_t) = student, teacher
        self.flip = flip_s != flip_t

    @staticmethod
    def settings(preprocessor: nn.Module | None) -> tuple:
        """(mean, std, converts channels, pad value) of a data preprocessor; no normalization is mean 0, std 1."""
        normalizes = getattr(preprocessor, "_enable_normalize", False)
        mean = preprocessor.mean.detach().float().cpu() if normalizes else torch.zeros(1, 1, 1)
        std = preprocessor.std.detach().float().cpu() if normalizes else torch.ones(1, 1, 1)
        # mmengine keeps bgr_to_rgb / rgb_to_bgr as one flag; there is no public getter
        return mean, std, bool(getattr(preprocessor, "_channel_conversion", False)), \
            float(getattr(preprocessor, "pad_value", 0))

    @classmethod
    def between(cls, student: nn.Module, teacher: nn.Module | None) -> Renormalize | None:
        """The mapping from the student's inputs to the teacher's, or None where they preprocess alike."""
        if teacher is None or not hasattr(teacher, "_enable_normalize"):
            return None  # not an image data preprocessor: the teacher takes the student's inputs as they are
        mine, theirs = cls.settings(student), cls.settings(teacher)
        alike = all(torch.equal(*torch.broadcast_tensors(a, b)) for a, b in zip(mine[:2], theirs[:2]))
        if alike and mine[2:] == theirs[2:]:
            return None
        return cls(mine, theirs)

    def __call__(self, inputs: torch.Tensor, data_samples: list | None) -> torch.Tensor:
        x = inputs.float() * self.std_s.to(inputs.device) + self.mean_s.to(inputs.device)
        if self.flip:
            x = x.flip(1)
        x = ((x - self.mean_t.to(inputs.device)) / self.std_t.to(inputs.device)).to(inputs.dtype)
        for image, sample in enumerate(data_samples or []):
            height, width = sample.metainfo.get("img_shape", x.shape[-2:])[:2]
            x[image, :, int(height):, :] = self.pad_t
            x[image, :, :, int(width):] = self.pad_t
        return x


class TeacherCall:
    """The teacher on the student's preprocessed inputs: features and head outputs, no post-processing.

    mmdet's ``tensor`` mode calls the head's ``forward`` directly, which forward
    hooks do not see; calling the head as a module keeps its taps recording.
    Inputs are re-normalized for a teacher that preprocesses differently.

    A two-stage teacher runs its backbone, neck and RPN here; its RoI head can
    only run once the student has sampled this step's proposals, so the
    features are kept in ``features`` for it (``_two_stage.TeacherRoIs``) until
    the step's extras are made. While ``whole`` is set (the dry pass at build)
    the RoI head runs on the teacher's own proposals as in ``tensor`` mode, so
    that a tap on it records and can be refused by name.
    """

    def __init__(self, renormalize: Renormalize | None):
        self.renormalize = renormalize
        self.features: tuple | None = None
        self.whole = False

    def __call__(self, teacher: nn.Module, args: tuple, kwargs: dict) -> Any:
        inputs = args[0] if args else kwargs["inputs"]
        data_samples = args[1] if len(args) > 1 else kwargs.get("data_samples")
        if self.renormalize is not None:
            inputs = self.renormalize(inputs, data_samples)
        if is_two_stage(teacher):
            if self.whole and data_samples is not None:
                return teacher(inputs, data_samples, mode="tensor")
            self.features = teacher.extract_feat(inputs)
            return self.features, teacher.rpn_head(self.features) if teacher.with_rpn else None
        if hasattr(teacher, "extract_feat") and isinstance(getattr(teacher, "bbox_head", None), nn.Module):
            return teacher.bbox_head(teacher.extract_feat(inputs))
        return teacher(inputs, mode="tensor")


def is_two_stage(model: Any) -> bool:
    """A detector with an RPN (or given proposals) and a RoI head: mmdet's ``TwoStageDetector``s."""
    return isinstance(getattr(model, "roi_head", None), nn.Module) and hasattr(model, "extract_feat")
