"""Distilling object detectors: feature imitation, soft classification, bounded regression, localization.

The terms work on detection heads, as a detection integration taps them
(``kdhooks.integrations.mmdet`` does): neck levels and dense head outputs
(a RetinaNet's head, a Faster R-CNN's RPN) are lists over levels of maps
``(B, A·k, H, W)`` (``A`` priors per location, ``k`` values per prior); a
two-stage detector's RoI head gives rows ``(N, k)``, one per proposal. What
comes from the ground truth arrives in the step's extras, per level in the
flattened layout ``map.permute(0, 2, 3, 1).reshape(B, -1, k)`` gives, so that
row ``i`` of a level is prior ``i`` of that level:

- ``gt_boxes``: per image, ``(n, 4)`` boxes ``x1, y1, x2, y2`` in input pixels;
- ``priors``: per level, ``(H·W·A, 4)`` anchor boxes of the student's dense head;
- ``reg_targets``, ``reg_weights``: per level, ``(B, H·W·A, 4)`` regression
  targets in the encoding of the head's box outputs (deltas; an integration
  encodes the gt boxes that heads with decoded-box losses assign) and their
  weights (non-zero at positives). For a RoI head ``(N, 4·C)`` rows laid out as
  its box outputs (class ``c`` in columns ``4c…4c+3``; ``(N, 4)`` when
  class-agnostic), non-zero at each positive proposal's class. Where a detector
  has several heads either may be a mapping ``{the student head's module path:
  value}`` (``rpn_head``, ``roi_head.bbox_head``): a term reads its head's;
- ``positives``: per level, ``(B, H·W·A)`` True where the dense head's assigner
  made a prior positive;
- ``teacher_rois``: for terms with ``rois: true``, ``{the term's teacher tap:
  value}``, the teacher's RoI head run on the proposals the student sampled
  this step (its rows in the order of the student's), as Chen et al. 2017 do.
  A teacher's RoI head cannot run before the student has sampled, so an
  integration runs it after the student's forward and gives its outputs here.

A term says which of these it reads in ``extras_needed()``, so an integration
computes only those. Each formula is also a plain function (defined in
``_detection_formulas``, importable from here).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

import kdhooks

from ._detection_formulas import (
    bounded_regression_loss,
    box_iou,
    feature_imitation_loss,
    flatten_levels,
    imitation_mask,
    ld_head_loss,
    ld_loss,
    positive_mask,
    soft_binary_cls_loss,
    soft_cls_loss,
)
from ._detection_inputs import (
    _check_rois,
    _class_rows,
    _levels,
    _matching_levels,
    _of_head,
    _rois_teacher,
    _rows,
    _shapes,
)

__all__ = ["LD", "DetBoundedReg", "DetClsKD", "DetFeatureImitation", "bounded_regression_loss", "box_iou",
           "feature_imitation_loss", "flatten_levels", "imitation_mask", "ld_head_loss", "ld_loss", "positive_mask",
           "soft_binary_cls_loss", "soft_cls_loss"]


class DetFeatureImitation(kdhooks.Term):
    """Fine-grained feature imitation (Wang et al. 2019): per-level L2 of 1x1-adapted student features, near objects.

    Levels are paired by stride: on the same input, a student level and a
    teacher level of the same grid size (H, W) have the same stride, so a P2–P6
    student learns P3–P6 from a P3–P7 teacher. ``levels`` chooses among the
    student's levels (all that have a teacher level of their stride by default).

    ``region``: ``objects`` is Wang et al.'s near-object mask from the student
    head's anchors (``priors``, ``gt_boxes``); ``positives`` the locations where
    the student head's own assigner made a prior positive (``positives``), the
    near-object region of anchor-free heads (FCOS: points inside a box, within
    its centre-sampling radius, in the level's regression range); ``all``
    every location. After each step ``last_masks`` holds the masks used, per
    paired level ``(B, H, W)`` (kdhooks.integrations.mmdet's
    ``ImitationMaskHook`` saves them over the images as PNGs).
    """

    student: str = "neck"
    teacher: str = "neck"
    region: Literal["objects", "positives", "all"] = "objects"
    ratio: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.5  # of a box's best IoU: 1 would keep no prior
    levels: list[int] | None = None
    connector: str = "conv1x1"

    def extras_needed(self) -> set[str]:
        return {"objects": {"gt_boxes", "priors"}, "positives": {"positives"}, "all": set()}[self.region]

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_features": kdhooks.Tap("student", self.student),
                "teacher_features": kdhooks.Tap("teacher", self.teacher)}

    def _chosen_levels(self, count: int) -> list[int]:
        chosen = self.levels if self.levels is not None else list(range(count))
        for level in chosen:
            if not -count <= level < count:
                raise kdhooks.ConfigError(f"{self.location}.levels", f"the student has no level {level}", value=level,
                                          fix=f"levels are the student's 0..{count - 1}")
        return [level % count for level in chosen]

    def _grids(self, shapes: list[tuple], role: str) -> dict[tuple, list[int]]:
        """The role's levels by grid size (H, W); each must be a feature map (B, C, H, W)."""
        grids: dict[tuple, list[int]] = {}
        for level, shape in enumerate(shapes):
            if len(shape) != 4:
                raise kdhooks.ConfigError(self.location_of(f"{role}_features"), f"the {role}'s level {level} has "
                                          f"shape {shape}, not a feature map (B, C, H, W)", value=shape,
                                          fix="tap a neck or its levels (e.g. neck, neck:1)")
            grids.setdefault(tuple(shape[2:]), []).append(level)
        return grids

    def level_pairs(self, shapes: dict[str, Any]) -> list[tuple[int, int]] | None:
        """(student level, teacher level) pairs of the same stride; None when the captures hold no tensors."""
        student_shapes, teacher_shapes = _shapes(shapes["student_features"]), _shapes(shapes["teacher_features"])
        if student_shapes is None or teacher_shapes is None:
            return None
        mine, theirs = self._grids(student_shapes, "student"), self._grids(teacher_shapes, "teacher")
        pairs = []
        for level in self._chosen_levels(len(student_shapes)):
            grid = tuple(student_shapes[level][2:])
            if len(mine[grid]) > 1 or len(theirs.get(grid, [])) > 1:
                raise kdhooks.ConfigError(self.location, f"several levels have the same {grid} grid on the example "
                                          f"input (student levels {mine[grid]}, teacher levels "
                                          f"{theirs.get(grid, [])}): their strides cannot be told apart",
                                          value=[student_shapes, teacher_shapes],
                                          fix="a larger example input (mmdet: example_size at least twice the "
                                          "largest stride), or choose levels")
            if grid not in theirs:
                if self.levels is not None:
                    raise kdhooks.ConfigError(f"{self.location}.levels", f"the student's level {level} ({grid} "
                                              f"grid) has no teacher level of its stride; the teacher's grids are "
                                              f"{sorted(theirs, reverse=True)}", value=self.levels,
                                              fix="choose student levels whose stride the teacher has")
                continue
            teacher_level = theirs[grid][0]
            if student_shapes[level][0] != teacher_shapes[teacher_level][0]:
                raise kdhooks.ConfigError(self.location, f"student {student_shapes[level]} and teacher "
                                          f"{teacher_shapes[teacher_level]} hold different numbers of images",
                                          value=[student_shapes, teacher_shapes],
                                          fix="run both models on the same batch")
            pairs.append((level, teacher_level))
        if not pairs:
            raise kdhooks.ConfigError(self.location, f"no student level has the stride of a teacher level: student "
                                      f"grids {[tuple(s[2:]) for s in student_shapes]}, teacher grids "
                                      f"{[tuple(s[2:]) for s in teacher_shapes]} on the same input",
                                      value=[student_shapes, teacher_shapes],
                                      fix="tap outputs with levels of common strides (e.g. both necks)")
        return pairs

    def check(self, shapes: dict[str, Any]) -> None:
        self.level_pairs(shapes)

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        student_shapes, teacher_shapes = _shapes(shapes["student_features"]), _shapes(shapes["teacher_features"])
        self._pairs = self.level_pairs(shapes)
        # the connector maps channels; the images and the grid are the same
        self.adapters: list[nn.Module] = [
            distiller.add_connector(self.name, student_shapes[s], teacher_shapes[t], self.connector,
                                    location=f"{self.location}.connector") for s, t in self._pairs]

    def loss(self, ctx: kdhooks.LossContext, student_features: Any, teacher_features: Any) -> torch.Tensor:
        student_levels, teacher_levels = _levels(student_features), _levels(teacher_features)
        adapted = [adapter(student_levels[s]) for adapter, (s, _) in zip(self.adapters, self._pairs)]
        teachers = [teacher_levels[t] for _, t in self._pairs]
        masks = None
        if self.region == "objects":
            # the student head's priors, one list per student level
            all_masks = imitation_mask(ctx.extras["priors"], ctx.extras["gt_boxes"],
                                       [tuple(m.shape[-2:]) for m in student_levels], self.ratio)
            masks = [all_masks[s] for s, _ in self._pairs]
        elif self.region == "positives":
            masks = [positive_mask(ctx.extras["positives"][s], student_levels[s].shape) for s, _ in self._pairs]
        # this step's masks per paired level, (B, H, W), for a user to look at (None with region: all)
        self.last_masks = None if masks is None else [m.detach() for m in masks]
        return feature_imitation_loss(adapted, teachers, masks)


class DetClsKD(kdhooks.Term):
    """Soft classification targets with a background weight (Chen et al. 2017): −Σ w_c P_t log P_s.

    On a dense head (RetinaNet, FCOS, an RPN's objectness) both heads' maps
    are compared prior by prior. ``rois: true`` distills a two-stage detector's
    RoI head (``student`` and ``teacher`` ``roi_head.bbox_head:0``, softmax over
    C+1 classes, background last): the rows of the proposals the student
    sampled, against the teacher's RoI head on the same proposals, which the
    integration runs and gives in the extras (``teacher_rois``).
    """

    student: str = "bbox_head:0"
    teacher: str = "bbox_head:0"
    activation: Literal["sigmoid", "softmax"] = "sigmoid"
    temperature: kdhooks.Positive = 1.0
    background_weight: kdhooks.NonNegative = 1.5
    foreground_weight: kdhooks.NonNegative = 1.0
    classes: kdhooks.PositiveInt | None = None
    background_index: int = -1
    rois: bool = False

    def extras_needed(self) -> set[str]:
        return {"teacher_rois"} if self.rois else set()

    def taps(self) -> dict[str, kdhooks.Tap]:
        taps = {"student_logits": kdhooks.Tap("student", self.student)}
        if not self.rois:  # the teacher's RoI head runs after the student's sampling: it comes in the extras
            taps["teacher_logits"] = kdhooks.Tap("teacher", self.teacher)
        return taps

    def check(self, shapes: dict[str, Any]) -> None:
        if self.rois:
            student_shapes = _check_rois(self, shapes["student_logits"], "student_logits")
        else:
            student_shapes = _matching_levels(self, shapes, "student_logits", "teacher_logits",
                                              "classification outputs", "use heads with the same classes, priors "
                                              "per location and strides", maps=False)
        if self.activation != "softmax" or student_shapes is None:
            return
        maps = len(student_shapes[0]) == 4
        if maps and self.classes is None:
            raise kdhooks.ConfigError(f"{self.location}.classes", "softmax over per-level maps needs the number "
                                      "of classes per prior, background included", fix="set classes: C+1")
        if maps and student_shapes[0][1] % self.classes:
            raise kdhooks.ConfigError(f"{self.location}.classes", f"the maps' {student_shapes[0][1]} channels are "
                                      f"not priors × {self.classes} classes", value=self.classes,
                                      fix="set classes to the head's classes per prior, background included")
        classes = self.classes or student_shapes[0][-1]
        if not -classes <= self.background_index < classes:
            raise kdhooks.ConfigError(f"{self.location}.background_index", f"there is no class {self.background_index} "
                                      f"among {classes}", value=self.background_index,
                                      fix="-1 (the last class, mmdet's background) or an index below the classes")

    def loss(self, ctx: kdhooks.LossContext, student_logits: Any, teacher_logits: Any = None) -> torch.Tensor:
        if self.rois:
            teacher_logits = _rois_teacher(self, ctx, student_logits)
        students, teachers = _levels(student_logits), _levels(teacher_logits)
        if self.activation == "sigmoid":
            return soft_binary_cls_loss(torch.cat([s.flatten() for s in students]),
                                        torch.cat([t.flatten() for t in teachers]), self.temperature,
                                        self.foreground_weight, self.background_weight)
        classes = self.classes or students[0].shape[-1]
        return soft_cls_loss(_class_rows(students, classes), _class_rows(teachers, classes), self.temperature,
                             self.background_weight, self.background_index)


class DetBoundedReg(kdhooks.Term):
    """Teacher bounded regression (Chen et al. 2017): student L2 to the target where above the teacher's − m.

    Both heads' box outputs and the ``reg_targets`` are compared row by row, one
    row per prior (dense heads, an RPN) or per proposal and class (a RoI head,
    ``rois: true``: the student's sampled proposals, the teacher's RoI head on
    the same proposals from the extras ``teacher_rois``), in the same encoding:
    the integration checks at attach that the two heads encode boxes alike and
    gives the targets in that encoding.
    """

    student: str = "bbox_head:1"
    teacher: str = "bbox_head:1"
    margin: kdhooks.Finite = 0.0  # m < 0 counts the student only where it is worse than the teacher by −m
    rois: bool = False

    def extras_needed(self) -> set[str]:
        return {"reg_targets", "reg_weights"} | ({"teacher_rois"} if self.rois else set())

    def taps(self) -> dict[str, kdhooks.Tap]:
        taps = {"student_reg": kdhooks.Tap("student", self.student)}
        if not self.rois:
            taps["teacher_reg"] = kdhooks.Tap("teacher", self.teacher)
        return taps

    def check(self, shapes: dict[str, Any]) -> None:
        if self.rois:
            _check_rois(self, shapes["student_reg"], "student_reg")
            return
        _matching_levels(self, shapes, "student_reg", "teacher_reg", "box outputs",
                         "use heads with the same box encoding, priors per location and strides")

    def loss(self, ctx: kdhooks.LossContext, student_reg: Any, teacher_reg: Any = None) -> torch.Tensor:
        if self.rois:
            teacher_reg = _rois_teacher(self, ctx, student_reg)
        targets = _levels(_of_head(ctx.extras["reg_targets"], self, "reg_targets"))
        weights = _levels(_of_head(ctx.extras["reg_weights"], self, "reg_weights"))
        values = 4 if self.rois else targets[0].shape[-1]
        students, teachers = _rows(_levels(student_reg), values), _rows(_levels(teacher_reg), values)
        targets = torch.cat([t.reshape(-1, values) for t in targets])
        positive = torch.cat([w.reshape(-1, values) for w in weights]).sum(dim=-1) > 0
        if students.shape[0] != targets.shape[0]:
            raise kdhooks.ConfigError(self.location, f"the box outputs hold {students.shape[0]} rows of {values} "
                                      f"values, the regression targets {targets.shape[0]}: the outputs are not "
                                      f"{values} values per prior (a distribution head?)", value=self.student,
                                      fix="tap box deltas (bbox_head:1 of an anchor head); for distribution heads "
                                      "(GFL) use ld")
        return bounded_regression_loss(students[positive], teachers[positive], targets[positive], self.margin)


class LD(kdhooks.Term):
    """Localization distillation (Zheng et al. 2022): KL between per-edge box distributions, T = 10.

    ``form: mean`` (default) is T² · KL averaged over the edges of the chosen
    priors. ``form: mmdet`` is mmdet's ``LDHead`` ``loss_ld`` exactly: each
    positive prior's edges weighted by the student's highest sigmoid class
    score (read from ``student_scores``), KL averaged over the bins, the sum
    divided by 4; with ``weight`` = LDHead's ``loss_weight`` (0.25 in mmdet's
    configs) the two are equal. Per edge, ``mean`` is ``bins`` × LDHead's term.
    """

    student: str = "bbox_head:1"
    teacher: str = "bbox_head:1"
    temperature: kdhooks.Positive = 10.0
    region: Literal["positives", "all"] = "positives"
    bins: kdhooks.PositiveInt | None = None
    form: Literal["mean", "mmdet"] = "mean"
    student_scores: str = "bbox_head:0"

    def extras_needed(self) -> set[str]:
        return {"positives"} if self.region == "positives" else set()

    def taps(self) -> dict[str, kdhooks.Tap]:
        taps = {"student_corners": kdhooks.Tap("student", self.student),
                "teacher_corners": kdhooks.Tap("teacher", self.teacher)}
        if self.form == "mmdet":
            taps["student_scores"] = kdhooks.Tap("student", self.student_scores)
        return taps

    def check(self, shapes: dict[str, Any]) -> None:
        if self.form == "mmdet" and self.region != "positives":
            raise kdhooks.ConfigError(f"{self.location}.region", "form: mmdet is LDHead's loss, which reads the "
                                      "positive priors only", value=self.region, fix="region: positives")
        student_shapes = _matching_levels(self, shapes, "student_corners", "teacher_corners", "box distributions",
                                          "use heads with the same reg_max and strides")
        if student_shapes is None:
            return
        channels = student_shapes[0][1]
        if channels % (4 * (self.bins or 1)):
            raise kdhooks.ConfigError(f"{self.location}.bins", f"{channels} channels are not 4 edges × "
                                      f"{self.bins or 'some'} bins per prior", value=self.bins,
                                      fix="bins = reg_max + 1" if self.bins else "tap the box distribution branch")
        score_shapes = _shapes(shapes["student_scores"]) if self.form == "mmdet" else None
        if score_shapes is not None and [(s[0], *s[2:]) for s in score_shapes] != \
                [(s[0], *s[2:]) for s in student_shapes]:
            raise kdhooks.ConfigError(self.location_of("student_scores"), f"the class scores {score_shapes} are not "
                                      f"maps of the box distributions' levels {student_shapes}",
                                      value=self.student_scores, fix="the head's class scores (bbox_head:0)")

    def loss(self, ctx: kdhooks.LossContext, student_corners: Any, teacher_corners: Any,
             student_scores: Any = None) -> torch.Tensor:
        students, teachers = _levels(student_corners), _levels(teacher_corners)
        # GFL-style heads have one prior per location: 4 edges × bins channels
        bins = self.bins or students[0].shape[1] // 4
        student_rows = torch.cat([r.reshape(-1, 4 * bins) for r in flatten_levels(students, 4 * bins)])
        teacher_rows = torch.cat([r.reshape(-1, 4 * bins) for r in flatten_levels(teachers, 4 * bins)])
        if self.region == "positives":
            positive = torch.cat([p.reshape(-1) for p in ctx.extras["positives"]]).bool()
            student_rows, teacher_rows = student_rows[positive], teacher_rows[positive]
        if self.form == "mmdet":
            scores = _levels(student_scores)
            scores = torch.cat([r.reshape(-1, r.shape[-1]) for r in flatten_levels(scores, scores[0].shape[1])])
            return ld_head_loss(student_rows, teacher_rows, scores.detach().sigmoid().max(dim=-1).values[positive],
                                self.temperature)
        return ld_loss(student_rows.reshape(-1, bins), teacher_rows.reshape(-1, bins), self.temperature)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("det_feature_imitation", DetFeatureImitation)
    registry.add_term("det_cls_kd", DetClsKD)
    registry.add_term("det_bounded_reg", DetBoundedReg)
    registry.add_term("ld", LD)
