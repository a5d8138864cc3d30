"""The distilled detector: a model in mmdet's ``MODELS`` whose loss adds a kdhooks Distiller's terms."""
from __future__ import annotations

import copy
import inspect
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from mmdet.registry import MODELS
from mmdet.structures.bbox import get_box_tensor
from mmengine.config import Config, ConfigDict
from mmengine.logging import MessageHub
from mmengine.model import BaseModel
from mmengine.runner import load_checkpoint
from torch import nn

import kdhooks

from ._checkpoints import allow_mmengine_checkpoints, mmengine_checkpoint_loader

_HEAD_TARGETS = {"reg_targets", "reg_weights", "positives"}


def _config(value: Any) -> Any:
    """mmdet reads options as attributes (``test_cfg.nms``): plain dicts become ConfigDicts."""
    return ConfigDict(value) if isinstance(value, dict) and not isinstance(value, ConfigDict) else value


def _kd_config(kd: Any) -> Any:
    return kd.to_dict() if isinstance(kd, ConfigDict) else kd


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
    model = teacher if given else MODELS.build(_config(teacher))
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


def _missing_local_file(path: str | Path) -> bool:
    """A local path (not a URL or an ``s3://``-style address) that does not exist here."""
    return "://" not in str(path) and not Path(path).expanduser().is_file()


class _Renormalize:
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
    def between(cls, student: nn.Module, teacher: nn.Module | None) -> _Renormalize | None:
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


class _TeacherCall:
    """The teacher on the student's preprocessed inputs: features and head outputs, no post-processing.

    mmdet's ``tensor`` mode calls the head's ``forward`` directly, which forward
    hooks do not see; calling the head as a module keeps its taps recording.
    Inputs are re-normalized for a teacher that preprocesses differently.
    """

    def __init__(self, renormalize: _Renormalize | None):
        self.renormalize = renormalize

    def __call__(self, teacher: nn.Module, args: tuple, kwargs: dict) -> Any:
        inputs = args[0] if args else kwargs["inputs"]
        if self.renormalize is not None:
            data_samples = args[1] if len(args) > 1 else kwargs.get("data_samples")
            inputs = self.renormalize(inputs, data_samples)
        if hasattr(teacher, "extract_feat") and isinstance(getattr(teacher, "bbox_head", None), nn.Module):
            return teacher.bbox_head(teacher.extract_feat(inputs))
        return teacher(inputs, mode="tensor")


