"""Schedules for any number in a config: constant, linear, cosine, step, warmup."""
from __future__ import annotations

import math
from typing import Any

import kdhooks


class Constant(kdhooks.Schedule):
    """The same value at every step."""

    value: float

    def __call__(self, step: int) -> float:
        return self.value


class Linear(kdhooks.Schedule):
    """From ``start`` to ``end`` in ``steps`` steps, then ``end``."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        progress = min(max(step, 0), self.steps) / max(self.steps, 1)
        return self.start + (self.end - self.start) * progress


class Cosine(kdhooks.Schedule):
    """Half a cosine from ``start`` to ``end`` in ``steps`` steps (Loshchilov & Hutter 2017), then ``end``."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        progress = min(max(step, 0), self.steps) / max(self.steps, 1)
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * progress))


class Step(kdhooks.Schedule):
    """Piecewise constant: ``values[i]`` from ``milestones[i-1]`` on, or ``start * gamma**i``."""

    milestones: list[int]
    values: list[float] | None = None
    start: float | None = None
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.values is None and self.start is None:
            raise ValueError("a step schedule needs `values` (one more than milestones) or `start` (and `gamma`)")
        if self.values is not None and len(self.values) != len(self.milestones) + 1:
            raise ValueError(f"`values` needs {len(self.milestones) + 1} entries for {len(self.milestones)} milestones")
        if sorted(self.milestones) != list(self.milestones):
            raise ValueError("`milestones` must be increasing")

    def __call__(self, step: int) -> float:
        passed = sum(step >= m for m in self.milestones)
        if self.values is not None:
            return self.values[passed]
        return self.start * self.gamma ** passed


class Warmup(kdhooks.Schedule):
    """Linear from ``start`` to ``then`` over ``steps`` steps; ``then`` (a number or a schedule) runs after."""

    steps: int
    then: Any
    start: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.then, (int, float)) or callable(self.then)):
            raise ValueError("`then` is a number or a schedule")

    def _then(self, step: int) -> float:
        return float(self.then(step)) if callable(self.then) else float(self.then)

    def __call__(self, step: int) -> float:
        if step >= self.steps:
            return self._then(step - self.steps)
        return self.start + (self._then(0) - self.start) * step / max(self.steps, 1)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_schedule("constant", Constant)
    registry.add_schedule("linear", Linear)
    registry.add_schedule("cosine", Cosine)
    registry.add_schedule("step", Step)
    registry.add_schedule("warmup", Warmup)
