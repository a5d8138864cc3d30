"""Matching gradients: where a small change of the input would change the loss most."""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

import kdhooks

from ._layers import known


def grad_at_loss(student_gradient: torch.Tensor, teacher_gradient: torch.Tensor, beta: float = 1.0,
                 form: Literal["paper", "normalized"] = "paper") -> torch.Tensor:
    """Gradient-based attention transfer between J_S = ∂L_S/∂x and J_T = ∂L_T/∂x.

    ``paper`` (Zagoruyko & Komodakis 2017, eq. 3, squared as its eq. 4
    differentiates it): β/2 · ‖J_S − J_T‖²₂ over every element of the gradients
    as given (for a batch, the batch's J: its squared differences summed).
    ``normalized`` (kdhooks' own, not the paper's): β/2 · ‖J_S/‖J_S‖₂ −
    J_T/‖J_T‖₂‖₂ per sample, not squared, averaged over samples.
    """
    if form == "normalized":
        student_map = F.normalize(student_gradient.float().flatten(1), dim=1)
        teacher_map = F.normalize(teacher_gradient.float().flatten(1), dim=1)
        return beta / 2 * (student_map - teacher_map).norm(dim=1).mean()
    return beta / 2 * (student_gradient.float() - teacher_gradient.float()).pow(2).sum()


class GradAT(kdhooks.Term):
    """Gradient-based attention transfer (Zagoruyko & Komodakis 2017): β/2 ‖J_S − J_T‖²₂, J = ∂L/∂x.

    J_S is the gradient of the task loss given to ``kd()`` with respect to the
    student's input (``student: ""``) or a feature, kept in the graph (double
    backpropagation); J_T is the teacher's, from ``Distiller(teacher_loss=...)``
    (cross-entropy on ``labels`` by default), the teacher frozen. ``form:
    paper`` (default) is the paper's formula on the raw gradients of the batch's
    loss: with a batch-mean loss each sample's J is 1/B of its own, so this is
    1/B × the per-example loss of the paper averaged over the batch.
    ``form: normalized`` is kdhooks' own variant (not the paper's): β/2 ·
    ‖J_S/‖J_S‖ − J_T/‖J_T‖‖₂ per sample, unsquared, averaged, which ignores the
    gradients' scale (docs/conventions.md). The paper sets β per experiment;
    β = 1 here. Each step costs about one more student backward and a teacher
    backward (docs/methods.md).
    """

    student: str = ""
    teacher: str = ""
    beta: kdhooks.NonNegative = 1.0
    form: Literal["paper", "normalized"] = "paper"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_gradient": kdhooks.Tap("student", self.student, "grad", option="student"),
                "teacher_gradient": kdhooks.Tap("teacher", self.teacher, "grad", option="teacher")}

    def check(self, shapes: dict[str, Any]) -> None:
        if not known(shapes, "student_gradient", "teacher_gradient"):
            return
        student = kdhooks.feature_shape(shapes["student_gradient"])
        teacher = kdhooks.feature_shape(shapes["teacher_gradient"])
        if student != teacher:
            raise kdhooks.ConfigError(self.location, f"grad_at compares gradient maps element by element; the "
                                      f"student's {self.student or 'input'!r} has shape {student} and the teacher's "
                                      f"{self.teacher or 'input'!r} {teacher}",
                                      value={"student": self.student, "teacher": self.teacher},
                                      fix="match input gradients (student: '', teacher: '') or layers of equal shape")

    def loss(self, ctx: kdhooks.LossContext, student_gradient: torch.Tensor,
             teacher_gradient: torch.Tensor) -> torch.Tensor:
        return grad_at_loss(student_gradient, teacher_gradient, self.beta, self.form)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("grad_at", GradAT)
