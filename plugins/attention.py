"""Matching where the networks look: activation-based attention transfer.

The ``attention`` tap (probabilities of transformer attention layers) is
matched by ``attention_maps`` in the nlp plugin; this family turns activations
into spatial attention maps. Constants against the reference code, and how to
port a published β: docs/conventions.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

import kdhooks

from ._layers import WeightedLayers, check_pairs, resized, smaller_grid, tensor_of


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Q = mean over channels of |f|^p, flattened per sample and L2-normalized: (N, H·W) or (N, L) for tokens."""
    feature = feature.float()
    channels = 1 if feature.dim() == 4 else -1  # conv maps (N, C, H, W), tokens (N, L, D)
    return F.normalize(feature.abs().pow(p).mean(channels).flatten(1), dim=1)


def _pair_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float,
               form: str = "paper") -> torch.Tensor:
    if student_feature.dim() == 4 and student_feature.shape[-2:] != teacher_feature.shape[-2:]:
        if form == "reference":
            # RepDistiller's Attention.at_loss: the larger feature itself is average-pooled, then squared
            student_feature, teacher_feature = smaller_grid(student_feature.float(), teacher_feature.float())
        else:
            # the paper's map |f|^p, averaged over channels, is compared on the smaller grid
            size = tuple(min(a, b) for a, b in zip(student_feature.shape[-2:], teacher_feature.shape[-2:]))
            student_feature = resized(student_feature.float().abs().pow(p).mean(1, keepdim=True), size)
            teacher_feature = resized(teacher_feature.float().abs().pow(p).mean(1, keepdim=True), size)
            p = 1.0  # already |f|^p, averaged over channels
    difference = attention_map(student_feature, p) - attention_map(teacher_feature, p)
    return difference.pow(2).mean()


def at_loss(student_features: torch.Tensor | Sequence[torch.Tensor],
            teacher_features: torch.Tensor | Sequence[torch.Tensor], beta: float = 1000.0,
            p: float = 2.0, form: Literal["paper", "reference"] = "paper",
            layer_weights: Sequence[float] | None = None) -> torch.Tensor:
    """β/2 · Σ_j w_j · mean over samples and positions of (Q_S^j/‖Q_S^j‖ − Q_T^j/‖Q_T^j‖)², j over layer pairs.

    The mean over positions and samples is the paper's "β divided by the number
    of elements in the attention map and batch size" (β = 10³). ``form``
    matters only for conv maps of different sizes: ``paper`` pools the map
    mean_c |f|^p to the smaller grid, ``reference`` pools the feature before
    taking |f|^p (RepDistiller). ``layer_weights`` w_j default to 1.
    """
    if isinstance(student_features, torch.Tensor):
        student_features, teacher_features = [student_features], [teacher_features]
    weights = [1.0] * len(student_features) if layer_weights is None else list(layer_weights)
    return beta / 2 * sum(w * _pair_loss(s, t, p, form)
                          for w, s, t in zip(weights, student_features, teacher_features))


class AT(WeightedLayers):
    """Paying more attention to attention (Zagoruyko & Komodakis 2017): β/2 Σ_j ‖Q_S^j/‖Q_S^j‖ − Q_T^j/‖Q_T^j‖‖².

    ``student`` and ``teacher`` are one layer path each or equal-length lists
    (one pair per resolution, as the paper's group outputs), weighted by
    ``layer_weights`` (default ``equal``; ``halving`` or a list). Conv maps of
    different sizes are compared on the smaller grid: ``form: paper`` (default)
    pools the attention map mean_c |f|^p, ``form: reference`` pools the feature
    first, as RepDistiller's ``Attention``. Token features (N, L, D) give a map
    over tokens and need the same length. β/2 is the paper's; the authors' code
    and RepDistiller multiply by β, so their β = 1000 is ``beta: 2000`` here
    (docs/conventions.md). β was set for maps of 32x32 to 8x8 positions; on
    much smaller maps each position weighs more and the term can swamp the
    task (docs/methods.md): lower β there.
    """

    beta: kdhooks.NonNegative = 1000.0
    p: kdhooks.Positive = 2.0
    form: Literal["paper", "reference"] = "paper"

    def check(self, shapes: dict[str, Any]) -> None:
        check_pairs(self, self.pairs, shapes, (4, 3), "an attention map is a map over positions")

    def loss(self, ctx: kdhooks.LossContext, **features: torch.Tensor) -> torch.Tensor:
        count = len(self.pairs)
        return at_loss([tensor_of(features[f"student_{i}"]) for i in range(count)],
                       [tensor_of(features[f"teacher_{i}"]) for i in range(count)], self.beta, self.p,
                       self.form, self.pair_weights)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("at", AT)
