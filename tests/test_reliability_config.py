"""No silent wrong result (#10): every number option and schedule is checked against its valid range at attach."""
import math

import pytest

import kdhooks
from kdhooks._manager import plugin_manager
from _models import batch, pair


def error_of(config) -> kdhooks.ConfigError:
    student, teacher = pair()
    with pytest.raises(kdhooks.ConfigError) as info:
        kdhooks.Distiller(student, teacher, config, example_inputs=batch(2)[0]).close()
    assert type(info.value) is kdhooks.ConfigError
    return info.value


def term_error(**options) -> kdhooks.ConfigError:
    return error_of({"terms": [options]})


@pytest.mark.parametrize("value", [-1, 0, -0.5])
def test_a_temperature_must_be_greater_than_zero(value):
    error = term_error(kind="kd", temperature=value)
    assert error.location == "terms[0].temperature" and error.value == value
    assert f"temperature must be a number greater than 0, got {value}" in error.problem
    assert error.fix == "set temperature to a number greater than 0"


@pytest.mark.parametrize("value", ["yes", "4", True, False])
def test_a_bool_or_a_string_is_not_a_number(value):
    error = term_error(kind="kd", temperature=value)
    assert error.location == "terms[0].temperature" and error.value == value
    assert "temperature must be a valid number" in error.problem and error.fix == "set temperature to a valid number"
    if isinstance(value, bool):
        assert "true/false is not a number" in error.problem


def test_a_nan_weight_and_an_infinite_task_weight():
    error = term_error(kind="kd", weight=float("nan"))
    assert error.location == "terms[0].weight" and math.isnan(error.value)
    assert "weight must be a finite number" in error.problem and error.fix == "set weight to a finite number"
    error = error_of({"task_weight": float("inf"), "terms": [{"kind": "kd"}]})
    assert error.location == "task_weight" and error.value == float("inf")
    assert "finite number" in str(error)


def test_a_list_of_kinds_is_one_term_per_kind():
    error = term_error(kind=["kd"])
    assert error.location == "terms[0].kind" and error.value == ["kd"]
    assert "one name" in error.problem and error.fix == "write one term per kind, e.g. `kind: kd`"


@pytest.mark.parametrize("options, option, says", [
    ({"kind": "dkd", "alpha": -1}, "alpha", "greater than or equal to 0"),
    ({"kind": "dkd", "beta": float("inf")}, "beta", "finite number"),
    ({"kind": "dkd", "warmup": 2.5}, "warmup", "valid integer"),
    ({"kind": "at", "student": "stage2", "teacher": "stage2", "p": 0}, "p", "greater than 0"),
    ({"kind": "at", "student": "stage2", "teacher": "stage2", "beta": -1000}, "beta", "greater than or equal to 0"),
    ({"kind": "ab", "student": "stage1.2", "teacher": "stage1.2", "margin": -1}, "margin", "greater than or equal"),
    ({"kind": "mmd", "student": "stage2", "teacher": "stage2", "degree": 0}, "degree", "greater than 0"),
    ({"kind": "ft", "student": "stage2", "teacher": "stage2", "rate": 0}, "rate", "greater than 0"),
    ({"kind": "ft", "student": "stage2", "teacher": "stage2", "paraphraser_steps": -1}, "paraphraser_steps",
     "greater than or equal to 0"),
    ({"kind": "rkd", "student": "fc", "teacher": "fc", "angle_weight": -50}, "angle_weight", "greater than or equal"),
    ({"kind": "sp", "student": "stage3", "teacher": "stage3", "gamma": "3000"}, "gamma", "valid number"),
    ({"kind": "grad_at", "beta": -1}, "beta", "greater than or equal to 0"),
    ({"kind": "lm_kd", "beta": 1.5}, "beta", "less than or equal to 1"),
    ({"kind": "lm_kd", "chunk_size": 0}, "chunk_size", "greater than 0"),
    ({"kind": "dml", "copies": 1, "temperature": 0}, "temperature", "greater than 0"),
    ({"kind": "one", "split": "stage2", "heads": ["fc"], "branches": 1}, "branches", "greater than or equal to 2"),
    ({"kind": "byot", "stages": ["stage1"], "classifier": "fc", "alpha": 2}, "alpha", "less than or equal to 1"),
    ({"kind": "det_feature_imitation", "ratio": 1}, "ratio", "less than 1"),
    ({"kind": "det_cls_kd", "classes": 0}, "classes", "greater than 0"),
    ({"kind": "ld", "temperature": -10}, "temperature", "greater than 0"),
])
def test_every_built_in_option_has_its_range(options, option, says):
    error = term_error(**options)
    assert error.location == f"terms[0].{option}"
    assert f"{option} must be" in error.problem and says in error.problem and says in error.fix


# --- schedules -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine", "warmup"])
@pytest.mark.parametrize("steps, says", [(0, "greater than 0"), (-5, "greater than 0"), (2.5, "valid integer"),
                                         (True, "valid integer")])
