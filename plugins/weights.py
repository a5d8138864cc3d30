"""Matching intermediate weights: a student parameter against a teacher parameter.

The formula as implemented and its constants: docs/conventions.md.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import kdhooks

from ._layers import PairedLayers


class ParameterMap(nn.Module):
    """W ↦ A_out · W · A_inᵀ: learned linear maps of a weight's output and input axes to the teacher's sizes.

    Axes beyond the first two (a convolution's kernel) must already agree; an
    axis of equal size is left as it is. Raises ``ValueError`` saying why when
    the two shapes cannot be joined.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        if len(student_shape) != len(teacher_shape):
            raise ValueError(f"a rank-{len(student_shape)} parameter cannot be mapped to a rank-"
                             f"{len(teacher_shape)} one (e.g. a conv kernel to a linear weight)")
        if student_shape[2:] != teacher_shape[2:]:
            raise ValueError(f"only the output and input axes are mapped; the kernel sizes differ "
                             f"({student_shape[2:]} vs {teacher_shape[2:]})")
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        self.axis_maps = nn.ModuleList(
            nn.Linear(s, t, bias=False) if s != t else nn.Identity()
            for s, t in zip(student_shape[:2], teacher_shape[:2]))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for axis, axis_map in enumerate(self.axis_maps):
            weight = axis_map(weight.movedim(axis, -1)).movedim(-1, axis)
        return weight

    def extra_repr(self) -> str:
        return f"{self.student_shape} -> {self.teacher_shape}"


def weights_loss(mapped_student_weight: torch.Tensor, teacher_weight: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the mapped student parameter and the teacher's."""
    return F.mse_loss(mapped_student_weight.float(), teacher_weight.float())


class Weights(PairedLayers):
    """Matching intermediate weights (MIT 6.5940 lecture on KD, after FitNets, Romero et al. 2015): ‖M(W_S) − W_T‖².

    ``student`` and ``teacher`` name parameters (``stage2.1.0.weight``), one
    each or equal-length lists; M is a learned linear map per mismatched axis
    (output, input), trained with the student. Parameters are known without a
    dry pass, so no ``example_inputs`` are needed.
    """

    tap_kind: ClassVar[str] = "param"

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        self.maps = []
        for i, pair in enumerate(self.pairs):
            student, teacher = shapes[f"student_{i}"], shapes[f"teacher_{i}"]
            try:
                parameter_map = ParameterMap(student, teacher)
            except ValueError as error:
                raise kdhooks.ConfigError(self.location, f"the student's {pair[0]!r} {student} cannot be mapped to the "
                                          f"teacher's {pair[1]!r} {teacher}: {error}", value=list(pair),
                                          fix="pair parameters of the same kind of layer") from None
            self.maps.append(distiller.add_part(self.name, parameter_map))

    def loss(self, ctx: kdhooks.LossContext, **parameters: torch.Tensor) -> torch.Tensor:
        return sum(weights_loss(parameter_map(parameters[f"student_{i}"]), parameters[f"teacher_{i}"])
                   for i, parameter_map in enumerate(self.maps))


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("weights", Weights)
