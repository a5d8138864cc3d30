"""Third-party loss plugins that break the contract (#10): every error names the term, its kind and the plugin.

The plugin here is a real one: a module with a ``kdhooks_register`` hook, declared in the ``kdhooks``
entry-point group of an installed distribution (``kdhooks-badterms 0.3.1``, a dist-info folder on
``sys.path``), found by the same discovery as every installed plugin.
"""
import importlib
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import kdhooks
from kdhooks._manager import plugin_manager
from _models import batch, pair
from kdhooks._manager import installed_plugins

PLUGIN = "badterms (kdhooks-badterms 0.3.1)"

SOURCE = '''
"""A third-party plugin whose terms misbehave in every way a plugin can."""
import torch
import kdhooks


class Misbehaving(kdhooks.Term):
    """Mean squared logits distance; ``returns`` picks how it gets the return value wrong."""

    returns: str = "right"

    def taps(self):
        return {"student_logits": kdhooks.Tap("student", "logits"),
                "teacher_logits": kdhooks.Tap("teacher", "logits")}

    def loss(self, ctx, student_logits, teacher_logits):
        squared = (student_logits - teacher_logits).pow(2)
        if self.returns == "raises":
            raise ValueError("boom: the plugin's own bug")
        return {
            "right": lambda: squared.mean(),
            "none": lambda: None,
            "float": lambda: squared.mean().item(),
            "vector": lambda: squared.mean(1),
            "one_element": lambda: squared.mean().reshape(1),
            "dict_with_float": lambda: {"mse": squared.mean(), "count": 3.0},
            "dict_with_vector": lambda: {"mse": squared.mean(), "per_sample": squared.mean(1)},
            "detached": lambda: squared.mean().detach(),
            "item": lambda: torch.tensor(squared.mean().item()),
            "dict_detached": lambda: {"mse": squared.mean(), "frozen": squared.mean().detach()},
        }[self.returns]()


class TeacherOnly(kdhooks.Term):
    """A term that reads the frozen teacher only: its loss has no gradient, rightly."""

    def taps(self):
        return {"teacher_logits": kdhooks.Tap("teacher", "logits")}

    def loss(self, ctx, teacher_logits):
        return teacher_logits.pow(2).mean()


class ListTaps(Misbehaving):
    def taps(self):
        return [kdhooks.Tap("student", "logits"), kdhooks.Tap("teacher", "logits")]


class StringTaps(Misbehaving):
    def taps(self):
        return {"student_logits": "logits", "teacher_logits": "logits"}


class RenamedTaps(kdhooks.Term):
    def taps(self):
        return {"s": kdhooks.Tap("student", "logits"), "teacher": kdhooks.Tap("teacher", "logits")}

    def loss(self, ctx, student, teacher):
        return (student - teacher).pow(2).mean()


class Tempered(kdhooks.Term):
    """Softened-logits MSE; its temperature is declared with its range."""

    temperature: kdhooks.Positive = 4.0

    def taps(self):
        return {"student_logits": kdhooks.Tap("student", "logits"),
                "teacher_logits": kdhooks.Tap("teacher", "logits")}

    def loss(self, ctx, student_logits, teacher_logits):
        return ((student_logits - teacher_logits) / self.temperature).pow(2).mean()


class FragileTaps(Misbehaving):
    def taps(self):
        return {"student_logits": kdhooks.Tap("student", self.layers["student"])}


class FragileBuild(Misbehaving):
    def build(self, distiller, shapes):
        distiller.add_part(self.name, torch.nn.Linear(shapes["teacher_logits"][2], 4))


@kdhooks.hookimpl
def kdhooks_register(registry):
    registry.add_term("fragile_taps", FragileTaps)
    registry.add_term("fragile_build", FragileBuild)
    registry.add_term("misbehaving", Misbehaving)
    registry.add_term("teacher_only", TeacherOnly)
    registry.add_term("list_taps", ListTaps)
    registry.add_term("string_taps", StringTaps)
    registry.add_term("renamed_taps", RenamedTaps)
    registry.add_term("tempered", Tempered)
'''


