"""Matching sparsity patterns: which neurons a ReLU switches on, not how strongly."""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

import kdhooks

from ._layers import WeightedLayers, check_pairs, pair_taps, shape, tensor_of


def ab_loss(student_pre: torch.Tensor, teacher_pre: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """‖ρ(t) ⊙ σ(μ1 − s) + (1 − ρ(t)) ⊙ σ(μ1 + s)‖²₂ per sample, averaged over samples.

    ``student_pre`` is the student's pre-activation brought to the teacher's
    shape by the connector r, ``teacher_pre`` the teacher's; ρ(x) = 1[x > 0]
    and σ is the ReLU. A neuron the teacher switches on is pushed above +μ, one
    it switches off below −μ: the activation boundary, not the response, is
    transferred.
    """
    student_pre, teacher_pre = student_pre.float(), teacher_pre.float()
    teacher_on = (teacher_pre > 0).float()
    hinge = teacher_on * F.relu(margin - student_pre) + (1 - teacher_on) * F.relu(margin + student_pre)
    return hinge.pow(2).flatten(1).sum(1).mean()


def disagreement_rate(student_pre: torch.Tensor, teacher_pre: torch.Tensor) -> torch.Tensor:
    """The fraction of neurons whose on/off state differs: mean of 1[ρ(s) ≠ ρ(t)]."""
    return ((student_pre > 0) != (teacher_pre > 0)).float().mean()


class AB(WeightedLayers):
    """Activation boundaries (Heo et al. 2019): Σ_layers ‖ρ(T) ⊙ σ(μ1 − r(S)) + (1 − ρ(T)) ⊙ σ(μ1 + r(S))‖²₂.

    ``student`` and ``teacher`` name the activation modules (one path or equal
    lists); their inputs are the pre-activations. With ``pre_activation:
    output`` they name the modules whose output is the pre-activation (the
    BatchNorm before a functional ReLU); an in-place ReLU overwrites its input,
    so tap it with ``clone: true``. The connector r (1x1 conv + BN, as in
    the paper) maps the student's to the teacher's shape. Each layer's loss is
    summed over neurons and averaged over samples; ``layer_weights`` (default
    ``equal``) weighs the layers: ``halving`` is the authors' code's and
    RepDistiller's ¼, ½, 1 from shallow to deep, and their loss is this one
    × 3/1000, so ``weight: 0.003, layer_weights: halving`` reproduces it
    (docs/conventions.md). The paper uses AB to initialize the student: weight
    on and task weight 0 for the first epochs, then the reverse (see
    docs/methods.md). The disagreement rate of the on/off patterns is logged as
    ``<name>.disagreement``.
    """

    margin: kdhooks.NonNegative = 1.0
    pre_activation: Literal["input", "output"] = "input"
    connector: str = "conv1x1_bn"

    def taps(self) -> dict[str, kdhooks.Tap]:
        # the tap kind is an option here: the sparsity pattern of the layer's input or output
        return pair_taps(self.pairs, self.pre_activation)

    def check(self, shapes: dict[str, Any]) -> None:
        # the paper's 1x1 conv connector joins conv maps; a linear one joins token or vector neurons
        if self.connector.startswith("conv"):
            kinds, why = (4,), f"its connector {self.connector!r} is a 1x1 convolution (connector: linear for vectors)"
        else:
            kinds, why = (4, 3, 2), "ab compares the on/off states of neurons, sample by sample"
        check_pairs(self, self.pairs, shapes, kinds, why)

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        self.connectors = [distiller.add_connector(self.name, shape(shapes[f"student_{i}"]),
                                                   shape(shapes[f"teacher_{i}"]), self.connector,
                                                   location=f"{self.location}.connector")
                           for i in range(len(self.pairs))]

    def loss(self, ctx: kdhooks.LossContext, **pre_activations: Any) -> torch.Tensor:
        total, disagreement = 0.0, 0.0
        for i, connector in enumerate(self.connectors):
            student = connector(tensor_of(pre_activations[f"student_{i}"]))
            teacher = tensor_of(pre_activations[f"teacher_{i}"])
            total = total + self.pair_weights[i] * ab_loss(student, teacher, self.margin)
            disagreement = disagreement + disagreement_rate(student.detach(), teacher)
        ctx.log(f"{self.name}.disagreement", disagreement / len(self.connectors))
        return total


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("ab", AB)
