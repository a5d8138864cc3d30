"""Distilling object detectors: feature imitation, soft classification, bounded regression, localization.

The terms work on dense heads, as a detection integration taps them
(``kdhooks.integrations.mmdet`` does): neck levels and head outputs are lists
over levels of maps ``(B, A·k, H, W)`` (``A`` priors per location, ``k`` values
per prior). What comes from the ground truth arrives in the step's extras,
per level in the flattened layout ``map.permute(0, 2, 3, 1).reshape(B, -1, k)``
gives, so that row ``i`` of a level is prior ``i`` of that level:

- ``gt_boxes``: per image, ``(n, 4)`` boxes ``x1, y1, x2, y2`` in input pixels;
- ``priors``: per level, ``(H·W·A, 4)`` anchor boxes;
- ``reg_targets``, ``reg_weights``: per level, ``(B, H·W·A, 4)`` regression
  targets in the encoding of the head's box outputs (deltas; an integration
  encodes the gt boxes that heads with decoded-box losses assign) and their
  weights (non-zero at positives);
- ``positives``: per level, ``(B, H·W·A)`` True where the head's assigner
  made a prior positive.

A term says which of these it reads in ``extras_needed()``, so an integration
computes only those. Each formula is also a plain function below.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import kdhooks

from .logits import kd_loss


def box_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every box in ``boxes`` (N, 4) with every box in ``others`` (M, 4)."""
    top_left = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], others[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1)
    other_area = (others[:, 2:] - others[:, :2]).clamp(min=0).prod(-1)
    return intersection / (area[:, None] + other_area[None, :] - intersection).clamp(min=1e-9)


def flatten_levels(maps: list[torch.Tensor], values: int) -> list[torch.Tensor]:
    """Per-level maps (B, A·k, H, W) as (B, H·W·A, k) rows, one per prior."""
    return [m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, values) for m in maps]


def imitation_mask(priors: list[torch.Tensor], gt_boxes: list[torch.Tensor], sizes: list[tuple[int, int]],
                   ratio: float = 0.5) -> list[torch.Tensor]:
    """Fine-grained imitation regions (Wang et al. 2019): per level (B, H, W), 1 near objects.

    For each ground-truth box the IoU with every prior of every level is
    computed; priors above ``ratio`` times the box's best IoU mark their
    location; the masks of all boxes of an image are joined.
    """
    all_priors = torch.cat(priors)
    counts = [p.shape[0] for p in priors]
    masks = [torch.zeros(len(gt_boxes), h, w, device=all_priors.device) for h, w in sizes]
    for image, boxes in enumerate(gt_boxes):
        if boxes.numel() == 0:
            continue
        iou = box_iou(all_priors, boxes.to(all_priors))                  # (priors, boxes)
        near = (iou > ratio * iou.max(dim=0).values).any(dim=1)          # priors near some box
        for level, near_level in enumerate(near.split(counts)):
            h, w = sizes[level]
            masks[level][image] = near_level.view(h, w, -1).any(dim=-1).float()
    return masks