@MODELS.register_module()
class DistilledDetector(BaseModel):
    """A student detector trained with a kdhooks Distiller against a frozen teacher.

    Args:
        student: the student detector's model config.
        teacher: the teacher's model config, the path of its config file, or
            the teacher itself (a module, used with its weights as they are).
        kd: the kdhooks config (dict, YAML path or YAML string).
        teacher_ckpt: the teacher's weights. A local file that does not exist
            is loaded when training starts (the first ``loss`` step), so a
            distillation checkpoint can be tested without it.
        example_size: (height, width) of the zeros image the Distiller's dry
            pass runs on to size connectors (any size the detector accepts).
        data_preprocessor: defaults to the student's.

    ``copy.deepcopy`` gives a ``DistilledStudent``: the student and the
    Distiller's trainable parts, without the teacher (see its docstring).
    """

    def __init__(self, student: Any, teacher: Any, kd: Any, teacher_ckpt: str | None = None,
                 example_size: tuple[int, int] = (128, 128), data_preprocessor: Any = None,
                 init_cfg: Any = None):
        # the Runner builds the model before it loads `load_from` or resumes: allow the checkpoint globals
        # again here, in case another library's safe_globals context has removed them since import
        allow_mmengine_checkpoints()
        student_model = student if isinstance(student, nn.Module) else MODELS.build(_config(student))
        super().__init__(data_preprocessor=data_preprocessor or student_model.data_preprocessor, init_cfg=init_cfg)
        self.student = student_model
        teacher_model = build_teacher(teacher, teacher_ckpt, load=False)
        self._pending_teacher_ckpt: str | None = None
        if teacher_ckpt is not None and _missing_local_file(teacher_ckpt):
            warnings.warn(f"DistilledDetector: teacher_ckpt {str(teacher_ckpt)!r} is not here; the teacher is "
                          f"loaded from it when training starts (testing and predicting run the student alone)",
                          stacklevel=2)
            self._pending_teacher_ckpt = str(teacher_ckpt)
        elif teacher_ckpt is not None:
            load_teacher_checkpoint(teacher_model, teacher_ckpt)
        # a plain attribute: not a submodule, so not in state_dict, parameters(), DDP or init_weights()
        object.__setattr__(self, "teacher", teacher_model)
        self.teacher_renormalize = _Renormalize.between(self.data_preprocessor,
                                                        getattr(teacher_model, "data_preprocessor", None))
        self.distiller = kdhooks.Distiller(self.student, teacher_model, _kd_config(kd),
                                           example_inputs=self._example_inputs(example_size),
                                           teacher_call=_TeacherCall(self.teacher_renormalize))
        try:
            self._extras_needed: dict[str, set[str]] = {}
            for term in self.distiller.terms:
                for name in getattr(term, "extras_needed", lambda: ())():
                    self._extras_needed.setdefault(name, set()).add(term.name)
            self._head_tap = kdhooks.Tap("student", "bbox_head:0")
            needs = self._extras_needed.keys()
            if needs & ({"priors"} | _HEAD_TARGETS):
                head = getattr(self.student, "bbox_head", None)
                anchored = needs & ({"priors"} | _HEAD_TARGETS) - {"positives"}
                if anchored and not _is_anchor_head(head):
                    terms = self._terms_at(set().union(*(self._extras_needed[n] for n in anchored)))
                    raise kdhooks.ConfigError(terms, f"the terms need {sorted(anchored)} from the student's head "
                                              f"(anchors and their targets), and {type(head).__name__} is not an "
                                              f"anchor head", fix="for an anchor-free student (FCOS) use "
                                              "det_feature_imitation with region: positives (the points its "
                                              "assigner makes positive) or region: all")
                if not (_is_anchor_head(head) or _assigns_points(head)):
                    raise kdhooks.ConfigError(self._terms_at(self._extras_needed["positives"]), f"the terms need the "
                                              f"positives of the student head's assigner, and {type(head).__name__} "
                                              f"is neither an anchor head nor a point head like FCOS",
                                              fix="use a single-stage student, or region: all")
                self.distiller.add_tap(self._head_tap, "DistilledDetector (featmap sizes)")
            if "reg_targets" in self._extras_needed:
                _check_box_encoding(self.student, teacher_model, self._terms_at(self._extras_needed["reg_targets"]))
        except BaseException:
            self.distiller.close()
            raise

    def _terms_at(self, names: set[str]) -> str:
        return ", ".join(f"model.kd.{t.location} ({t.kind})" for t in self.distiller.terms if t.name in names)

    def _example_inputs(self, size: tuple[int, int]) -> dict[str, Any]:
        from mmdet.structures import DetDataSample

        height, width = size
        meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                    batch_input_shape=(height, width), scale_factor=(1.0, 1.0))
        device = next(self.student.parameters()).device
        return {"inputs": torch.zeros(1, 3, height, width, device=device),
                "data_samples": [DetDataSample(metainfo=meta)], "mode": "predict"}

    def _apply(self, fn: Any, recurse: bool = True) -> DistilledDetector:
        # the teacher is not a submodule; it goes where the model goes (.to, .cuda, .half)
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo: dict) -> DistilledStudent:
        """A ``DistilledStudent``: the student and the Distiller's trainable parts, never the teacher.

        mmengine's ``EMAHook`` (and any weight average) deep-copies the model it
        averages. The Distiller holds hooks on live models and refuses to be
        copied; the copy holds what the optimizer trains, under the same names in
        the same order, so an average can be swapped into this model.
        """
        return DistilledStudent(copy.deepcopy(self.student, memo),
                                _TrainableParts(self.distiller, memo),
                                copy.deepcopy(self.data_preprocessor, memo))

    def forward(self, inputs: torch.Tensor, data_samples: list | None = None, mode: str = "tensor") -> Any:
        if mode != "loss":
            return self.student(inputs, data_samples, mode=mode)
        if self._pending_teacher_ckpt is not None:
            self._load_pending_teacher()
        step = MessageHub.get_current_instance().get_info("iter")
        if step is not None:
            self.distiller.step = step
        losses = self.student(inputs, data_samples, mode="loss")
        extras = self._extras(data_samples, inputs.device)
        task_weight = self.distiller.current_task_weight
        parts = self.distiller.loss_parts(None, **extras)
        if task_weight != 1.0:
            losses = {name: _scaled(value, task_weight) if "loss" in name else value
                      for name, value in losses.items()}
        for name, value in parts.items():
            losses[f"loss_kd_{_key(name)}"] = value
        for name, value in self.distiller.last_metrics.items():
            if "loss" not in name:  # mmengine would add it to the loss
                losses[f"kd_{_key(name)}"] = torch.as_tensor(value, dtype=torch.float32).detach()
        return losses

    def _load_pending_teacher(self) -> None:
        path = self._pending_teacher_ckpt
        if _missing_local_file(path):
            raise kdhooks.ConfigError("model.teacher_ckpt", f"the teacher's checkpoint {path!r} does not exist; "
                                      f"training needs it", value=path,
                                      fix="pass the teacher's weights (--cfg-options model.teacher_ckpt=...)")
        load_teacher_checkpoint(self.teacher, path)
        self._pending_teacher_ckpt = None

    def _extras(self, data_samples: list, device: torch.device) -> dict[str, Any]:
        """The step's ground truth as the detection terms read it (see kdhooks.plugins.detection)."""
        extras: dict[str, Any] = {"data_samples": data_samples}
        if not self._extras_needed:
            return extras
        extras["gt_boxes"] = [get_box_tensor(s.gt_instances.bboxes) for s in data_samples]
        extras["gt_labels"] = [s.gt_instances.labels for s in data_samples]
        if not self._extras_needed.keys() & ({"priors"} | _HEAD_TARGETS):
            return extras
        head = self.student.bbox_head
        sizes = [tuple(score.shape[-2:]) for score in self.distiller.captures[self._head_tap]]
        if not _is_anchor_head(head):
            extras["positives"] = _point_positives(head, sizes, data_samples, device)
            return extras
        extras["priors"] = [get_box_tensor(p) for p in head.prior_generator.grid_priors(sizes, device=device)]
        if self._extras_needed.keys() & _HEAD_TARGETS:
            extras.update(_head_targets(head, sizes, data_samples, device))
        return extras