@pytest.fixture(scope="module")
def badterms(tmp_path_factory):
    """``kdhooks_badterms`` installed as the distribution kdhooks-badterms 0.3.1 with a ``badterms`` entry point."""
    site = tmp_path_factory.mktemp("site")
    (site / "kdhooks_badterms.py").write_text(SOURCE)
    info = site / "kdhooks_badterms-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdhooks-badterms\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text("[kdhooks]\nbadterms = kdhooks_badterms\n")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    installed_plugins.cache_clear()
    try:
        assert any(p.name == "badterms" and p.version == "0.3.1" for p in installed_plugins())
        yield importlib.import_module("kdhooks_badterms")
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("kdhooks_badterms", None)
        importlib.invalidate_caches()
        installed_plugins.cache_clear()


def attach(config, **kwargs):
    student, teacher = pair()
    x, _ = batch(2)
    return kdhooks.Distiller(student, teacher, config, example_inputs=x, **kwargs), student


def one_step(kd, student):
    x, y = batch()
    return kd(F.cross_entropy(student(x), y), labels=y)


def term(returns, **options):
    return {"terms": [{"kind": "misbehaving", "name": "mine", "returns": returns, **options}]}


# --- loss() raises ---------------------------------------------------------------------------

def test_an_exception_in_loss_carries_a_note_naming_the_term_its_kind_and_the_plugin(badterms):
    kd, student = attach(term("raises"))
    with kd, pytest.raises(ValueError, match="boom: the plugin's own bug") as info:
        one_step(kd, student)
    assert info.value.__notes__ == [f"in loss term 'mine' (kind 'misbehaving', from plugin {PLUGIN})"]
    # the step's captures are dropped: the next step records afresh
    assert kd.captures == {}


def test_an_exception_in_a_python_made_term_names_its_kind_and_plugin(badterms):
    kd, student = attach({"terms": [badterms.Misbehaving(returns="raises")]})
    with kd, pytest.raises(ValueError) as info:
        one_step(kd, student)
    assert f"(kind 'misbehaving', from plugin {PLUGIN})" in info.value.__notes__[0]


@pytest.mark.parametrize("kind, error, method", [("fragile_taps", AttributeError, "taps()"),
                                                  ("fragile_build", IndexError, "build()")])
def test_an_exception_in_taps_or_build_names_the_method_term_kind_and_plugin(badterms, kind, error, method):
    student, teacher = pair()
    with pytest.raises(error) as info:
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": kind}]}, example_inputs=batch(2)[0])
    assert info.value.__notes__ == [f"in {method} of loss term {kind!r} (kind {kind!r}, from plugin {PLUGIN})"]
    assert kdhooks.attached(student) is None and not student._forward_pre_hooks and not teacher._forward_hooks


# --- loss() returns something other than a 0-dim tensor in the graph --------------------------------

@pytest.mark.parametrize("returns, part, got", [
    ("none", "mine", "NoneType None"),
    ("float", "mine", "float "),
    ("vector", "mine", "a tensor of shape (8,)"),
    ("one_element", "mine", "a tensor of shape (1,)"),
    ("dict_with_float", "mine.count", "float 3.0"),
    ("dict_with_vector", "mine.per_sample", "a tensor of shape (8,)"),
])
def test_a_wrong_return_value_is_a_plugin_error_saying_a_0_dim_tensor_was_expected(badterms, returns, part, got):
    kd, student = attach(term(returns))
    with kd, pytest.raises(kdhooks.PluginError) as info:
        one_step(kd, student)
    error = info.value
    assert (error.term, error.kind, error.plugin) == ("mine", "misbehaving", PLUGIN)
    message = str(error)
    assert message.startswith(f"loss term 'mine' (kind 'misbehaving', from plugin {PLUGIN}): ")
    assert "loss() must return a 0-dim tensor (or a dict of them)" in message
    assert f"part {part!r} is {got}" in message
    assert ".mean()" in error.fix


def test_a_wrong_return_value_stops_the_step_before_anything_is_counted(badterms):
    kd, student = attach(term("vector"))
    with kd:
        with pytest.raises(kdhooks.PluginError):
            one_step(kd, student)
        assert kd.step == 0 and kd.last_losses == {}


