"""The command line: every user mistake is one stderr line with the fix and exit status 2 (issue 10).

Each case runs ``kdhooks.cli.main`` in-process on small models written to a temporary file, and
checks the exit status, that stderr is exactly one ``kdhooks: error: ... (fix: ...)`` line that names
the bad value or place, and that no traceback is shown. ``--debug`` and an internal bug are the exceptions.
"""
import math
import subprocess
import sys
import textwrap

import pytest

import kdhooks._cli_commands
from kdhooks.cli import main

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class ConstantLogits(nn.Module):
        """The same logits for every sample, whatever the input: its losses can be computed by hand."""

        def __init__(self, values):
            super().__init__()
            self.logits = nn.Parameter(torch.tensor(values))

        def forward(self, x):
            return self.logits.expand(x.shape[0], -1)


    class SharedActivation(nn.Module):
        """One Tanh called twice per forward, on a (batch, 4) and then a (batch, 6) tensor."""

        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()
            self.widen = nn.Linear(4, 6)

        def forward(self, x):
            return self.act(self.widen(self.act(x)))


    class SharedBlock(nn.Module):
        """One Linear called twice per forward with the same shape."""

        def __init__(self):
            super().__init__()
            self.block = nn.Linear(4, 4)

        def forward(self, x):
            return self.block(self.block(x))


    def constant_student():
        return ConstantLogits([1.0, 2.0, 3.0])


    def constant_teacher():
        return ConstantLogits([3.0, 1.0, 0.5])


    def ten_classes():
        return nn.Sequential(nn.Linear(4, 10))


    def twelve_classes():
        return nn.Sequential(nn.Linear(4, 12))


    def shared_activation():
        return SharedActivation()


    def shared_block():
        return SharedBlock()


    def build():
        raise ValueError("factory exploded")
