"""Two-stage detectors (Faster R-CNN): the teacher's RoI head on the proposals the student sampled, their targets.

A two-stage student samples its RoIs inside its forward (RPN proposals, the gt
boxes added, assigned and sampled by its RoI head), so the teacher's RoI head
can only run on the same proposals afterwards, as Chen et al. 2017 run it: the
teacher's backbone, neck and RPN run with the student's forward (``TeacherCall``
keeps the features), and ``TeacherRoIs`` runs its RoI head on the proposals the
student's RoI feature extractor received, giving the terms with ``rois: true``
their teacher rows in the extras (``teacher_rois``). ``roi_targets`` are the
regression targets of those proposals, from the student RoI head's assigner.
"""
from __future__ import annotations

from typing import Any

import torch
from mmdet.structures.bbox import get_box_tensor
from mmengine.structures import InstanceData
from torch import nn

import kdhooks

from ._targets import coder_settings
from ._teacher import is_two_stage

# the proposals the student's RoI head sampled this step: its box feature extractor's first call gets them (rois,
# (N, 5): image index, x1, y1, x2, y2); a mask branch sharing the extractor calls it again with the positives only
ROIS_TAP = kdhooks.Tap("student", "roi_head.bbox_roi_extractor:1", kind="input", policy="first")
# a tap that makes the teacher run with the student's forward where no term taps it (the RoI terms read it from the
# extras): its features are kept for its RoI head
TEACHER_RUNS = kdhooks.Tap("teacher", "backbone")
# the modules of a StandardRoIHead's box branch, in the order they run
BOX_BRANCH = ("roi_head.bbox_roi_extractor", "roi_head.shared_head", "roi_head.bbox_head")


def rois_terms(distiller: kdhooks.Distiller) -> list[kdhooks.Term]:
    """The terms that read RoI rows: ``rois: true``."""
    return [term for term in distiller.terms if getattr(term, "rois", False)]


def _within(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(f"{p}.") for p in prefixes)


def _has_box_branch(model: nn.Module) -> bool:
    roi_head = getattr(model, "roi_head", None)
    return is_two_stage(model) and all(isinstance(getattr(roi_head, name, None), nn.Module) and
                                       not isinstance(getattr(roi_head, name), nn.ModuleList)
                                       for name in ("bbox_roi_extractor", "bbox_head"))


def refuse_teacher_roi_taps(distiller: kdhooks.Distiller, teacher: nn.Module) -> None:
    """A tap on a two-stage teacher's RoI head cannot be recorded with the student's forward: say what does it."""
    if not is_two_stage(teacher):
        return
    for tap, location in distiller.taps.items():
        if tap.role != "student" and _within(tap.module_path, ("roi_head",)):
            raise kdhooks.ConfigError(location, f"the teacher's RoI head ({tap.path!r}) runs on proposals, and a "
                                      f"tap on it would record the teacher's own proposals, not the student's",
                                      value=tap.path, fix="set rois: true on det_cls_kd / det_bounded_reg: the "
                                      "teacher's RoI head then runs on the proposals the student sampled (Chen et "
                                      "al. 2017), and its outputs reach the term in the extras (teacher_rois)")


def check_rois_terms(terms: list[kdhooks.Term], student: nn.Module, teacher: nn.Module, where: Any) -> None:
    """At build: both detectors have a box RoI head, the taps are in it, and the two heads' rows mean the same."""
    for term in terms:
        location = where({term.name})
        for role, model in (("student", student), ("teacher", teacher)):
            if not _has_box_branch(model):
                raise kdhooks.ConfigError(location, f"rois: true distills RoI heads, and the {role} "
                                          f"({type(model).__name__}) has no RoI box head (a two-stage detector "
                                          f"with a StandardRoIHead: Faster R-CNN, Mask R-CNN)",
                                          fix="distill a two-stage pair, or rois: false for dense heads")
        student_path = kdhooks.Tap("student", term.student).module_path
        teacher_path = kdhooks.Tap("teacher", term.teacher).module_path
        if not _within(student_path, ("roi_head.bbox_head",)):
            raise kdhooks.ConfigError(f"{term.location}.student", f"with rois: true the student's rows are its RoI "
                                      f"box head's, and {term.student!r} is not in roi_head.bbox_head",
                                      value=term.student, fix="roi_head.bbox_head:0 (class scores) or :1 (deltas)")
        if not _within(teacher_path, BOX_BRANCH):
            raise kdhooks.ConfigError(f"{term.location}.teacher", f"with rois: true the teacher's rows come from its "
                                      f"RoI box branch run on the student's proposals ({', '.join(BOX_BRANCH)}), and "
                                      f"{term.teacher!r} is not in it", value=term.teacher,
                                      fix="roi_head.bbox_head:0 (class scores) or :1 (deltas)")
        mine, theirs = student.roi_head.bbox_head, teacher.roi_head.bbox_head
        layout = {"classes": (mine.num_classes, theirs.num_classes),
                  "sigmoid class scores": (mine.loss_cls.use_sigmoid, theirs.loss_cls.use_sigmoid)}
        if "reg_targets" in term.extras_needed():
            layout.update({"class-agnostic regression": (mine.reg_class_agnostic, theirs.reg_class_agnostic),
                           "box coder": (coder_settings(mine.bbox_coder), coder_settings(theirs.bbox_coder))})
        differences = [f"{name}: student {a}, teacher {b}" for name, (a, b) in layout.items() if a != b]
        if differences:
            raise kdhooks.ConfigError(location, f"the RoI heads' rows differ ({'; '.join(differences)}), and they "
                                      f"are compared proposal by proposal", fix="give the teacher's and the "
                                      "student's roi_head.bbox_head the same num_classes, loss_cls activation, "
                                      "reg_class_agnostic and bbox_coder, or drop the term")
        activation = getattr(term, "activation", None)
        wanted = "sigmoid" if mine.loss_cls.use_sigmoid else "softmax"
        if activation is not None and activation != wanted:
            scores = "per-class sigmoids" if wanted == "sigmoid" else "a softmax over the classes and background (last)"
            raise kdhooks.ConfigError(f"{term.location}.activation", f"the RoI head's class scores are {scores}, "
                                      f"and the term reads them as {activation}", value=activation,
                                      fix=f"activation: {wanted}")