def test_the_right_return_value_is_the_hand_computed_loss(badterms):
    kd, student = attach(term("right", weight=0.5))
    with kd:
        x, y = batch()
        out = student(x)
        total = kd(F.cross_entropy(out, y), labels=y)
        expected = 0.5 * (out - kd.teacher(x)).pow(2).mean()
        assert torch.allclose(torch.tensor(kd.last_losses["mine"]), expected.detach())
        assert torch.allclose(total, F.cross_entropy(out, y) + expected)


# --- taps() that break the contract are refused at attach ---------------------------------------------

@pytest.mark.parametrize("kind, got", [("list_taps", "got list"), ("string_taps", "got dict")])
def test_taps_that_are_not_a_dict_of_taps_is_a_plugin_error_at_attach(badterms, kind, got):
    student, teacher = pair()
    with pytest.raises(kdhooks.PluginError) as info:
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": kind}]}, example_inputs=batch(2)[0])
    error = info.value
    assert (error.term, error.kind, error.plugin) == (kind, kind, PLUGIN)
    assert "taps() must return a dict {argument name: kdhooks.Tap}" in str(error) and got in str(error)
    assert "kdhooks.Tap('student', 'logits')" in error.fix
    assert kdhooks.attached(student) is None and not student._forward_pre_hooks


def test_taps_named_unlike_the_loss_parameters_is_a_plugin_error_naming_each_side(badterms):
    student, teacher = pair()
    with pytest.raises(kdhooks.PluginError) as info:
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "renamed_taps", "name": "renamed"}]})
    error = info.value
    assert (error.term, error.kind, error.plugin) == ("renamed", "renamed_taps", PLUGIN)
    message = str(error)
    assert "taps() and loss() disagree" in message
    assert "tap ['s'] is not a parameter of loss()" in message
    assert "loss() parameter ['student'] has no tap" in message
    assert error.fix == "rename tap 's' to 'student'"
    assert kdhooks.attached(student) is None and not student._forward_pre_hooks


# --- a result without a gradient --------------------------------------------------------------------------

@pytest.mark.parametrize("returns, part", [("detached", "mine"), ("item", "mine"), ("dict_detached", "mine.frozen")])
def test_a_detached_result_warns_once_naming_the_term(badterms, returns, part):
    kd, student = attach(term(returns))
    with kd, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            one_step(kd, student).backward()
    about = [w for w in caught if "without a gradient" in str(w.message)]
    assert len(about) == 1, [str(w.message) for w in caught]
    assert about[0].category is RuntimeWarning
    message = str(about[0].message)
    assert f"loss term {part!r} (kind 'misbehaving', from plugin {PLUGIN})" in message
    assert "counts in the loss but trains nothing" in message and ".detach()" in message


def test_no_gradient_warning_where_none_is_expected(badterms):
    """A term on the frozen teacher alone, and any term while the loss is computed under no_grad."""
    kd, student = attach({"terms": [{"kind": "teacher_only"}, {"kind": "misbehaving", "returns": "right"}]})
    with kd, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one_step(kd, student).backward()
        with torch.no_grad():
            one_step(kd, student)
    assert [str(w.message) for w in caught] == []


# --- numbers are checked at attach, for plugin terms too --------------------------------------------------

@pytest.mark.parametrize("options, location, says", [
    ({"weight": float("nan")}, "terms[0].weight", "weight must be a finite number"),
    ({"weight": float("inf")}, "terms[0].weight", "weight must be a finite number"),
    ({"temperature": 0}, "terms[0].temperature", "temperature must be a number greater than 0"),
    ({"temperature": -1.0}, "terms[0].temperature", "temperature must be a number greater than 0"),
    ({"temperature": {"schedule": "linear", "start": 4, "end": 0, "steps": 100}}, "terms[0].temperature",
     "at step 100"),
])
def test_a_nan_weight_or_a_zero_temperature_fails_at_attach(badterms, options, location, says):
    student, teacher = pair()
    with pytest.raises(kdhooks.ConfigError) as info:
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "tempered", **options}]})
    assert info.value.location == location and says in str(info.value)
    assert info.value.fix
    assert kdhooks.attached(student) is None


