"""Matching the teacher's output logits."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

import kdhooks


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) · T², averaged over samples (and tokens)."""
    classes = student_logits.shape[-1]
    student_log_probs = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


def logits_l2_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between logits (Ba & Caruana 2014; the T → ∞ limit of KD)."""
    return F.mse_loss(student_logits.float(), teacher_logits.float())


class KD(kdhooks.Term):
    """Distilling the knowledge in a neural network (Hinton, Vinyals & Dean 2015)."""

    temperature: float = 4.0
    variant: Literal["kl", "l2"] = "kl"
    student: str = "logits"
    teacher: str = "logits"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_logits": kdhooks.Tap("student", self.student),
                "teacher_logits": kdhooks.Tap("teacher", self.teacher)}

    def loss(self, ctx: kdhooks.LossContext, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor) -> torch.Tensor:
        if self.variant == "l2":
            return logits_l2_loss(student_logits, teacher_logits)
        return kd_loss(student_logits, teacher_logits, self.temperature)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("kd", KD)
