"""The distilled detector: a model in mmdet's ``MODELS`` whose loss adds a kdhooks Distiller's terms."""
from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch
from mmdet.registry import MODELS
from mmdet.structures.bbox import get_box_tensor
from mmengine.config import ConfigDict
from mmengine.logging import MessageHub
from mmengine.model import BaseModel
from torch import nn

import kdhooks

from ._checkpoints import allow_mmengine_checkpoints
from ._targets import (
    assigns_points,
    check_box_encoding,
    head_targets,
    is_anchor_head,
    point_positives,
)
from ._teacher import (
    Renormalize,
    TeacherCall,
    build_teacher,
    config_dict,
    is_two_stage,
    load_teacher_checkpoint,
    missing_local_file,
)
from ._two_stage import (
    ROIS_TAP,
    TEACHER_RUNS,
    TeacherRoIs,
    check_rois_terms,
    refuse_teacher_roi_taps,
    roi_targets,
    rois_terms,
)

__all__ = ["DistilledDetector", "DistilledStudent", "build_teacher"]

_DENSE = {"priors", "positives"}


def _kd_config(kd: Any) -> Any:
    return kd.to_dict() if isinstance(kd, ConfigDict) else kd


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


@MODELS.register_module()
class DistilledDetector(BaseModel):
    """A student detector trained with a kdhooks Distiller against a frozen teacher.

    Student and teacher may each be a single-stage detector (RetinaNet, ATSS,
    FCOS, GFL) or a two-stage one (Faster R-CNN: RPN and RoI head taps; terms
    with ``rois: true`` on the RoI rows of the proposals the student sampled).

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
        student_model = student if isinstance(student, nn.Module) else MODELS.build(config_dict(student))
        super().__init__(data_preprocessor=data_preprocessor or student_model.data_preprocessor, init_cfg=init_cfg)
        self.student = student_model
        teacher_model = build_teacher(teacher, teacher_ckpt, load=False)
        self._pending_teacher_ckpt: str | None = None
        if teacher_ckpt is not None and missing_local_file(teacher_ckpt):
            warnings.warn(f"DistilledDetector: teacher_ckpt {str(teacher_ckpt)!r} is not here; the teacher is "
                          f"loaded from it when training starts (testing and predicting run the student alone)",
                          stacklevel=2)
            self._pending_teacher_ckpt = str(teacher_ckpt)
        elif teacher_ckpt is not None:
            load_teacher_checkpoint(teacher_model, teacher_ckpt)
        # a plain attribute: not a submodule, so not in state_dict, parameters(), DDP or init_weights()
        object.__setattr__(self, "teacher", teacher_model)
        self.teacher_renormalize = Renormalize.between(self.data_preprocessor,
                                                       getattr(teacher_model, "data_preprocessor", None))
        self._teacher_call = TeacherCall(self.teacher_renormalize)
        self._teacher_call.whole = True  # the dry pass: a tap on the teacher's RoI head records, to be refused
        self.distiller = kdhooks.Distiller(self.student, teacher_model, _kd_config(kd),
                                           example_inputs=self._example_inputs(example_size),
                                           teacher_call=self._teacher_call)
        self._teacher_call.whole, self._teacher_call.features = False, None
        try:
            self._plan_extras(teacher_model)
        except BaseException:
            self.distiller.close()
            raise

    def _plan_extras(self, teacher: nn.Module) -> None:
        """What the step's extras hold, for which head, and the checks that they can be made (ConfigErrors)."""
        self._extras_needed: dict[str, set[str]] = {}
        for term in self.distiller.terms:
            for name in getattr(term, "extras_needed", lambda: ())():
                self._extras_needed.setdefault(name, set()).add(term.name)
        refuse_teacher_roi_taps(self.distiller, teacher)
        # the student's dense head: priors and positives come from it; an RPN for a two-stage student
        self._dense_path = "rpn_head" if is_two_stage(self.student) else "bbox_head"
        head = getattr(self.student, self._dense_path, None)
        # the heads whose regression targets the terms read: {module path: 'dense' or 'rois'}
        self._reg_heads: dict[str, str] = {}
        # the terms that read the dense head's extras: priors, positives, regression targets
        dense_terms = set().union(*(self._extras_needed.get(n, set()) for n in _DENSE))
        for term in self.distiller.terms:
            if "reg_targets" not in getattr(term, "extras_needed", lambda: ())():
                continue
            path = kdhooks.Tap("student", getattr(term, "student", self._dense_path)).module_path
            if getattr(term, "rois", False):
                self._reg_heads[path] = "rois"
                continue
            if path != self._dense_path:
                raise kdhooks.ConfigError(self._terms_at({term.name}), f"regression targets are made for the "
                                          f"student's {self._dense_path} (its anchors and assigner), and the term "
                                          f"taps {path!r}", value=getattr(term, "student", None),
                                          fix=f"tap {self._dense_path}:1, or a RoI head with rois: true")
            teacher_path = kdhooks.Tap("teacher", getattr(term, "teacher", path)).module_path
            check_box_encoding({"student": head, "teacher": _submodule(teacher, teacher_path)}, path,
                               self._terms_at({term.name}))
            self._reg_heads[path] = "dense"
            dense_terms.add(term.name)
        self._head_tap = kdhooks.Tap("student", f"{self._dense_path}:0")
        if dense_terms:
            anchored = dense_terms - self._extras_needed.get("positives", set())
            if anchored and not is_anchor_head(head):
                raise kdhooks.ConfigError(self._terms_at(anchored), f"the terms need anchors (priors, regression "
                                          f"targets) from the student's {self._dense_path}, and "
                                          f"{type(head).__name__} is not an anchor head", fix="for an anchor-free "
                                          "student (FCOS) use det_feature_imitation with region: positives (the "
                                          "points its assigner makes positive) or region: all")
            if not (is_anchor_head(head) or assigns_points(head)):
                raise kdhooks.ConfigError(self._terms_at(dense_terms), f"the terms need the positives of the "
                                          f"student head's assigner, and {type(head).__name__} is neither an anchor "
                                          f"head nor a point head like FCOS",
                                          fix="use an anchor or FCOS-like head (or an RPN), or region: all")
            self.distiller.add_tap(self._head_tap, "DistilledDetector (featmap sizes)")
        self._dense_extras = bool(dense_terms)
        # terms on RoI rows: the teacher's RoI head runs on the proposals the student sampled
        terms = rois_terms(self.distiller)
        self._teacher_rois = None
        if terms:
            check_rois_terms(terms, self.student, teacher, self._terms_at)
            self._teacher_rois = TeacherRoIs(teacher, [term.teacher for term in terms])
            self.distiller.add_tap(ROIS_TAP, "DistilledDetector (the student's sampled proposals)",
                                   explicit_policy=True)
            self.distiller.add_tap(TEACHER_RUNS, "DistilledDetector (the teacher's features for its RoI head)")

    def _terms_at(self, names: set[str]) -> str:
        return ", ".join(f"model.kd.{t.location} ({t.kind})" for t in self.distiller.terms if t.name in names)

    def _example_inputs(self, size: tuple[int, int]) -> dict[str, Any]:
        from mmdet.structures import DetDataSample

        height, width = size
        meta = {"img_shape": (height, width), "ori_shape": (height, width), "pad_shape": (height, width),
                "batch_input_shape": (height, width), "scale_factor": (1.0, 1.0)}
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
        try:
            losses = self.student(inputs, data_samples, mode="loss")
            extras = self._extras(data_samples, inputs.device)
        finally:
            self._teacher_call.features = None  # a two-stage teacher's, kept for its RoI head: this step only
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
        if missing_local_file(path):
            raise kdhooks.ConfigError("model.teacher_ckpt", f"the teacher's checkpoint {path!r} does not exist; "
                                      f"training needs it", value=path,
                                      fix="pass the teacher's weights (--cfg-options model.teacher_ckpt=...)")
        load_teacher_checkpoint(self.teacher, path)
        self._pending_teacher_ckpt = None

    def _extras(self, data_samples: list, device: torch.device) -> dict[str, Any]:
        """The step's ground truth as the detection terms read it (see kdhooks.plugins.detection).

        ``reg_targets`` and ``reg_weights`` are per student head (``{module path: value}``): the dense head's per
        level, a RoI head's per sampled proposal. ``teacher_rois``: the teacher's RoI head on those proposals.
        """
        extras: dict[str, Any] = {"data_samples": data_samples}
        if not self._extras_needed:
            return extras
        extras["gt_boxes"] = [get_box_tensor(s.gt_instances.bboxes) for s in data_samples]
        extras["gt_labels"] = [s.gt_instances.labels for s in data_samples]
        if self._dense_extras:
            extras.update(self._dense_head_extras(data_samples, device))
        if self._teacher_rois is not None:
            rois_extras = self._rois_extras(data_samples)
            for name in ("reg_targets", "reg_weights"):
                if name in rois_extras:  # next to the dense head's, per head
                    extras.setdefault(name, {}).update(rois_extras.pop(name))
            extras.update(rois_extras)
        return extras

    def _dense_head_extras(self, data_samples: list, device: torch.device) -> dict[str, Any]:
        """Priors, positives and regression targets of the student's dense head (a single-stage head, an RPN)."""
        head = getattr(self.student, self._dense_path)
        sizes = [tuple(score.shape[-2:]) for score in self.distiller.captures[self._head_tap]]
        if not is_anchor_head(head):
            return {"positives": point_positives(head, sizes, data_samples, device)}
        extras: dict[str, Any] = {"priors": [get_box_tensor(p) for p in
                                             head.prior_generator.grid_priors(sizes, device=device)]}
        regresses = self._dense_path in self._reg_heads
        if "positives" in self._extras_needed or regresses:
            targets = head_targets(head, sizes, data_samples, device)
            extras["positives"] = targets["positives"]
            if regresses:
                extras["reg_targets"] = {self._dense_path: targets["reg_targets"]}
                extras["reg_weights"] = {self._dense_path: targets["reg_weights"]}
        return extras

    def _rois_extras(self, data_samples: list) -> dict[str, Any]:
        """The teacher's RoI head on the proposals the student sampled, and those proposals' regression targets."""
        features, rois = self._teacher_call.features, self.distiller.captures.get(ROIS_TAP)
        if features is None or rois is None:
            missing = "the teacher's features (a plugin gave its outputs instead of running it?)" if features is None \
                else "the student's sampled proposals (its RoI head did not extract box features)"
            raise kdhooks.LossError(self._terms_at({t.name for t in rois_terms(self.distiller)}), self.distiller.step,
                                    problem=f"the RoI terms need {missing}",
                                    fix="train a two-stage student (StandardRoIHead) with a teacher that runs")
        extras: dict[str, Any] = {"teacher_rois": self._teacher_rois(features, rois)}
        for path, kind in self._reg_heads.items():
            if kind == "rois":
                targets, weights = roi_targets(self.student.roi_head, rois, data_samples)
                extras.setdefault("reg_targets", {})[path] = targets
                extras.setdefault("reg_weights", {})[path] = weights
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


