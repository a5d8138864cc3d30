"""A third-party kdhooks plugin in a dozen lines: the ``cosine`` term."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kdhooks


def cosine_loss(student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
    """1 − cos(student, teacher), per sample over its flattened output, averaged."""
    return (1 - F.cosine_similarity(student_output.flatten(1), teacher_output.flatten(1), dim=1)).mean()


class Cosine(kdhooks.Term):
    """Cosine distance between the student's and the teacher's outputs at two paths."""

    student: str = "logits"
    teacher: str = "logits"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_output": kdhooks.Tap("student", self.student),
                "teacher_output": kdhooks.Tap("teacher", self.teacher)}

    def loss(self, ctx, student_output, teacher_output):
        return cosine_loss(student_output, teacher_output)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("cosine", Cosine)
