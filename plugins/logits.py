"""Matching the teacher's output logits. Constants against the reference code: docs/conventions.md."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import kdhooks

from ._layers import known


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) · T², averaged over samples (and tokens)."""
    classes = student_logits.shape[-1]
    student_log_probs = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


def logits_l2_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between logits (Ba & Caruana 2014; the T → ∞ limit of KD)."""
    if student_logits.shape != teacher_logits.shape:
        # mse_loss would broadcast (8, 10) against (8, 1) with only a warning
        raise ValueError(f"logits_l2 compares logits element by element, but the student's have shape "
                         f"{tuple(student_logits.shape)} and the teacher's {tuple(teacher_logits.shape)}")
    return F.mse_loss(student_logits.float(), teacher_logits.float())


def check_logits(term: kdhooks.Term, shapes: dict[str, Any]) -> None:
    """Same classes and the same leading dims: the loss flattens rows, which would hide a batch mismatch."""
    if known(shapes, "student_logits", "teacher_logits"):
        kdhooks.expect_same_classes(term, "student_logits", "teacher_logits", shapes)


class _LogitsTerm(kdhooks.Term):
    """A term on the student's and the teacher's logits; ``student``/``teacher`` say where each is read."""

    student: str = "logits"
    teacher: str = "logits"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_logits": kdhooks.Tap("student", self.student),
                "teacher_logits": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        check_logits(self, shapes)


class KD(_LogitsTerm):
    """Distilling the knowledge in a neural network (Hinton, Vinyals & Dean 2015).

    T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over samples: RepDistiller's
    ``DistillKL`` and mdistiller's ``kd_loss`` exactly, so their weights port
    as they are (docs/conventions.md).
    """

    temperature: kdhooks.Positive = 4.0
    def loss(self, ctx: kdhooks.LossContext, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
             ignore_index: int = -100) -> torch.Tensor:
    """α·TCKD + β·NCKD, each a KL(teacher ‖ student) · T², averaged over samples (and tokens).

    TCKD compares the binary (target, all other classes) probabilities, NCKD the
    distributions over the non-target classes alone. Rows labelled
    ``ignore_index`` take no part.
    """
    classes = student_logits.shape[-1]
    student_logits = student_logits.float().reshape(-1, classes) / temperature
    teacher_logits = teacher_logits.float().reshape(-1, classes) / temperature
    labels = labels.reshape(-1)
    keep = labels != ignore_index
    student_logits, teacher_logits, labels = student_logits[keep], teacher_logits[keep], labels[keep]
    target = F.one_hot(labels, classes).bool()

    def binary_and_others(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = F.log_softmax(logits, dim=-1)
        others = logits[~target].view(len(logits), classes - 1)
        # log(1 − p_target) = logsumexp(non-target logits) − logsumexp(all logits), stable for p_target → 1
        log_rest = torch.logsumexp(others, -1) - torch.logsumexp(logits, -1)
        binary = torch.stack([log_probs[target], log_rest], dim=-1)
        return binary, F.log_softmax(others, dim=-1)

    student_binary, student_others = binary_and_others(student_logits)
    teacher_binary, teacher_others = binary_and_others(teacher_logits)
    tckd = F.kl_div(student_binary, teacher_binary, reduction="batchmean", log_target=True)
    nckd = F.kl_div(student_others, teacher_others, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * temperature**2


class LogitsL2(_LogitsTerm):
    """Do deep nets really need to be deep? (Ba & Caruana 2014): ||z_s − z_t||² on the logits.

    The mean over samples and classes; the paper's ½ Σ over classes (averaged
    over samples) is C/2 times it, so a weight from the paper is × C/2 here
    (docs/conventions.md).
    """

    def loss(self, ctx: kdhooks.LossContext, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor) -> torch.Tensor:
        return logits_l2_loss(student_logits, teacher_logits)


class DKD(_LogitsTerm):
    """Decoupled knowledge distillation (Zhao et al. 2022): min((step + 1)/warmup, 1) · (α·TCKD + β·NCKD).

    Defaults are the paper's CIFAR-100 ones (α = 1, β = 8, T = 4); it ramps the
    loss in over its first 20 epochs: set ``warmup`` to that many steps. Equal
    to mdistiller's ``dkd_loss`` (docs/conventions.md).
    """

    alpha: kdhooks.NonNegative = 1.0
    beta: kdhooks.NonNegative = 8.0
    temperature: kdhooks.Positive = 4.0
    warmup: kdhooks.NonNegativeInt = 0
    def loss(self, ctx: kdhooks.LossContext, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor) -> torch.Tensor:
        if ctx.labels is None:
            raise ValueError(f"term {self.name!r} (dkd) separates the target class: call kd(task_loss, labels=y)")
        # the paper's min(epoch / warmup, 1) with 1-based epochs: the first step already counts
        ramp = min((ctx.step + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0
        return ramp * dkd_loss(kdhooks.logits_of(student_logits), kdhooks.logits_of(teacher_logits), ctx.labels,
                               self.alpha, self.beta, self.temperature)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("kd", KD)
    registry.add_term("logits_l2", LogitsL2)
    registry.add_term("dkd", DKD)
