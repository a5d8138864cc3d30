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
  targets in the head's encoding and their weights (non-zero at positives);
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
    """Fine-grained feature imitation (Wang et al. 2019): per-level L2 of 1x1-adapted student features, near objects."""

    student: str = "neck"
    teacher: str = "neck"
    region: Literal["objects", "all"] = "objects"
    ratio: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.5  # of a box's best IoU: 1 would keep no prior
    levels: list[int] | None = None
    connector: str = "conv1x1"

    def extras_needed(self) -> set[str]:
        return {"gt_boxes", "priors"} if self.region == "objects" else set()

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_features": kdhooks.Tap("student", self.student),
                "teacher_features": kdhooks.Tap("teacher", self.teacher)}

    def _chosen_levels(self, count: int) -> list[int]:
        chosen = self.levels if self.levels is not None else list(range(count))
        for level in chosen:
            if not -count <= level < count:
                raise kdhooks.ConfigError(f"{self.location}.levels", f"there is no level {level}", value=level,
                                          fix=f"levels are 0..{count - 1}")
        return chosen

    def check(self, shapes: dict[str, Any]) -> None:
        student_shapes, teacher_shapes = _shapes(shapes["student_features"]), _shapes(shapes["teacher_features"])
        if student_shapes is None or teacher_shapes is None:
            return
        if len(student_shapes) != len(teacher_shapes):
            raise kdhooks.ConfigError(self.location, f"the student has {len(student_shapes)} levels at "
                                      f"{self.student!r}, the teacher {len(teacher_shapes)} at {self.teacher!r}",
                                      value=[student_shapes, teacher_shapes],
                                      fix="tap outputs with the same levels (e.g. both necks)")
        for level in self._chosen_levels(len(student_shapes)):
            student_shape, teacher_shape = student_shapes[level], teacher_shapes[level]
            # the connector maps channels; the images and the grid must be the same
            if len(student_shape) != 4 or len(teacher_shape) != 4 or \
                    (student_shape[0], *student_shape[2:]) != (teacher_shape[0], *teacher_shape[2:]):
                raise kdhooks.ConfigError(self.location, f"level {level}: student {student_shape} and teacher "
                                          f"{teacher_shape} are not feature maps of the same size",
                                          value=[student_shape, teacher_shape], fix="pair levels of the same stride")

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        student_shapes, teacher_shapes = _shapes(shapes["student_features"]), _shapes(shapes["teacher_features"])
        self._chosen = self._chosen_levels(len(student_shapes))
        self.adapters: list[nn.Module] = [
            distiller.add_connector(self.name, student_shapes[level], teacher_shapes[level], self.connector,
                                    location=f"{self.location}.connector") for level in self._chosen]

    def loss(self, ctx: kdhooks.LossContext, student_features: Any, teacher_features: Any) -> torch.Tensor:
        student_levels, teacher_levels = _levels(student_features), _levels(teacher_features)
        adapted = [adapter(student_levels[level]) for adapter, level in zip(self.adapters, self._chosen)]
        teachers = [teacher_levels[level] for level in self._chosen]
        masks = None
        if self.region == "objects":
            all_masks = imitation_mask(ctx.extras["priors"], ctx.extras["gt_boxes"],
                                       [tuple(m.shape[-2:]) for m in teacher_levels], self.ratio)
            masks = [all_masks[level] for level in self._chosen]
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
    """Teacher bounded regression (Chen et al. 2017): student L2 to the target where above the teacher's − m."""

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
        return bounded_regression_loss(students[positive], teachers[positive], targets[positive], self.margin)


class LD(kdhooks.Term):
    """Localization distillation (Zheng et al. 2022): KL between per-edge box distributions, T = 10."""

    student: str = "bbox_head:1"
    teacher: str = "bbox_head:1"
    temperature: kdhooks.Positive = 10.0
    region: Literal["positives", "all"] = "positives"
    bins: kdhooks.PositiveInt | None = None

    def extras_needed(self) -> set[str]:
        return {"positives"} if self.region == "positives" else set()

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_corners": kdhooks.Tap("student", self.student),
                "teacher_corners": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        student_shapes = _matching_levels(self, shapes, "student_corners", "teacher_corners", "box distributions",
                                          "use heads with the same reg_max and strides")
        if student_shapes is None:
            return
        channels = student_shapes[0][1]
        if channels % (4 * (self.bins or 1)):
            raise kdhooks.ConfigError(f"{self.location}.bins", f"{channels} channels are not 4 edges × "
                                      f"{self.bins or 'some'} bins per prior", value=self.bins,
                                      fix="bins = reg_max + 1" if self.bins else "tap the box distribution branch")

    def loss(self, ctx: kdhooks.LossContext, student_corners: Any, teacher_corners: Any) -> torch.Tensor:
        students, teachers = _levels(student_corners), _levels(teacher_corners)
        # GFL-style heads have one prior per location: 4 edges × bins channels
        bins = self.bins or students[0].shape[1] // 4
        student_rows = torch.cat([r.reshape(-1, 4 * bins) for r in flatten_levels(students, 4 * bins)])
        teacher_rows = torch.cat([r.reshape(-1, 4 * bins) for r in flatten_levels(teachers, 4 * bins)])
        if self.region == "positives":
            positive = torch.cat([p.reshape(-1) for p in ctx.extras["positives"]]).bool()
            student_rows, teacher_rows = student_rows[positive], teacher_rows[positive]
        return ld_loss(student_rows.reshape(-1, bins), teacher_rows.reshape(-1, bins), self.temperature)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("det_feature_imitation", DetFeatureImitation)
    registry.add_term("det_cls_kd", DetClsKD)
    registry.add_term("det_bounded_reg", DetBoundedReg)
    registry.add_term("ld", LD)