class _TrainableParts(nn.Module):
    """Copies of a Distiller's connectors, parts and peers under the Distiller's names, without its hooks."""

    def __init__(self, distiller: kdhooks.Distiller, memo: dict | None = None):
        super().__init__()
        memo = {} if memo is None else memo
        # the Distiller's own submodules, in its order: connectors, parts, peers
        self.connectors = copy.deepcopy(distiller.connectors, memo)
        self.parts = copy.deepcopy(distiller.parts, memo)
        self.peers = copy.deepcopy(distiller.peers, memo)


class DistilledStudent(BaseModel):
    """What ``copy.deepcopy(DistilledDetector)`` gives: the student and the Distiller's trainable parts.

    Its parameters and buffers are the DistilledDetector's, by name and in order
    (``student.*``, then ``distiller.connectors.*``, ``distiller.parts.*``,
    ``distiller.peers.*``), so mmengine's ``EMAHook`` averages all that the
    optimizer trains (the student and the connectors; the teacher is never
    copied or averaged) and swaps the average into the model for validation
    and checkpoints. It has no teacher and no Distiller: every mode, ``loss``
    included, is the student's own.
    """

    def __init__(self, student: nn.Module, distiller: _TrainableParts, data_preprocessor: nn.Module):
        super().__init__(data_preprocessor=data_preprocessor)
        self.student = student
        self.distiller = distiller

    def forward(self, inputs: torch.Tensor, data_samples: list | None = None, mode: str = "tensor") -> Any:
        return self.student(inputs, data_samples, mode=mode)


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")


def _scaled(value: Any, weight: float) -> Any:
    return [weight * v for v in value] if isinstance(value, (list, tuple)) else weight * value


def _is_anchor_head(head: Any) -> bool:
    return hasattr(head, "prior_generator") and hasattr(head, "get_anchors")


def _assigns_points(head: Any) -> bool:
    """An anchor-free head that assigns points as FCOS does: ``get_targets(points, batch_gt_instances)``."""
    if not hasattr(head, "prior_generator") or not hasattr(head, "get_targets"):
        return False
    return list(inspect.signature(head.get_targets).parameters)[:2] == ["points", "batch_gt_instances"]


def _point_positives(head: nn.Module, sizes: list[tuple], data_samples: list,
                     device: torch.device) -> list[torch.Tensor]:
    """Per level (B, H·W): True at the points the head's own assigner makes positive (FCOS: inside a box, within
    the centre-sampling radius where the head samples centres, in the level's regression range)."""
    points = head.prior_generator.grid_priors(sizes, dtype=torch.float32, device=device)
    with torch.no_grad():
        labels = head.get_targets(points, [s.gt_instances for s in data_samples])[0]
    # each level's labels are the images' points one image after the other
    return [((level >= 0) & (level < head.num_classes)).reshape(len(data_samples), -1) for level in labels]