def positive_mask(positives: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A level's (B, H·W·A) positives as a (B, H, W) mask: 1 where some prior of the location is positive."""
    batch, _, height, width = shape
    return positives.reshape(batch, height, width, -1).any(dim=-1).float()


def feature_imitation_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                           masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_levels Σ_{b,i,j,c} I_bij (s − t)² / (2 N_p), N_p = Σ I (all locations when ``masks`` is None)."""
    squared_sum, locations = [], []
    for level, (student, teacher) in enumerate(zip(student_features, teacher_features)):
        squared = (student.float() - teacher.float()).pow(2).sum(dim=1)      # (B, H, W)
        mask = torch.ones_like(squared) if masks is None else masks[level].to(squared)
        squared_sum.append((squared * mask).sum())
        locations.append(mask.sum())
    return torch.stack(squared_sum).sum() / (2 * torch.stack(locations).sum().clamp(min=1.0))


def soft_cls_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  background_weight: float = 1.5, background_index: int = -1) -> torch.Tensor:
    """−Σ_c w_c P_t log P_s with P = softmax(z / T), w_background = w0; rows (N, C+1), mean over rows."""
    classes = student_logits.shape[-1]
    student_log_probs = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    teacher_probs = F.softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    weights = torch.ones(classes, device=student_logits.device)
    weights[background_index] = background_weight
    return -(weights * teacher_probs * student_log_probs).sum(dim=-1).mean()


def soft_binary_cls_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                         foreground_weight: float = 1.0, background_weight: float = 1.5) -> torch.Tensor:
    """Per-class binary form for sigmoid heads: −[w_fg p_t log p_s + w_bg (1 − p_t) log(1 − p_s)], mean."""
    student = student_logits.float() / temperature
    teacher_probs = torch.sigmoid(teacher_logits.float() / temperature)
    # log σ(x) and log(1 − σ(x)) = log σ(−x), stable for large |x|
    loss = -(foreground_weight * teacher_probs * F.logsigmoid(student)
             + background_weight * (1 - teacher_probs) * F.logsigmoid(-student))
    return loss.mean()


def bounded_regression_loss(student_reg: torch.Tensor, teacher_reg: torch.Tensor, targets: torch.Tensor,
                            margin: float = 0.0) -> torch.Tensor:
    """Teacher bounded L2 (Chen et al. 2017): ||R_s − y||² if ||R_s − y||² + m > ||R_t − y||², else 0; mean."""
    if student_reg.shape[0] == 0:
        return student_reg.sum() * 0.0
    student_error = (student_reg.float() - targets.float()).pow(2).sum(dim=-1)
    teacher_error = (teacher_reg.float() - targets.float()).pow(2).sum(dim=-1)
    return torch.where(student_error + margin > teacher_error, student_error, torch.zeros_like(student_error)).mean()


def ld_loss(student_corners: torch.Tensor, teacher_corners: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) per box edge (rows of bin logits), mean over edges."""
    if student_corners.shape[0] == 0:
        return student_corners.sum() * 0.0
    # rows of bin logits are rows of class logits: Hinton's tempered KL, averaged over edges
    return kd_loss(student_corners, teacher_corners, temperature)


def ld_head_loss(student_corners: torch.Tensor, teacher_corners: torch.Tensor, scores: torch.Tensor,
                 temperature: float = 10.0) -> torch.Tensor:
    """mmdet's ``LDHead`` ``loss_ld`` at loss_weight 1: Σ_priors w Σ_edges T² KL_e / (bins · 4).

    Rows are positive priors, ``(N, 4 · bins)`` bin logits; ``scores`` (N,) is
    each prior's highest sigmoid class score of the student (detached), the
    weight LDHead gives its edges. KL_e is averaged over the bins and the sum is
    divided by 4 (LDHead's ``avg_factor=4.0``), not by the number of priors.
    """
    if student_corners.shape[0] == 0:
        return student_corners.sum() * 0.0
    bins = student_corners.shape[-1] // 4
    student_log_probs = F.log_softmax(student_corners.float().reshape(-1, bins) / temperature, dim=-1)
    teacher_probs = F.softmax(teacher_corners.float().reshape(-1, bins) / temperature, dim=-1)
    per_edge = F.kl_div(student_log_probs, teacher_probs, reduction="none").mean(dim=-1) * temperature ** 2
    weights = scores.detach().float()[:, None].expand(-1, 4).reshape(-1)
    return (per_edge * weights).sum() / 4.0


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
        raise kdhooks.ConfigError(term.location, f"student {student_shapes} and teacher {teacher_shapes} {what} "
                                  f"differ", value=[student_shapes, teacher_shapes], fix=fix)
    if maps and any(len(s) != 4 for s in student_shapes):
        raise kdhooks.ConfigError(term.location_of(student), f"{term.kind} reads per-level maps (B, A·k, H, W); "
                                  f"the {what} have shapes {student_shapes}", value=student_shapes,
                                  fix="tap the head's outputs, a list of per-level maps (e.g. bbox_head:1)")
    return student_shapes


def _class_rows(logits: list[torch.Tensor], classes: int) -> torch.Tensor:
    """Classification outputs as (N, classes) rows: per-level maps (B, A·C, H, W) or rows already."""
    if logits[0].dim() == 4:
        logits = flatten_levels(logits, classes)
    return torch.cat([m.reshape(-1, classes) for m in logits])


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
    """Soft classification targets with a background weight (Chen et al. 2017): −Σ w_c P_t log P_s."""

    student: str = "bbox_head:0"
    teacher: str = "bbox_head:0"
    activation: Literal["sigmoid", "softmax"] = "sigmoid"
    temperature: kdhooks.Positive = 1.0
    background_weight: kdhooks.NonNegative = 1.5
    foreground_weight: kdhooks.NonNegative = 1.0
    classes: kdhooks.PositiveInt | None = None
    background_index: int = -1

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_logits": kdhooks.Tap("student", self.student),
                "teacher_logits": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        student_shapes = _matching_levels(self, shapes, "student_logits", "teacher_logits", "classification outputs",
                                          "use heads with the same classes, priors per location and strides",
                                          maps=False)
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

    def loss(self, ctx: kdhooks.LossContext, student_logits: Any, teacher_logits: Any) -> torch.Tensor:
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
    row per prior, in the same encoding: the integration checks at attach that
    the two heads encode boxes alike and gives the targets in that encoding.
    """

    student: str = "bbox_head:1"
    teacher: str = "bbox_head:1"
    margin: kdhooks.Finite = 0.0  # m < 0 counts the student only where it is worse than the teacher by −m

    def extras_needed(self) -> set[str]:
        return {"reg_targets", "reg_weights"}

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_reg": kdhooks.Tap("student", self.student),
                "teacher_reg": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        _matching_levels(self, shapes, "student_reg", "teacher_reg", "box outputs",
                         "use heads with the same box encoding, priors per location and strides")

    def loss(self, ctx: kdhooks.LossContext, student_reg: Any, teacher_reg: Any) -> torch.Tensor:
        targets, weights = ctx.extras["reg_targets"], ctx.extras["reg_weights"]
        values = targets[0].shape[-1]
        students = torch.cat([r.reshape(-1, values) for r in flatten_levels(_levels(student_reg), values)])
        teachers = torch.cat([r.reshape(-1, values) for r in flatten_levels(_levels(teacher_reg), values)])
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