@pytest.mark.parametrize("options, location", [
    ({"weight": float("nan")}, "terms[0].weight"),
    ({"temperature": 0.0}, "terms[0].temperature"),
])
def test_a_term_made_in_python_is_checked_at_attach_like_one_from_the_config(badterms, options, location):
    from kdhooks.plugins.logits import KD

    for made in (badterms.Tempered(**options), KD(**options)):
        student, teacher = pair()
        with pytest.raises(kdhooks.ConfigError) as info:
            kdhooks.Distiller(student, teacher, {"terms": [made]}, example_inputs=batch(2)[0])
        assert info.value.location == location, str(info.value)
        assert kdhooks.attached(student) is None and not student._forward_pre_hooks


def test_a_python_made_term_with_a_schedule_is_checked_at_its_key_steps(badterms):
    registry = plugin_manager()[1]
    from kdhooks._schedule import parse_schedule

    cooling = parse_schedule({"schedule": "linear", "start": 4, "end": 0, "steps": 10}, registry, "here")
    student, teacher = pair()
    with pytest.raises(kdhooks.ConfigError, match="at step 10") as info:
        kdhooks.Distiller(student, teacher, {"terms": [badterms.Tempered(temperature=cooling)]})
    assert info.value.location == "terms[0].temperature"


# --- a plugin named in the config rather than installed ---------------------------------------------------

def test_a_plugin_module_from_the_config_is_named_by_its_module(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(textwrap.dedent('''
        import kdhooks

        class Broken(kdhooks.Term):
            def taps(self):
                return {"student_logits": kdhooks.Tap("student", "logits")}

            def loss(self, ctx, student_logits):
                return student_logits.mean(1)

        @kdhooks.hookimpl
        def kdhooks_register(registry):
            registry.add_term("broken", Broken)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    kd, student = attach({"plugins": ["my_losses"], "terms": [{"kind": "broken"}]})
    with kd, pytest.raises(kdhooks.PluginError) as info:
        one_step(kd, student)
    assert info.value.plugin == f"my_losses (not installed: {tmp_path / 'my_losses.py'})"
    assert "loss term 'broken' (kind 'broken', from plugin my_losses" in str(info.value)
    sys.modules.pop("my_losses", None)


class Unregistered(kdhooks.Term):
    """A term class used as a Python object without any plugin registering it."""

    def taps(self):
        return {"student_logits": kdhooks.Tap("student", "logits")}

    def loss(self, ctx, student_logits):
        return None


def test_an_unregistered_python_term_is_named_by_its_module():
    kd, student = attach({"terms": [Unregistered(name="adhoc")]})
    with kd, pytest.raises(kdhooks.PluginError) as info:
        one_step(kd, student)
    assert info.value.plugin.startswith(f"{__name__} (not installed: {__file__}")
    assert "loss term 'adhoc' (kind 'Unregistered'" in str(info.value)


def test_a_plugin_module_of_an_installed_package_without_entry_point_names_the_package(tmp_path, monkeypatch):
    from kdhooks import _manager

    (tmp_path / "extra_losses").mkdir()
    (tmp_path / "extra_losses" / "__init__.py").write_text("")
    (tmp_path / "extra_losses" / "terms.py").write_text(textwrap.dedent('''
        import kdhooks

        class Halves(kdhooks.Term):
            def taps(self):
                return {"student_logits": kdhooks.Tap("student", "logits")}

            def loss(self, ctx, student_logits):
                return 0.5

        @kdhooks.hookimpl
        def kdhooks_register(registry):
            registry.add_term("halves", Halves)
    '''))
    info = tmp_path / "extra_losses-1.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-losses\nVersion: 1.2.0\n")
    (info / "top_level.txt").write_text("extra_losses\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _manager._distributions_of_modules.cache_clear()
    try:
        kd, student = attach({"plugins": ["extra_losses.terms"], "terms": [{"kind": "halves"}]})
        with kd, pytest.raises(kdhooks.PluginError) as info:
            one_step(kd, student)
        assert info.value.plugin == "extra_losses.terms (extra-losses 1.2.0)"
        assert "part 'halves' is float 0.5" in str(info.value)
    finally:
        _manager._distributions_of_modules.cache_clear()
        for name in ("extra_losses", "extra_losses.terms"):
            sys.modules.pop(name, None)
