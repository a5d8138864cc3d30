"""The built-in schedules (plugins/schedules.py) return the right values over steps."""
import math

import pytest

from kdhooks._manager import plugin_manager


def schedule(spec):
    _, registry = plugin_manager()
    from kdhooks._schedule import parse_schedule

    return parse_schedule(spec, registry, "test")


def test_constant_linear_cosine_step():
    assert [schedule({"schedule": "constant", "value": 3})(s) for s in (0, 100)] == [3, 3]
    linear = schedule({"schedule": "linear", "start": 1, "end": 0, "steps": 4})
    assert [linear(s) for s in range(6)] == [1, 0.75, 0.5, 0.25, 0, 0]
    cosine = schedule({"schedule": "cosine", "start": 8, "end": 2, "steps": 10})
    assert cosine(0) == 8 and cosine(10) == 2 and cosine(20) == 2
    assert cosine(5) == pytest.approx(5.0) and cosine(3) == pytest.approx(2 + 6 * 0.5 * (1 + math.cos(math.pi * 0.3)))
    step = schedule({"schedule": "step", "milestones": [2, 4], "values": [1, 0.5, 0]})
    assert [step(s) for s in range(6)] == [1, 1, 0.5, 0.5, 0, 0]
    decay = schedule({"schedule": "step", "milestones": [3], "start": 1.0, "gamma": 0.1})
    assert decay(2) == 1.0 and decay(3) == pytest.approx(0.1)


def test_warmup_composes_with_another_schedule():
    warm = schedule({"schedule": "warmup", "steps": 4, "then": {"schedule": "linear", "start": 2, "end": 0, "steps": 2}})
    assert [warm(s) for s in range(8)] == [0, 0.5, 1.0, 1.5, 2, 1, 0, 0]
    assert schedule({"schedule": "warmup", "steps": 2, "then": 1, "start": 0.5})(1) == 0.75
