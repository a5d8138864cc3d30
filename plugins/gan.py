"""Compressing a generator (GAN Compression, Li et al. 2020): what the existing terms lack is ``recon``.

A student generator G′ learns from a frozen teacher generator G on the same
input with three losses: the user's own GAN loss (their discriminator, their
loop: the task loss), the reconstruction ‖G′(x) − G(x)‖ to the teacher's output
(``recon``, here) and the intermediate feature distillation
Σ_l ‖f_l(G′_l(x)) − G_l(x)‖² with a learnable 1x1 conv f_l per layer pair,
which is ``fitnets`` (one term per layer pair; its ``auto`` connector is a 1x1
conv when the widths differ, ``connector: conv1x1`` always): nothing new is
needed for it. The recipe, as a config::

    terms:
      - {kind: recon, weight: 10}                                      # L1 to G(x)
      - {kind: fitnets, student: down2, teacher: down2, connector: conv1x1}
      - {kind: fitnets, student: up1, teacher: up1, connector: conv1x1}

The teacher's mode: kdhooks runs every teacher frozen, under ``no_grad`` and in
eval mode (it calls ``teacher.eval()`` before each call and restores every
submodule's own flag at ``close()``). A pix2pix generator is run at test time
as it was trained, dropout on and BatchNorm on the batch's statistics; pass
``teacher_call=as_trained()`` to run it so: dropout modules are switched to
training for the call, BatchNorm layers use the batch's statistics without
updating their running estimates (the frozen teacher's state never changes),
and everything is put back after the call.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import kdhooks

from ._layers import known, tensor_of


def recon_loss(student_output: torch.Tensor, teacher_output: torch.Tensor,
               distance: Literal["l1", "l2", "smooth_l1"] = "l1") -> torch.Tensor:
    """Mean |G′(x) − G(x)| (l1), mean squared (l2) or mean Huber with β = 1 (smooth_l1), over every element."""
    if student_output.shape != teacher_output.shape:
        raise ValueError(f"recon compares the outputs element by element, but the student's has shape "
                         f"{tuple(student_output.shape)} and the teacher's {tuple(teacher_output.shape)}")
    student_output, teacher_output = student_output.float(), teacher_output.float()
    if distance == "l1":
        return F.l1_loss(student_output, teacher_output)
    if distance == "l2":
        return F.mse_loss(student_output, teacher_output)
    return F.smooth_l1_loss(student_output, teacher_output)


class Recon(kdhooks.Term):
    """Reconstruction to the teacher's output (GAN Compression, Li et al. 2020): mean ‖G′(x) − G(x)‖₁.

    ``distance``: ``l1`` (the paper's, default), ``l2`` or ``smooth_l1``; a mean
    over every element, as GAN Compression's ``nn.L1Loss``, so its λ_recon
    ports as ``weight``. The taps default to the models' outputs (``""``); any
    output of one shape works (a selector ``:0`` for a generator returning a tuple).
    """

    student: str = ""
    teacher: str = ""
    distance: Literal["l1", "l2", "smooth_l1"] = "l1"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_output": kdhooks.Tap("student", self.student),
                "teacher_output": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        if known(shapes, "student_output", "teacher_output"):
            kdhooks.expect_same_shape(self, "student_output", "teacher_output", shapes,
                                      "the student generator makes what the teacher makes")

    def loss(self, ctx: kdhooks.LossContext, student_output: Any, teacher_output: Any) -> torch.Tensor:
        return recon_loss(tensor_of(student_output), tensor_of(teacher_output), self.distance)


@contextlib.contextmanager
def running_as_trained(module: nn.Module, dropout: bool = True, batch_statistics: bool = True) -> Iterator[None]:
    """Within the block, ``module``'s dropout is on and its BatchNorm layers normalize with the batch's statistics.

    The running estimates are neither used nor updated (each BatchNorm's buffers
    are set aside for the block), so a frozen teacher stays exactly as it was.
    Everything is put back on exit.
    """
    undo: list[Callable[[], None]] = []
    try:
        for m in module.modules():
            if dropout and isinstance(m, nn.modules.dropout._DropoutNd) and not m.training:
                m.training = True
                undo.append(lambda m=m: setattr(m, "training", False))
            if batch_statistics and isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training \
                    and m.running_mean is not None:
                mean, var = m.running_mean, m.running_var
                m.running_mean, m.running_var = None, None  # eval + no running estimates: batch statistics
                undo.append(lambda m=m, mean=mean, var=var: (setattr(m, "running_mean", mean),
                                                             setattr(m, "running_var", var)))
        yield
    finally:
        while undo:
            undo.pop()()


def as_trained(dropout: bool = True, batch_statistics: bool = True) -> Callable[[nn.Module, tuple, dict], Any]:
    """A ``teacher_call`` that runs a teacher as pix2pix runs its generator at test time (see the module's doc).

    ``kdhooks.Distiller(student, teacher, config, teacher_call=as_trained())``.
    """
    def call(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        with running_as_trained(module, dropout, batch_statistics):
            return module(*args, **kwargs)
    return call


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("recon", Recon)