def _select(value: Any, selectors: tuple[str, ...]) -> Any:
    """A tap's selectors (tuple indices, keys) applied to a module's output."""
    for selector in selectors:
        value = value[int(selector)] if selector.lstrip("-").isdigit() else value[selector]
    return value


class TeacherRoIs:
    """The teacher's RoI box branch on given proposals, under no_grad: the outputs the terms' teacher taps name.

    ``paths`` are the teacher taps of the terms with ``rois: true`` (``roi_head.bbox_head:0``); each is read from
    its module's output while the branch runs, as a tap would record it.
    """

    def __init__(self, teacher: nn.Module, paths: list[str]):
        self.teacher = teacher
        self.paths = sorted(set(paths))

    def __call__(self, features: tuple[torch.Tensor, ...], rois: torch.Tensor) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        handles = []
        for path in self.paths:
            tap = kdhooks.Tap("teacher", path)

            def keep(module: nn.Module, args: tuple, output: Any, path: str = path, tap: kdhooks.Tap = tap) -> None:
                outputs[path] = _select(output, tap.selectors)
            handles.append(self.teacher.get_submodule(tap.module_path).register_forward_hook(keep))
        roi_head = self.teacher.roi_head
        try:
            with torch.no_grad():
                extractor = roi_head.bbox_roi_extractor
                box_features = extractor(features[:extractor.num_inputs], rois.to(features[0].dtype))
                if roi_head.with_shared_head:
                    box_features = roi_head.shared_head(box_features)
                roi_head.bbox_head(box_features)
        finally:
            for handle in handles:
                handle.remove()
        return outputs


def roi_targets(roi_head: nn.Module, rois: torch.Tensor, data_samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression targets and weights of the sampled proposals, laid out as the RoI head's box outputs.

    Rows (N, 4·C) (``(N, 4)`` class-agnostic): each positive proposal's deltas
    to its gt box, encoded with the head's box coder, in the columns of its gt
    class, weight 1 there and 0 elsewhere. The proposals are assigned again by
    the student RoI head's own assigner; with mmdet's R-CNN assigner (no
    low-quality matches) a proposal's assignment depends on its overlaps with
    the gt boxes only, so it is the one the head's sampler used.
    """
    head = roi_head.bbox_head
    classes = 1 if head.reg_class_agnostic else head.num_classes
    targets = rois.new_zeros(len(rois), classes, 4)
    weights = rois.new_zeros(len(rois), classes, 4)
    for image, sample in enumerate(data_samples):
        chosen = (rois[:, 0] == image).nonzero().squeeze(1)
        if chosen.numel() == 0:
            continue
        proposals = InstanceData(priors=rois[chosen, 1:])
        ignored = sample.ignored_instances if "ignored_instances" in sample else None
        assigned = roi_head.bbox_assigner.assign(proposals, sample.gt_instances, ignored)
        positive = assigned.gt_inds > 0
        if not positive.any():
            continue
        gt_boxes = get_box_tensor(sample.gt_instances.bboxes)[assigned.gt_inds[positive] - 1]
        rows = chosen[positive]
        columns = torch.zeros_like(rows) if head.reg_class_agnostic else assigned.labels[positive]
        targets[rows, columns] = head.bbox_coder.encode(proposals.priors[positive], gt_boxes.to(rois))
        weights[rows, columns] = 1.0
    return targets.reshape(len(rois), -1), weights.reshape(len(rois), -1)
