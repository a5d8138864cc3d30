"""How the detection terms read their captures and extras: levels, rows, per-head extras, RoI rows."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import kdhooks

from ._detection_formulas import flatten_levels


def _levels(value: Any) -> list[torch.Tensor]:
    """A tapped head or neck output as a list of level maps (one tensor counts as one level)."""
    return [value] if isinstance(value, torch.Tensor) else list(value)


def _shapes(value: Any) -> list[tuple] | None:
    """Per-level shapes of a capture (one tensor is one level); None for a capture that holds no tensors."""
    if isinstance(value, tuple):
        return [value]
    if isinstance(value, list) and value and all(isinstance(s, tuple) for s in value):
        return value
    return None


def _matching_levels(term: kdhooks.Term, shapes: dict[str, Any], student: str, teacher: str, what: str, fix: str,
                     maps: bool = True) -> list[tuple] | None:
    """The student's per-level shapes once they equal the teacher's; None when the captures hold no tensors.

    Rows of the two heads are compared prior by prior: the same levels, grids,
    channels and images, or the flattened rows would pair different priors.
    ``maps``: each level must be a map (B, A·k, H, W), which the loss flattens.
    """
    student_shapes, teacher_shapes = _shapes(shapes[student]), _shapes(shapes[teacher])
    if student_shapes is None or teacher_shapes is None:
        return None
    if student_shapes != teacher_shapes:
        if all(len(s) == 2 for s in student_shapes + teacher_shapes):
            # rows, one per proposal (a RoI head's): each model's own proposals
            fix = "for a RoI head set rois: true: the teacher's RoI head then runs on the proposals the student sampled"
        raise kdhooks.ConfigError(term.location, f"student {student_shapes} and teacher {teacher_shapes} {what} "
                                  f"differ", value=[student_shapes, teacher_shapes], fix=fix)
    if maps and any(len(s) != 4 for s in student_shapes):
        raise kdhooks.ConfigError(term.location_of(student), f"{term.kind} reads per-level maps (B, A·k, H, W); "
                                  f"the {what} have shapes {student_shapes}", value=student_shapes,
                                  fix="tap the head's outputs, a list of per-level maps (e.g. bbox_head:1); for a "
                                  "RoI head's rows (N proposals, k) set rois: true")
    return student_shapes


def _class_rows(logits: list[torch.Tensor], classes: int) -> torch.Tensor:
    """Classification outputs as (N, classes) rows: per-level maps (B, A·C, H, W) or rows already."""
    if logits[0].dim() == 4:
        logits = flatten_levels(logits, classes)
    return torch.cat([m.reshape(-1, classes) for m in logits])


def _module_path(path: str) -> str:
    """The module part of a tap path (``roi_head.bbox_head:0`` → ``roi_head.bbox_head``)."""
    return kdhooks.Tap("student", path).module_path


def _of_head(value: Any, term: kdhooks.Term, name: str) -> Any:
    """An extra for the term's head: the value itself, or its entry in a per-head mapping."""
    if not isinstance(value, Mapping):
        return value
    head = _module_path(term.student)
    if head not in value:
        raise kdhooks.ConfigError(f"{term.location}.student", f"the step's {name} are given for the heads "
                                  f"{sorted(value)}, not for {head!r}, the module this term taps",
                                  value=term.student, fix=f"tap one of {sorted(value)}")
    return value[head]


def _rows(levels: list[torch.Tensor], values: int) -> torch.Tensor:
    """Per-level maps (B, A·k, H, W) or RoI rows (N, A·k) as (·, k) rows: one per prior, or per proposal and prior."""
    return torch.cat([(m.permute(0, 2, 3, 1) if m.dim() == 4 else m).reshape(-1, values) for m in levels])


def _rois_teacher(term: kdhooks.Term, ctx: kdhooks.LossContext, student: Any) -> Any:
    """The teacher's RoI outputs on the student's proposals (extras ``teacher_rois``), checked against the student's."""
    teacher = ctx.extras["teacher_rois"].get(term.teacher) if isinstance(ctx.extras["teacher_rois"], Mapping) \
        else None
    if teacher is None:
        raise kdhooks.LossError(term.name, ctx.step, problem=f"the step's teacher_rois hold no {term.teacher!r}",
                                fix="pass the teacher's RoI outputs on the student's proposals by its teacher tap "
                                "(kdhooks.integrations.mmdet does)")
    if tuple(teacher.shape) != tuple(student.shape):
        raise kdhooks.LossError(term.name, ctx.step, problem=f"the student's RoI rows {tuple(student.shape)} and "
                                f"the teacher's {tuple(teacher.shape)} differ: not the same proposals, or heads "
                                f"with different classes", fix="run the teacher's RoI head on the student's sampled "
                                "proposals, with the same classes and box layout")
    return teacher


def _check_rois(term: kdhooks.Term, shape: Any, tap: str) -> list[tuple] | None:
    """``rois: true`` reads RoI rows (N, k): a 2-d output of the student's RoI head."""
    shapes = _shapes(shape)
    if shapes is not None and (len(shapes) != 1 or len(shapes[0]) != 2):
        raise kdhooks.ConfigError(term.location_of(tap), f"with rois: true {term.kind} reads the RoI head's rows "
                                  f"(N proposals, k), and the student's {term.student!r} has shapes {shapes}",
                                  value=term.student, fix="tap the RoI head (roi_head.bbox_head:0 for class scores, "
                                  ":1 for box deltas), or rois: false for a dense head")
    return shapes
