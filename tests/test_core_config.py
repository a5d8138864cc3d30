"""Config validation: every mistake is a ConfigError naming the place, the value and the fix."""
import pytest
import torch

import kdhooks
from _models import batch, pair


def attach(config, **kwargs):
    student, teacher = pair()
    x, _ = batch(2)
    return kdhooks.Distiller(student, teacher, config, example_inputs=x, **kwargs)


def error_of(config, **kwargs) -> kdhooks.ConfigError:
    with pytest.raises(kdhooks.ConfigError) as info:
        attach(config, **kwargs).close()
    return info.value


def test_unknown_kind_suggests_the_closest_names():
    error = error_of({"terms": [{"kind": "fitnet", "student": "stage2", "teacher": "stage2"}]})
    assert error.location == "terms[0].kind" and error.value == "fitnet"
    assert "'fitnets'" in error.fix


def test_unknown_module_path_suggests_the_closest_paths():
    error = error_of({"terms": [{"kind": "fitnets", "student": "stage9", "teacher": "stage2"}]})
    assert error.location == "terms[0].student" and error.value == "stage9"
    assert "'stage1'" in error.fix or "'stage2'" in error.fix
    assert "not a module of the student" in str(error)


def test_unknown_option_names_the_valid_ones():
    error = error_of({"terms": [{"kind": "kd", "temprature": 4}]})
    assert error.location == "terms[0].temprature"
    assert "'temperature'" in error.fix


def test_bad_value_type_names_the_option():
    error = error_of({"terms": [{"kind": "kd", "temperature": "hot"}]})
    assert error.location == "terms[0].temperature" and error.value == "hot"


def test_shapes_no_connector_can_join_name_both_shapes():
    error = error_of({"terms": [{"kind": "fitnets", "student": "stage2", "teacher": "fc"}]})
    assert error.location == "terms[0].connector"
    assert "(2, 8, 4, 4)" in str(error) and "(2, 10)" in str(error)


def test_an_explicit_connector_that_cannot_join_names_the_one_that_would():
    error = error_of({"terms": [{"kind": "fitnets", "student": "stage2", "teacher": "stage2", "connector": "identity"}]})
    assert "(2, 8, 4, 4)" in str(error) and "(2, 16, 4, 4)" in str(error)
    assert error.fix.startswith("use connector: ") and error.fix.split(": ")[1] in ("auto", "conv1x1", "conv1x1_bn")


def test_unknown_schedule_and_bad_schedule_options():
    error = error_of({"terms": [{"kind": "kd", "temperature": {"schedule": "cosin", "start": 4, "end": 1, "steps": 9}}]})
    assert error.location == "terms[0].temperature.schedule" and "'cosine'" in error.fix
    error = error_of({"terms": [{"kind": "kd", "weight": {"schedule": "step", "milestones": [5], "values": [1]}}]})
    assert error.location.startswith("terms[0].weight")


def test_unknown_top_level_key_and_missing_file(tmp_path):
    error = error_of({"term": []})
    assert error.value == "term" and "'terms'" in error.fix
    error = error_of(str(tmp_path / "missing.yaml"))
    assert "not found" in str(error)


def test_yaml_file_and_string_configs(tmp_path):
    path = tmp_path / "kd.yaml"
    path.write_text("task_weight: 0.2\nterms:\n  - kind: kd\n    temperature: 2\n")
    for source in (path, str(path), path.read_text()):
        with attach(source) as kd:
            assert kd.terms[0].temperature == 2 and kd.task_weight == 0.2


def test_unknown_role_and_selector_mismatch():
    class BadTerm(kdhooks.Term):
        def taps(self):
            return {"a": kdhooks.Tap("teachr", "fc")}

        def loss(self, ctx, a):
            return a.sum()

    error = error_of({"terms": [BadTerm()]})
    assert "'teacher'" in error.fix

    class BadSelector(kdhooks.Term):
        def taps(self):
            return {"a": kdhooks.Tap("student", "fc:logits")}

        def loss(self, ctx, a):
            return a.sum()

    error = error_of({"terms": [BadSelector()]})
    assert error.value == "fc:logits"


def test_two_terms_of_a_kind_get_indexed_names_and_duplicates_are_refused():
    config = {"terms": [{"kind": "kd"}, {"kind": "kd", "temperature": 2}]}
    with attach(config) as kd:
        assert [t.name for t in kd.terms] == ["kd[0]", "kd[1]"]
    error = error_of({"terms": [{"kind": "kd", "name": "a"}, {"kind": "kd", "name": "a"}]})
    assert error.location == "terms[1].name"


def test_unknown_plugin_module_and_disabled_plugin():
    error = error_of({"plugins": ["no_such_module_xyz"]})
    assert error.location == "plugins[0]"
    error = error_of({"disable_plugins": ["logit"]})
    assert "'logits'" in error.fix
    error = error_of({"disable_plugins": ["features"], "terms": [{"kind": "fitnets", "student": "stage2", "teacher": "stage2"}]})
    assert error.location == "terms[0].kind"


def test_terms_from_python_objects():
    from kdhooks.plugins.logits import KD

    with attach({"terms": [KD(temperature=2.0, weight=0.5)]}) as kd:
        assert kd.terms[0].name == "kd"
        student = kd.student
        x, y = batch()
        loss = kd(torch.nn.functional.cross_entropy(student(x), y))
        assert torch.isfinite(loss)
