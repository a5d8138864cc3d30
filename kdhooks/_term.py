"""The loss term: options as typed fields, taps, a formula."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ._errors import ConfigError, did_you_mean
from ._options import Options
from ._schedule import Schedule, value_at
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from ._context import LossContext
    from ._distiller import Distiller
    from ._taps import Tap


class Term(Options):
    """One configured loss term; a plugin subclasses it and fills three methods.

    ``taps()`` names what to record as ``{argument name: Tap}``, ``build()`` makes
    connectors from the dry pass's shapes, and ``loss(ctx, **captures)`` is the
    paper's formula on the captured tensors. The Distiller multiplies the result
    by ``weight``; any numeric option, ``weight`` included, may be a schedule.
    ``teacher_role`` picks, among several teachers (``Distiller(student,
    {"resnet": t1, "vit": t2})``), the one that the term's ``teacher`` taps read.
    """

    kind: ClassVar[str] = ""
    name: str = ""
    weight: float = 1.0
    teacher_role: str = "teacher"

    # set by the Distiller
    location: ClassVar[str] = "terms"

    def taps(self) -> dict[str, Tap]:
        """What to record, by the argument name ``loss`` receives it under."""
        return {}

    def build(self, distiller: Distiller, shapes: dict[str, Any]) -> None:
        """Make connectors or heads once the shapes of the taps are known."""

    def loss(self, ctx: LossContext, **captures: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """The unweighted loss, or named parts of it, from this step's captures."""
        raise TypeError(f"term {type(self).__name__} does not define loss()")

    # --- lifecycle, as pluggy hooks -------------------------------------------------

    def role(self, role: str) -> str:
        """The attached model that this term's ``role`` names: ``teacher`` is ``teacher_role``."""
        return self.teacher_role if role == "teacher" else role

    def scheduled(self) -> dict[str, Schedule]:
        """The options that follow a schedule, by option name."""
        return {k: v for k, v in vars(self).items() if isinstance(v, Schedule)}

    def set_step(self, step: int) -> None:
        for option, schedule in self._schedules.items():
            setattr(self, option, value_at(schedule, step))

    def _option_holding(self, path: str, role: str) -> str | None:
        """The option a tap's path came from (for error locations): the one named after its role first."""
        holding = [option for option in self.option_names()
                   if option != "name" and getattr(self, option, None) == path]
        return role if role in holding else holding[0] if holding else None

    @hookimpl
    def kdhooks_configure(self, distiller: Distiller) -> None:
        self._schedules = self.scheduled()
        self.set_step(distiller.step)
        if self.teacher_role != "teacher" and self.teacher_role not in distiller.roles:
            raise ConfigError(f"{self.location}.teacher_role", f"no teacher is attached as {self.teacher_role!r}",
                              value=self.teacher_role, fix=did_you_mean(self.teacher_role, distiller.roles)
                              or f"attached: {', '.join(distiller.roles)}")
        declared = self.taps()
        self._taps = {name: dataclasses.replace(tap, role=self.teacher_role) if tap.role == "teacher" else tap
                      for name, tap in declared.items()}
        for name, tap in self._taps.items():
            option = tap.option or self._option_holding(tap.path, declared[name].role)
            where = f"{self.location}.{option}" if option else self.location
            distiller.add_tap(tap, location=where)

    @hookimpl
    def kdhooks_build(self, distiller: Distiller, shapes: dict[Any, Any]) -> None:
        if type(self).build is Term.build:
            return
        missing = [name for name, tap in self._taps.items() if tap not in shapes]
        if missing:
            raise ConfigError(self.location, f"term {self.name!r} sizes its connectors from the "
                              f"shapes of {missing}, which are not known",
                              fix="pass example_inputs= to Distiller so a dry pass can record them")
        self.build(distiller, {name: shapes[tap] for name, tap in self._taps.items()})

    @hookimpl
    def kdhooks_losses(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            # switched off by its schedule: keep its parameters in the graph for DDP, cheaply
            return {self.name: ctx.distiller.zero_touching(self.name)}
        captures = {name: ctx[tap] for name, tap in self._taps.items()}
        value = self.loss(ctx, **captures)
        if isinstance(value, dict):
            return {f"{self.name}.{part}" if part else self.name: _weighted(self.weight, v)
                    for part, v in value.items()}
        return {self.name: _weighted(self.weight, value)}


def _weighted(weight: float, value: torch.Tensor) -> torch.Tensor:
    # weight 1 is the common case: no scalar op in the graph for it
    return value if weight == 1 else weight * value
