"""The plugin contract is checked when plugins load and terms are defined, not discovered at step N."""
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from kdhooks.demo import student_cnn, teacher_cnn
from kdhooks.plugins.logits import kd_loss


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """Writes a module ``name`` with ``source`` on sys.path and returns its name for ``plugins:``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name
    return write


def attach(config):
    torch.manual_seed(0)
    return kdhooks.Distiller(student_cnn(), teacher_cnn(), config)


def test_a_misspelled_hook_is_refused_with_the_closest_hook(plugin_module):
    name = plugin_module("misspelled_hook", """
        import kdhooks

        @kdhooks.hookimpl
        def kdhooks_loss(ctx):
            return {"extra": ctx.task_loss}
    """)
    with pytest.raises(kdhooks.ConfigError) as error:
        attach({"terms": [{"kind": "kd"}], "plugins": [name]})
    assert "kdhooks_loss is not a kdhooks hook" in error.value.problem
    assert error.value.location.startswith(f"plugin {name}")
    assert "kdhooks_losses" in error.value.fix


def test_an_unmarked_hook_is_refused(plugin_module):
    name = plugin_module("unmarked_hook", """
        def kdhooks_step_end(distiller, losses):
            distiller.seen = True
    """)
    with pytest.raises(kdhooks.ConfigError, match="not marked @kdhooks.hookimpl") as error:
        attach({"terms": [{"kind": "kd"}], "plugins": [name]})
    assert "@kdhooks.hookimpl" in error.value.fix


def test_a_term_that_overrides_a_pluggy_hook_is_refused_where_it_is_defined():
    with pytest.raises(TypeError, match="kdhooks_configure") as error:
        class Overriding(kdhooks.Term):
            def kdhooks_configure(self, distiller):
                pass
    assert "define configure(self, distiller)" in str(error.value)


def test_a_taps_loss_mismatch_fails_at_attach_not_at_the_first_step():
    class Mismatched(kdhooks.Term):
        def taps(self):
            return {"student_logits": kdhooks.Tap("student", "logits")}

        def loss(self, ctx, logits):
            return logits.mean()

    student = student_cnn()
    with pytest.raises(kdhooks.PluginError, match="taps\\(\\) and loss\\(\\) disagree"):
        kdhooks.Distiller(student, teacher_cnn(), {"terms": [Mismatched(name="m")]})
    assert kdhooks.attached(student) is None


def test_configure_runs_before_taps_with_the_models_at_hand():
    class LastLayer(kdhooks.Term):
        """Taps the student's and the teacher's last stage, found from the models."""

        def configure(self, distiller):
            self.paths = {role: [n for n, _ in distiller.model(self.role(role)).named_children()
                                 if n.startswith("stage")][-1] for role in ("student", "teacher")}

        def taps(self):
            return {"student_feature": kdhooks.Tap("student", self.paths["student"]),
                    "teacher_feature": kdhooks.Tap("teacher", self.paths["teacher"])}

        def loss(self, ctx, student_feature, teacher_feature):
            return (student_feature.mean() - teacher_feature.mean()) ** 2

    with kdhooks.Distiller(student_cnn(), teacher_cnn(), {"terms": [LastLayer(name="last")]}) as kd:
        assert {tap.path for tap in kd.taps} == {"stage3"}
        assert all(location == "terms[0]" for location in kd.taps.values())


def test_extras_a_term_needs_are_named_when_the_step_lacks_them():
    class NeedsBoxes(kdhooks.Term):
        def extras_needed(self):
            return {"gt_boxes"}

        def taps(self):
            return {"student_logits": kdhooks.Tap("student", "logits")}

        def loss(self, ctx, student_logits):
            return student_logits.mean() * 0 + len(ctx.extras["gt_boxes"])

    student = student_cnn()
    with kdhooks.Distiller(student, teacher_cnn(), {"terms": [NeedsBoxes(name="boxes")]}) as kd:
        student.train()
        student(torch.randn(2, 1, 8, 8))
        with pytest.raises(kdhooks.LossError, match="extras have no 'gt_boxes'") as error:
            kd(None)
        assert "gt_boxes=" in error.value.fix
        student(torch.randn(2, 1, 8, 8))
        assert kd(None, gt_boxes=[1, 2, 3]).item() == pytest.approx(3.0)


class CachedTeacher:
    """A kdhooks_teacher_forward plugin: returns stored logits instead of running the teacher."""

    def __init__(self, logits):
        self.logits, self.calls = logits, 0

    @kdhooks.hookimpl
    def kdhooks_teacher_forward(self, distiller, role, args, kwargs):
        self.calls += 1
        return self.logits


def test_a_teacher_forward_plugin_replaces_the_teacher_and_its_output_is_recorded():
    torch.manual_seed(0)
    student, teacher, x = student_cnn(), teacher_cnn(), torch.randn(4, 1, 8, 8)
    cached = torch.randn(4, 10)
    ran = []
    teacher.register_forward_hook(lambda module, args, output: ran.append(True))
    with kdhooks.Distiller(student, teacher, {"terms": [{"kind": "kd", "temperature": 2.0}]}) as kd:
        cache = CachedTeacher(cached)
        kd._pm.register(cache)
        student.train()
        logits = student(x)
        loss = kd(None)
    assert cache.calls == 1 and not ran
    assert loss.item() == pytest.approx(kd_loss(logits, cached, 2.0).item(), rel=1e-6)


def test_a_teacher_forward_plugin_leaves_taps_inside_the_teacher_unrecorded():
    torch.manual_seed(0)
    student, teacher, x = student_cnn(), teacher_cnn(), torch.randn(4, 1, 8, 8)
    config = {"terms": [{"kind": "fitnets", "student": "stage2", "teacher": "stage2"}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        kd._pm.register(CachedTeacher(torch.randn(4, 10)))
        student.train()
        student(x)
        with pytest.raises(KeyError, match="stage2"):
            kd(None)


# --- CONTRIBUTING.md, followed alone -------------------------------------------------------------

def contributing_blocks() -> list[str]:
    text = (Path(__file__).parent.parent / "CONTRIBUTING.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_term_schedule_and_connector_of_contributing_md_work_as_written(plugin_module):
    term, schedule, connector = contributing_blocks()[:3]
    header = "import torch\nfrom torch import nn\n\nimport kdhooks\n\n"
    names = [plugin_module(name, header + source) for name, source in
             (("contributed_term", term), ("contributed_schedule", schedule), ("contributed_connector", connector))]
    torch.manual_seed(0)
    student, teacher, x = student_cnn(), teacher_cnn(), torch.randn(4, 1, 8, 8)
    config = {"plugins": names, "terms": [
        {"kind": "cosine", "margin": {"schedule": "exponential", "start": 0.1, "rate": 0.5}},
        {"kind": "fitnets", "student": "stage2", "teacher": "stage2", "connector": "conv3x3"}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        assert isinstance(kd.connectors["fitnets"], nn.Conv2d) and kd.connectors["fitnets"].kernel_size == (3, 3)
        student.train()
        for step in range(2):
            logits = student(x)
            kd(None)
            with torch.no_grad():
                expected = (1 - F.cosine_similarity(logits, teacher(x), dim=1)).mean() - 0.1 * 0.5 ** step
            assert kd.last_losses["cosine"] == pytest.approx(max(expected.item(), 0.0), rel=1e-5, abs=1e-7)
    with pytest.raises(kdhooks.ConfigError, match="margin"):
        kdhooks.Distiller(student, teacher, {"plugins": names, "terms": [{"kind": "cosine", "margin": -1}]})