def _setting(value: Any) -> Any:
    """A box coder setting, comparable whether the config wrote a list or the default is a tuple."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else value


def _box_encoding(head: nn.Module) -> tuple:
    """What a row of the head's box outputs means: priors per location, the box coder and its settings, the priors."""
    generator = getattr(head, "prior_generator", None)
    coder = getattr(head, "bbox_coder", None)
    return (getattr(head, "num_base_priors", None), type(coder).__name__,
            {k: _setting(v) for k, v in vars(coder).items() if not k.startswith("_")} if coder is not None else None,
            [tuple(s) for s in getattr(generator, "strides", [])],
            [b.tolist() for b in getattr(generator, "base_anchors", [])])


def _check_box_encoding(student: nn.Module, teacher: nn.Module, terms: str) -> None:
    """Regression targets in the student head's encoding need box deltas, and a teacher that encodes alike.

    The targets come from the student head's assigner, encoded with its box
    coder against its anchors (``_head_targets``); the terms compare them with
    both heads' outputs row by row, so those rows must be deltas of the same
    coder against the same anchors.
    """
    heads = {"student": getattr(student, "bbox_head", None), "teacher": getattr(teacher, "bbox_head", None)}
    for role, head in heads.items():
        if head is None or not hasattr(head, "bbox_coder") or not hasattr(head, "prior_generator"):
            raise kdhooks.ConfigError(terms, f"the {role}'s head ({type(head).__name__}) is not an anchor head "
                                      f"with a box coder: there are no regression targets to compare its box "
                                      f"outputs with", fix="distill box outputs between anchor heads (RetinaNet, "
                                      "ATSS), or drop the term")
        if hasattr(head, "reg_max") or hasattr(head, "integral"):
            bins = head.reg_max + 1 if hasattr(head, "reg_max") else "several"
            raise kdhooks.ConfigError(terms, f"the {role}'s {type(head).__name__} outputs a distribution over "
                                      f"{bins} bins per box edge (4 × {bins} channels per prior), not box deltas "
                                      f"to compare with regression targets",
                                      fix="use `ld` (localization distillation) for distribution heads (GFL, LD)")
    mine, theirs = _box_encoding(heads["student"]), _box_encoding(heads["teacher"])
    what = ("priors per location", "box coder", "box coder settings", "strides", "anchor shapes")
    differences = [f"{name}: student {a}, teacher {b}" for name, a, b in zip(what, mine, theirs) if a != b]
    if differences:
        raise kdhooks.ConfigError(terms, f"the heads encode boxes differently ({'; '.join(differences)}); box "
                                  f"outputs are compared row by row with targets in the student's encoding",
                                  fix="give the teacher's and the student's bbox_head the same anchor_generator and "
                                  "bbox_coder, or drop the term")


def _head_targets(head: nn.Module, sizes: list[tuple], data_samples: list, device: torch.device) -> dict[str, Any]:
    """The student head's own assignment: per level (B, H·W·A, 4) regression targets and weights, positives.

    The targets are in the encoding of the head's box outputs. A head with
    ``reg_decoded_bbox=True`` (ATSS, any anchor head with an IoU loss) assigns
    gt boxes in pixels and decodes its outputs to compare; here the pixel
    targets of the positives are encoded with the head's box coder against
    their anchors instead, exactly as the head's targets are encoded when
    ``reg_decoded_bbox=False``, so they compare with the outputs like with like.
    """
    metas = [s.metainfo for s in data_samples]
    anchors, valid = head.get_anchors(sizes, metas, device=device)
    # per level (B, H·W·A, 4), before get_targets joins each image's list in place (ATSS-style heads do)
    level_anchors = [torch.stack([get_box_tensor(image[level]) for image in anchors]) for level in range(len(sizes))]
    with torch.no_grad():
        targets = head.get_targets(anchors, valid, [s.gt_instances for s in data_samples], metas)
    if targets[0][0].dim() == 3:
        # ATSS-style heads (GFL) return the anchors first
        targets = targets[1:]
    labels, _, reg_targets, reg_weights = targets[:4]
    positives = [(level >= 0) & (level < head.num_classes) for level in labels]
    reg_targets = list(reg_targets)
    if getattr(head, "reg_decoded_bbox", False):
        for level, (boxes, weights) in enumerate(zip(reg_targets, reg_weights)):
            chosen = weights.sum(dim=-1) > 0
            encoded = boxes.new_zeros(*boxes.shape[:-1], head.bbox_coder.encode_size)
            if chosen.any():
                encoded[chosen] = head.bbox_coder.encode(level_anchors[level][chosen], boxes[chosen])
            reg_targets[level] = encoded
    return {"reg_targets": reg_targets, "reg_weights": list(reg_weights), "positives": positives}