def test_schedule_steps_are_a_positive_integer(kind, steps, says):
    spec = {"schedule": kind, "steps": steps, **({"then": 4} if kind == "warmup" else {"start": 8, "end": 2})}
    error = term_error(kind="kd", temperature=spec)
    assert error.location == "terms[0].temperature.steps" and error.value == steps
    assert f"steps must be a {'number ' if 'greater' in says else ''}{says}" in error.problem and says in error.fix


def test_a_task_weight_schedule_with_negative_steps():
    error = error_of({"task_weight": {"schedule": "linear", "start": 1, "end": 0, "steps": -5}})
    assert error.location == "task_weight.steps" and "greater than 0, got -5" in error.problem


@pytest.mark.parametrize("milestones", [[5, 3], [3, 3]])
def test_step_milestones_are_strictly_increasing(milestones):
    error = term_error(kind="kd", weight={"schedule": "step", "milestones": milestones, "values": [1, 0.5, 0]})
    assert error.location == "terms[0].weight.milestones" and error.value == milestones
    assert "strictly increasing" in error.problem and "increasing order" in error.fix


def test_step_values_and_milestones_agree():
    error = term_error(kind="kd", weight={"schedule": "step", "milestones": [3], "values": [1, 0.5, 0]})
    assert error.location == "terms[0].weight.values" and "needs 2 entries for 1 milestones, got 3" in error.problem
    error = term_error(kind="kd", weight={"schedule": "step", "milestones": [3]})
    assert error.location == "terms[0].weight.values" and "`values`" in error.problem


def test_a_cosine_temperature_that_ends_at_zero_is_refused_at_attach():
    error = term_error(kind="kd", temperature={"schedule": "cosine", "start": 4, "end": 0, "steps": 100})
    assert error.location == "terms[0].temperature"
    assert error.problem.startswith("at step 100 its schedule gives 0.0")
    assert "temperature must be a number greater than 0" in error.problem and "range" in error.fix


def test_a_warmup_is_checked_at_its_nested_schedules_key_steps():
    then = {"schedule": "linear", "start": 4, "end": 0, "steps": 50}
    error = term_error(kind="kd", temperature={"schedule": "warmup", "steps": 10, "start": 1, "then": then})
    assert error.location == "terms[0].temperature" and error.problem.startswith("at step 60 its schedule gives 0.0")
    error = term_error(kind="kd", weight={"schedule": "warmup", "steps": 10, "then": "high"})
    assert error.location == "terms[0].weight.then" and "finite number or a schedule" in error.problem
    error = term_error(kind="kd", weight={"schedule": "warmup", "steps": 10, "then": {**then, "steps": 0}})
    assert error.location == "terms[0].weight.then.steps"


def test_a_step_schedule_is_checked_at_each_milestone():
    weight = {"schedule": "step", "milestones": [4, 8], "values": [1.0, float("nan"), 0.0]}
    error = term_error(kind="kd", weight=weight)
    # values themselves are finite numbers: the validator refuses the NaN in the list
    assert error.location.startswith("terms[0].weight.values") and "finite number" in error.problem
    error = term_error(kind="dkd", alpha={"schedule": "step", "milestones": [4, 8], "values": [1.0, -1.0, 0.0]})
    assert error.location == "terms[0].alpha" and error.problem.startswith("at step 4 its schedule gives -1.0")


def schedule(spec):
    from kdhooks._schedule import parse_schedule

    return parse_schedule(spec, plugin_manager()[1], "test")


def test_key_steps_are_where_each_schedule_takes_its_extreme_values():
    assert schedule({"schedule": "constant", "value": 2}).key_steps() == [0]
    assert schedule({"schedule": "linear", "start": 1, "end": 0, "steps": 7}).key_steps() == [0, 7]
    assert schedule({"schedule": "cosine", "start": 1, "end": 0, "steps": 9}).key_steps() == [0, 9]
    assert schedule({"schedule": "step", "milestones": [2, 5], "start": 1}).key_steps() == [0, 2, 5]
    nested = {"schedule": "step", "milestones": [3], "values": [1, 0]}
    assert schedule({"schedule": "warmup", "steps": 4, "then": nested}).key_steps() == [0, 4, 7]
    assert schedule({"schedule": "warmup", "steps": 4, "then": 1.0}).key_steps() == [0, 4]


def test_valid_schedules_keep_their_values():
    # defaults and formulas unchanged: the values of a valid schedule are what they were
    assert [schedule({"schedule": "linear", "start": 1, "end": 0, "steps": 4})(s) for s in range(6)] == \
        [1, 0.75, 0.5, 0.25, 0, 0]
    decay = schedule({"schedule": "step", "milestones": [3], "start": 1.0})
    assert decay(2) == 1.0 and decay(3) == pytest.approx(0.1)
    student, teacher = pair()
    config = {"terms": [{"kind": "kd", "temperature": {"schedule": "cosine", "start": 8, "end": 2, "steps": 10}},
                        {"kind": "dkd", "warmup": 0}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=batch(2)[0]) as kd:
        assert kd.terms[0].temperature == 8 and kd.terms[1].alpha == 1.0 and kd.terms[1].beta == 8.0
