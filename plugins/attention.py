"""Matching where the networks look: activation-based attention transfer.

The ``attention`` tap (probabilities of transformer attention layers) is
matched by ``attention_maps`` in the nlp plugin; this family turns activations
into spatial attention maps.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

import kdhooks

from ._layers import PairedLayers, check_pairs, resized, tensor_of


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Q = mean over channels of |f|^p, flattened per sample and L2-normalized: (N, H·W) or (N, L) for tokens."""
    feature = feature.float()
    channels = 1 if feature.dim() == 4 else -1  # conv maps (N, C, H, W), tokens (N, L, D)
    return F.normalize(feature.abs().pow(p).mean(channels).flatten(1), dim=1)


def _pair_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float) -> torch.Tensor:
    if student_feature.dim() == 4 and student_feature.shape[-2:] != teacher_feature.shape[-2:]:
        # maps of different resolution are compared on the smaller grid
        size = tuple(min(a, b) for a, b in zip(student_feature.shape[-2:], teacher_feature.shape[-2:]))
        student_feature = resized(student_feature.float().abs().pow(p).mean(1, keepdim=True), size)
        teacher_feature = resized(teacher_feature.float().abs().pow(p).mean(1, keepdim=True), size)
        p = 1.0  # already |f|^p, averaged over channels
    difference = attention_map(student_feature, p) - attention_map(teacher_feature, p)
    return difference.pow(2).mean()


def at_loss(student_features: torch.Tensor | Sequence[torch.Tensor],
            teacher_features: torch.Tensor | Sequence[torch.Tensor], beta: float = 1000.0,
            p: float = 2.0) -> torch.Tensor:
    """β/2 · Σ_j mean over samples and positions of (Q_S^j/‖Q_S^j‖ − Q_T^j/‖Q_T^j‖)², j over layer pairs.

    The mean over positions and samples is the paper's "β divided by the number
    of elements in the attention map and batch size" (β = 10³).
    """
    if isinstance(student_features, torch.Tensor):
        student_features, teacher_features = [student_features], [teacher_features]
    return beta / 2 * sum(_pair_loss(s, t, p) for s, t in zip(student_features, teacher_features))


class AT(PairedLayers):
    """Paying more attention to attention (Zagoruyko & Komodakis 2017): β/2 Σ_j ‖Q_S^j/‖Q_S^j‖ − Q_T^j/‖Q_T^j‖‖².

    ``student`` and ``teacher`` are one layer path each or equal-length lists
    (one pair per resolution, as the paper's group outputs). Conv maps of
    different sizes are compared on the smaller grid; token features (N, L, D)
    give a map over tokens and need the same length. β = 1000 was set for maps
    of 32x32 to 8x8 positions; on much smaller maps each position weighs more,
    and the term can swamp the task (docs/methods.md): lower β there.
    """

    beta: kdhooks.NonNegative = 1000.0
    p: kdhooks.Positive = 2.0

    def check(self, shapes: dict[str, Any]) -> None:
        check_pairs(self, self.pairs, shapes, (4, 3), "an attention map is a map over positions")

    def loss(self, ctx: kdhooks.LossContext, **features: torch.Tensor) -> torch.Tensor:
        count = len(self.pairs)
        return at_loss([tensor_of(features[f"student_{i}"]) for i in range(count)],
                       [tensor_of(features[f"teacher_{i}"]) for i in range(count)], self.beta, self.p)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("at", AT)