''')

DEMO = ["--student", "kdhooks.demo:student_cnn", "--teacher", "kdhooks.demo:teacher_cnn", "--input-shape", "2,1,8,8"]


@pytest.fixture
def models(tmp_path, monkeypatch):
    """``models.py`` in the current folder (a temporary one): factories are named as ``models.py:NAME``."""
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(folder, text: str) -> str:
    path = folder / "kd.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_line(capsys) -> str:
    """The one line on stderr, checked for the format every user error has."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("kdhooks: error: ") and line.endswith(")"), line
    assert "(fix: " in line, line
    return line


# --- what the user names ------------------------------------------------------------------------


def test_a_bad_tap_path_suggests_the_closest_module(tmp_path, capsys):
    config = write_config(tmp_path, """
        terms:
          - {kind: fitnets, student: stage2, teacher: stag2}
    """)
    assert main(["check", config, *DEMO]) == 2
    line = error_line(capsys)
    assert "terms[0].teacher" in line and "'stag2'" in line and "did you mean 'stage2'" in line


def test_an_input_shape_that_is_not_numbers(capsys):
    assert main(["inspect", "kdhooks.demo:teacher_cnn", "--input-shape", "3,a,8"]) == 2
    line = error_line(capsys)
    assert "'3,a,8'" in line and "'a' is not a positive integer" in line and "--input-shape 2,1,8,8" in line


def test_an_input_shape_with_the_wrong_channel_count_names_the_shape_and_the_one_expected(capsys):
    assert main(["inspect", "kdhooks.demo:teacher_cnn", "--input-shape", "2,3,8,8"]) == 2
    line = error_line(capsys)
    assert "--input-shape 2,3,8,8" in line and "stage1.0 (Conv2d)" in line
    assert "fix: the model's first layer stage1.0 (Conv2d) expects 1 input channels" in line
    assert "e.g. --input-shape 2,1,8,8" in line


def test_check_with_the_wrong_channel_count_names_the_student(tmp_path, capsys):
    config = write_config(tmp_path, "terms: [{kind: kd}]\n")
    args = ["check", config, "--student", "kdhooks.demo:student_cnn", "--teacher", "kdhooks.demo:teacher_cnn"]
    assert main([*args, "--input-shape", "2,3,8,8"]) == 2
    line = error_line(capsys)
    assert "the student's forward fails on --input-shape 2,3,8,8" in line and "e.g. --input-shape 2,1,8,8" in line


def test_an_unimportable_factory_module(capsys):
    assert main(["inspect", "no_such_module_for_kdhooks:build", "--input-shape", "2,4"]) == 2
    line = error_line(capsys)
    assert "no module named 'no_such_module_for_kdhooks'" in line and "path/to/file.py:FACTORY" in line


def test_a_factory_file_that_does_not_exist(models, capsys):
    assert main(["inspect", "nope.py:build", "--input-shape", "2,4"]) == 2
    line = error_line(capsys)
    assert "the file 'nope.py' does not exist" in line and str(models) in line


def test_a_factory_name_that_is_not_in_the_module(models, capsys):
    assert main(["inspect", "models.py:shared_blok", "--input-shape", "2,4"]) == 2
    line = error_line(capsys)
    assert "models.py has no 'shared_blok'" in line and "did you mean 'shared_block'" in line


def test_a_factory_that_raises(models, capsys):
    assert main(["inspect", "models.py:build", "--input-shape", "2,4"]) == 2
    line = error_line(capsys)
    assert "the factory 'models.py:build' raised ValueError: factory exploded" in line and "--debug" in line


def test_a_spec_without_a_factory_name(capsys):
    assert main(["inspect", "kdhooks.demo", "--input-shape", "2,4"]) == 2
    line = error_line(capsys)
    assert "'kdhooks.demo' is not MODULE:FACTORY" in line


# --- the config ------------------------------------------------------------------------------------


def test_a_config_file_that_does_not_exist(models, capsys):
    assert main(["check", "missing.yaml", *DEMO]) == 2
    line = error_line(capsys)
    assert "the config file 'missing.yaml' does not exist" in line


def test_a_config_that_is_not_valid_yaml(tmp_path, capsys):
    config = write_config(tmp_path, "terms:\n  - kind: kd\n    temperature: [1\n")
    assert main(["check", config, *DEMO]) == 2
    line = error_line(capsys)
    assert f"{config}:4:1: not valid YAML" in line  # the file, line and column of the problem


def test_a_selector_on_a_plain_tensor_output_is_an_error(tmp_path, capsys):
    # ':0' on a (2, 10) tensor would pick sample 0 as if it were the logits
    config = write_config(tmp_path, "terms: [{kind: kd, student: 'logits:0'}]\n")
    assert main(["check", config, *DEMO]) == 2
    line = error_line(capsys)
    assert "terms[0].student" in line and "selector '0'" in line and "tensor of shape (2, 10)" in line
    assert "remove ':0'" in line


def test_check_refuses_temperature_zero(models, capsys):
    config = write_config(models, "terms: [{kind: kd, temperature: 0}]\n")
    args = ["check", config, "--student", "models.py:constant_student", "--teacher", "models.py:constant_teacher"]
    assert main([*args, "--input-shape", "2,4"]) == 2
    line = error_line(capsys)
    assert "terms[0].temperature" in line and "greater than 0" in line
    assert capsys.readouterr().out == ""


def test_check_refuses_a_class_count_mismatch(models, capsys):
    config = write_config(models, "terms: [{kind: kd}]\n")
    args = ["check", config, "--student", "models.py:ten_classes", "--teacher", "models.py:twelve_classes"]
    assert main([*args, "--input-shape", "2,4"]) == 2
    line = error_line(capsys)
    assert "terms[0]" in line and "10 classes" in line and "12" in line
    assert "valid" not in capsys.readouterr().out


def test_check_prints_each_terms_value_computed_by_hand(models, capsys):
    config = write_config(models, "terms: [{kind: kd, temperature: 2, weight: 0.5}]\n")
    args = ["check", config, "--student", "models.py:constant_student", "--teacher", "models.py:constant_teacher"]
    assert main([*args, "--input-shape", "2,4"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""

    def softmax(logits: list[float], temperature: float) -> list[float]:
        exps = [math.exp(v / temperature) for v in logits]
        return [e / sum(exps) for e in exps]

    # every sample has the same logits: the batch mean is one sample's KL(teacher || student) · T²
    teacher, student = softmax([3.0, 1.0, 0.5], 2.0), softmax([1.0, 2.0, 3.0], 2.0)
    expected = 0.5 * sum(t * math.log(t / s) for t, s in zip(teacher, student)) * 2.0**2
    values = {line.split(":")[0].strip(): line.split(":")[1].strip() for line in captured.out.splitlines()
              if line.startswith("  ") and ":" in line and not line.strip().startswith(("term", "tap", "connector"))}
    assert set(values) >= {"kd", "total"}, captured.out
    assert float(values["kd"]) == pytest.approx(expected, rel=1e-5)
    assert float(values["total"]) == pytest.approx(expected, rel=1e-5)
    assert "  term kd (kd) weight=0.5" in captured.out


# --- inspect, --debug, bugs ------------------------------------------------------------------------


def test_inspect_shows_every_call_of_a_module_called_twice(models, capsys):
    assert main(["inspect", "models.py:shared_activation", "--input-shape", "2,4"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert rows["act"].split()[1:3] == ["Tanh", "2"]
    assert "call 1: (2, 4); call 2: (2, 6)" in rows["act"]
    assert "(2, 6)" in rows["(output)"] and "called more than once per forward: act" in out


def test_a_warning_during_check_is_one_line(models, capsys):
    config = write_config(models, "terms: [{kind: kd, student: block, teacher: block}]\n")
    args = ["check", config, "--student", "models.py:shared_block", "--teacher", "models.py:shared_block"]
    assert main([*args, "--input-shape", "2,4"]) == 0
    captured = capsys.readouterr()
    warnings_shown = captured.err.splitlines()
    assert warnings_shown and all(line.startswith("kdhooks: warning: ") for line in warnings_shown), captured.err
    assert "'block' is called 2 times" in captured.err and "valid" in captured.out


def test_a_count_below_one_is_a_usage_error(capsys):
    assert main(["demo", "--seeds", "0"]) == 2
    line = error_line(capsys)
    assert "--seeds" in line and "'0' is not 1 or more" in line and "kdhooks demo --help" in line


def test_debug_shows_the_original_traceback():
    command = [sys.executable, "-m", "kdhooks.cli", "inspect", "kdhooks.demo:teacher_cnn", "--input-shape", "2,3,8,8"]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.startswith("kdhooks: error: ") and "Traceback" not in plain.stderr
    debug = subprocess.run([*command[:3], "--debug", *command[3:]], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    last = debug.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: ") and "3 channels" in last
    assert "UserError" not in debug.stderr


def test_an_internal_bug_exits_1_with_the_debug_hint(monkeypatch, capsys):
    def broken_shape_of(value):
        raise RuntimeError("shape bookkeeping broke")

    monkeypatch.setattr(kdhooks._cli_commands, "shape_of", broken_shape_of)
    assert main(["inspect", "kdhooks.demo:teacher_cnn", "--input-shape", "2,1,8,8"]) == 1
    line = error_line(capsys)
    assert "RuntimeError: shape bookkeeping broke" in line and "--debug" in line and "bug" in line
    with pytest.raises(RuntimeError, match="shape bookkeeping broke"):
        main(["--debug", "inspect", "kdhooks.demo:teacher_cnn", "--input-shape", "2,1,8,8"])
