"""Schedules for any number in a config: constant, linear, cosine, step, warmup.

Each says in ``key_steps()`` where it takes its extreme values (its ends, its
milestones): the core validates a term at each, so a schedule that reaches a
value outside an option's range (a temperature going to 0) is refused at attach.
"""
from __future__ import annotations

import math
from typing import Any

import kdhooks


class _Checked(kdhooks.Schedule):
    """A built-in schedule: what its field types cannot say (an order, a length) is checked by ``problem()``."""

    @classmethod
    def validate(cls, values: dict[str, Any], location: str) -> Any:
        schedule = super().validate(values, location)
        found = schedule.problem()
        if found is not None:
            option, problem, fix = found
            raise kdhooks.ConfigError(f"{location}.{option}", problem, value=getattr(schedule, option), fix=fix)
        return schedule

    def problem(self) -> tuple[str, str, str] | None:
        """(option, problem, fix) for values that cannot work together; None when they can."""
        return None


class Constant(_Checked):
    """The same value at every step."""

    value: kdhooks.Finite

    def __call__(self, step: int) -> float:
        return self.value


class Linear(_Checked):
    """From ``start`` to ``end`` in ``steps`` steps, then ``end``."""

    start: kdhooks.Finite
    end: kdhooks.Finite
    steps: kdhooks.PositiveInt

    def __call__(self, step: int) -> float:
        progress = min(max(step, 0), self.steps) / max(self.steps, 1)
        return self.start + (self.end - self.start) * progress

    def key_steps(self) -> list[int]:
        return [0, self.steps]


class Cosine(_Checked):
    """Half a cosine from ``start`` to ``end`` in ``steps`` steps (Loshchilov & Hutter 2017), then ``end``."""

    start: kdhooks.Finite
    end: kdhooks.Finite
    steps: kdhooks.PositiveInt

    def __call__(self, step: int) -> float:
        progress = min(max(step, 0), self.steps) / max(self.steps, 1)
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * progress))

    def key_steps(self) -> list[int]:
        return [0, self.steps]


class Step(_Checked):
    """Piecewise constant: ``values[i]`` from ``milestones[i-1]`` on, or ``start * gamma**i``.

    Milestones are strictly increasing steps from 1 on: a milestone at 0 would
    hide the first value, a repeated or unsorted one a value in between.
    """

    milestones: list[kdhooks.PositiveInt]
    values: list[kdhooks.Finite] | None = None
    start: kdhooks.Finite | None = None
    gamma: kdhooks.NonNegative = 0.1

    def problem(self) -> tuple[str, str, str] | None:
        count = len(self.milestones)
        if self.values is None and self.start is None:
            return ("values", "a step schedule needs `values` (one more than milestones) or `start` (and `gamma`)",
                    f"add `values: [...]` with {count + 1} numbers")
        if self.values is not None and len(self.values) != count + 1:
            return ("values", f"`values` needs {count + 1} entries for {count} milestones, got {len(self.values)}",
                    "list one value before the first milestone and one after each")
        if any(a >= b for a, b in zip(self.milestones, self.milestones[1:])):
            return ("milestones", f"milestones must be strictly increasing steps, got {self.milestones}",
                    f"list each step once, in increasing order: {sorted(set(self.milestones))}")
        return None

    def __call__(self, step: int) -> float:
        passed = sum(step >= m for m in self.milestones)
        if self.values is not None:
            return self.values[passed]
        return self.start * self.gamma ** passed

    def key_steps(self) -> list[int]:
        return [0, *self.milestones]


class Warmup(_Checked):
    """Linear from ``start`` to ``then`` over ``steps`` steps; ``then`` (a number or a schedule) runs after."""

    steps: kdhooks.PositiveInt
    then: Any
    start: kdhooks.Finite = 0.0

    def problem(self) -> tuple[str, str, str] | None:
        then = self.then
        if isinstance(then, kdhooks.Schedule):
            return None
        if isinstance(then, bool) or not isinstance(then, (int, float)) or not math.isfinite(then):
            return ("then", f"then must be a finite number or a schedule, got {then!r}",
                    "set then to a number, or a schedule such as `{schedule: cosine, start: 1, end: 0, steps: 1000}`")
        return None

    def _then(self, step: int) -> float:
        return float(self.then(step)) if callable(self.then) else float(self.then)

    def __call__(self, step: int) -> float:
        if step >= self.steps:
            return self._then(step - self.steps)
        return self.start + (self._then(0) - self.start) * step / max(self.steps, 1)

    def key_steps(self) -> list[int]:
        # the ramp's ends, then the nested schedule's own key steps shifted by the warmup
        nested = self.then.key_steps() if isinstance(self.then, kdhooks.Schedule) else [0]
        return [0, *(self.steps + s for s in nested)]


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_schedule("constant", Constant)
    registry.add_schedule("linear", Linear)
    registry.add_schedule("cosine", Cosine)
    registry.add_schedule("step", Step)
    registry.add_schedule("warmup", Warmup)
