"""Connectors: small trainable maps that bring a student feature to the teacher's shape.

Each kind is a factory ``(student_shape, teacher_shape) -> nn.Module`` that raises
``ValueError`` saying why it cannot join two shapes. Shapes include the batch.
"""
from __future__ import annotations

import torch
from torch import nn

import kdhooks

from ._layers import resized


class Resize2d(nn.Module):
    """Spatial size matched to the teacher's: average pooling down, bilinear interpolation up."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return resized(feature, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def identity(student_shape: tuple, teacher_shape: tuple) -> nn.Module:
    if student_shape[1:] != teacher_shape[1:]:
        raise ValueError("identity needs equal shapes")
    return nn.Identity()


def linear(student_shape: tuple, teacher_shape: tuple) -> nn.Module:
    """A linear map of the last dimension: vectors (N, D) and tokens (N, L, D)."""
    if len(student_shape) != len(teacher_shape) or len(student_shape) < 2:
        raise ValueError("linear needs features of the same rank, at least (N, D)")
    if student_shape[1:-1] != teacher_shape[1:-1]:
        raise ValueError(f"linear maps only the last dimension; the others differ "
                         f"({student_shape[1:-1]} vs {teacher_shape[1:-1]})")
    return nn.Linear(student_shape[-1], teacher_shape[-1])


def _conv1x1(student_shape: tuple, teacher_shape: tuple, batch_norm: bool) -> nn.Module:
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ValueError("a 1x1 convolution joins conv features (N, C, H, W)")
    layers: list[nn.Module] = [nn.Conv2d(student_shape[1], teacher_shape[1], 1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(teacher_shape[1]))
    if student_shape[2:] != teacher_shape[2:]:
        layers.append(Resize2d(teacher_shape[2:]))
    return nn.Sequential(*layers)


def conv1x1(student_shape: tuple, teacher_shape: tuple) -> nn.Module:
    """1x1 convolution to the teacher's channels (FitNets' regressor), spatial size matched."""
    return _conv1x1(student_shape, teacher_shape, batch_norm=False)


def conv1x1_bn(student_shape: tuple, teacher_shape: tuple) -> nn.Module:
    """1x1 convolution and BatchNorm, spatial size matched."""
    return _conv1x1(student_shape, teacher_shape, batch_norm=True)


def auto(student_shape: tuple, teacher_shape: tuple) -> nn.Module:
    """Identity for equal shapes, else a 1x1 convolution for conv features, else a linear map."""
    if student_shape[1:] == teacher_shape[1:]:
        return nn.Identity()
    if len(student_shape) == 4 and len(teacher_shape) == 4:
        return conv1x1(student_shape, teacher_shape)
    if len(student_shape) == len(teacher_shape) >= 2:
        return linear(student_shape, teacher_shape)
    raise ValueError(f"a rank-{len(student_shape)} feature and a rank-{len(teacher_shape)} feature "
                     f"have no connector; tap layers of the same kind (conv maps or token/vector features)")


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_connector("auto", auto)
    registry.add_connector("identity", identity)
    registry.add_connector("linear", linear)
    registry.add_connector("conv1x1", conv1x1)
    registry.add_connector("conv1x1_bn", conv1x1_bn)
