"""The detection terms' formulas as plain functions on tensors (``kdhooks.plugins.detection`` re-exports them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
