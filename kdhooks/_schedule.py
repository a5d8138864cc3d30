"""Schedules: any number in a config may change with the step."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._options import Options

if TYPE_CHECKING:
    from ._registry import Registry


class Schedule(Options):
    """A value as a function of the step; subclasses define ``__call__``.

    Written inline in a config wherever a number goes:
    ``temperature: {schedule: cosine, start: 8, end: 2, steps: 5000}``.
    """

    def __call__(self, step: int) -> float:
        raise TypeError(f"{type(self).__name__} does not define __call__(step)")

    def key_steps(self) -> list[int]:
        """Steps at which the schedule takes its extreme values: a term is validated at each of them."""
        return [0]


def is_schedule_spec(value: Any) -> bool:
    return isinstance(value, dict) and "schedule" in value


def parse_schedule(spec: dict[str, Any], registry: Registry, location: str) -> Schedule:
    """A Schedule from its config mapping; nested schedules (warmup's ``then``) included."""
    spec = dict(spec)
    kind = spec.pop("schedule")
    schedule_class = registry.lookup("schedule", kind, f"{location}.schedule")
    for key, value in spec.items():
        if is_schedule_spec(value):
            spec[key] = parse_schedule(value, registry, f"{location}.{key}")
    return schedule_class.validate(spec, location)


def value_at(value: float | Schedule, step: int) -> float:
    return float(value(step)) if callable(value) else float(value)
