"""Matching intermediate features."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import kdhooks


def fitnets_loss(student_hint: torch.Tensor, teacher_guided: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the regressed student hint and the teacher's guided layer."""
    return F.mse_loss(student_hint.float(), teacher_guided.float())


class FitNets(kdhooks.Term):
    """FitNets: hints for thin deep nets (Romero et al. 2015): ||r(student hint) − teacher guided||²."""

    student: str
    teacher: str
    connector: str = "auto"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_hint": kdhooks.Tap("student", self.student),
                "teacher_guided": kdhooks.Tap("teacher", self.teacher)}

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        self.regressor = distiller.add_connector(self.name, shapes["student_hint"], shapes["teacher_guided"],
                                                 self.connector, location=f"{self.location}.connector")

    def loss(self, ctx: kdhooks.LossContext, student_hint: torch.Tensor,
             teacher_guided: torch.Tensor) -> torch.Tensor:
        return fitnets_loss(self.regressor(student_hint), teacher_guided)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("fitnets", FitNets)
