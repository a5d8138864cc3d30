"""The distilled detector: a model in mmdet's ``MODELS`` whose loss adds a kdhooks Distiller's terms."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from mmdet.registry import MODELS
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


def build_teacher(teacher: Any, teacher_ckpt: str | None) -> nn.Module:
    """A detector from a model config, a config file (its ``model``) or a module, with ``teacher_ckpt`` loaded."""
    if isinstance(teacher, (str, Path)):
        teacher = Config.fromfile(str(teacher)).model
    model = teacher if isinstance(teacher, nn.Module) else MODELS.build(_config(teacher))
    if teacher_ckpt is not None:
        with mmengine_checkpoint_loader():
            load_checkpoint(model, str(teacher_ckpt), map_location="cpu", strict=True, logger="current")
    elif hasattr(model, "init_weights"):
        warnings.warn("DistilledDetector: no teacher_ckpt; the teacher has the weights its init_cfg gives",
                      stacklevel=3)
        model.init_weights()
    return model


def _call_teacher(teacher: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The teacher on the student's preprocessed inputs: features and head outputs, no post-processing.

    mmdet's ``tensor`` mode calls the head's ``forward`` directly, which forward
    hooks do not see; calling the head as a module keeps its taps recording.
    """
    inputs = args[0] if args else kwargs["inputs"]
    if hasattr(teacher, "extract_feat") and isinstance(getattr(teacher, "bbox_head", None), nn.Module):
        return teacher.bbox_head(teacher.extract_feat(inputs))
    return teacher(inputs, mode="tensor")


@MODELS.register_module()
class DistilledDetector(BaseModel):
    """A student detector trained with a kdhooks Distiller against a frozen teacher.

    Args:
        student: the student detector's model config.
        teacher: the teacher's model config, or the path of its config file.
        kd: the kdhooks config (dict, YAML path or YAML string).
        teacher_ckpt: the teacher's weights.
        example_size: (height, width) of the zeros image the Distiller's dry
            pass runs on to size connectors (any size the detector accepts).
        data_preprocessor: defaults to the student's.
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
        teacher_model = build_teacher(teacher, teacher_ckpt)
        _check_same_normalization(self.data_preprocessor, teacher_model)
        # a plain attribute: not a submodule, so not in state_dict, parameters(), DDP or init_weights()
        object.__setattr__(self, "teacher", teacher_model)
        self.distiller = kdhooks.Distiller(self.student, teacher_model, _kd_config(kd),
                                           example_inputs=self._example_inputs(example_size),
                                           teacher_call=_call_teacher)
        self._extras_needed: set[str] = set()
        for term in self.distiller.terms:
            self._extras_needed |= set(getattr(term, "extras_needed", lambda: ())())
        self._head_tap = kdhooks.Tap("student", "bbox_head:0")
        if self._extras_needed & ({"priors"} | _HEAD_TARGETS):
            head = getattr(self.student, "bbox_head", None)
            if not (hasattr(head, "prior_generator") and hasattr(head, "get_anchors")):
                raise kdhooks.ConfigError("kd.terms", f"terms need {sorted(self._extras_needed)} from the "
                                          f"student's head, which is not an anchor head",
                                          fix="use an anchor-based single-stage student, or terms without "
                                          "ground-truth regions (region: all)")
            self.distiller.add_tap(self._head_tap, "DistilledDetector (featmap sizes)")

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

    def forward(self, inputs: torch.Tensor, data_samples: list | None = None, mode: str = "tensor") -> Any:
        if mode != "loss":
            return self.student(inputs, data_samples, mode=mode)
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

    def _extras(self, data_samples: list, device: torch.device) -> dict[str, Any]:
        """The step's ground truth as the detection terms read it (see kdhooks.plugins.detection)."""
        extras: dict[str, Any] = {"data_samples": data_samples}
        if not self._extras_needed:
            return extras
        from mmdet.structures.bbox import get_box_tensor

        extras["gt_boxes"] = [get_box_tensor(s.gt_instances.bboxes) for s in data_samples]
        extras["gt_labels"] = [s.gt_instances.labels for s in data_samples]
        if not self._extras_needed & ({"priors"} | _HEAD_TARGETS):
            return extras
        head = self.student.bbox_head
        sizes = [tuple(score.shape[-2:]) for score in self.distiller.captures[self._head_tap]]
        extras["priors"] = [get_box_tensor(p) for p in head.prior_generator.grid_priors(sizes, device=device)]
        if self._extras_needed & _HEAD_TARGETS:
            extras.update(_head_targets(head, sizes, data_samples, device))
        return extras


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")


def _check_same_normalization(data_preprocessor: nn.Module, teacher: nn.Module) -> None:
    """The teacher gets the student's preprocessed inputs: its own preprocessing must be the same."""
    theirs = getattr(teacher, "data_preprocessor", None)
    if theirs is None:
        return
    for name in ("mean", "std"):
        mine, other = getattr(data_preprocessor, name, None), getattr(theirs, name, None)
        if isinstance(mine, torch.Tensor) and isinstance(other, torch.Tensor) and not torch.equal(mine, other):
            raise kdhooks.ConfigError(f"model.teacher.data_preprocessor.{name}", f"the teacher normalizes images "
                                      f"with {name} {other.flatten().tolist()}, the student with "
                                      f"{mine.flatten().tolist()}; the teacher runs on the student's inputs",
                                      value=other.flatten().tolist(), fix="train both with the same mean and std")
    if getattr(data_preprocessor, "_channel_conversion", False) != getattr(theirs, "_channel_conversion", False):
        raise kdhooks.ConfigError("model.teacher.data_preprocessor.bgr_to_rgb", "the teacher and the student "
                                  "read colour channels in a different order", fix="use the same bgr_to_rgb")


def _scaled(value: Any, weight: float) -> Any:
    return [weight * v for v in value] if isinstance(value, (list, tuple)) else weight * value


def _head_targets(head: nn.Module, sizes: list[tuple], data_samples: list, device: torch.device) -> dict[str, Any]:
    """The student head's own assignment: per level (B, H·W·A, 4) regression targets and weights, positives."""
    metas = [s.metainfo for s in data_samples]
    anchors, valid = head.get_anchors(sizes, metas, device=device)
    with torch.no_grad():
        targets = head.get_targets(anchors, valid, [s.gt_instances for s in data_samples], metas)
    if targets[0][0].dim() == 3:
        # ATSS-style heads (GFL) return the anchors first
        targets = targets[1:]
    labels, _, reg_targets, reg_weights = targets[:4]
    positives = [(level >= 0) & (level < head.num_classes) for level in labels]
    return {"reg_targets": list(reg_targets), "reg_weights": list(reg_weights), "positives": positives}
