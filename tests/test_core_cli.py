"""The command line (kdhooks/cli.py, kdhooks/_cli_commands.py): plugins, inspect, check, integration commands."""
import subprocess
import sys

import pytest

import kdhooks
from kdhooks.cli import main


def test_plugins_lists_the_built_in_kinds(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "term:kd" in out and "term:fitnets" in out and "schedule:cosine" in out and "connector:conv1x1" in out
    assert f"kdhooks  {kdhooks.__version__}" in " ".join(out.split("  ")) or "kdhooks" in out


def test_inspect_prints_paths_and_output_shapes(capsys):
    assert main(["inspect", "kdhooks.demo:teacher_cnn", "--input-shape", "2,1,8,8"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "(2, 64, 4, 4)" in lines["stage2"] and "(2, 10)" in lines["fc"] and "(2, 10)" in lines["(output)"]


def test_check_validates_and_dry_runs(tmp_path, capsys):
    config = tmp_path / "kd.yaml"
    config.write_text("terms:\n  - kind: kd\n  - kind: fitnets\n    student: stage2\n    teacher: stage2\n")
    args = ["check", str(config), "--student", "kdhooks.demo:student_cnn", "--teacher", "kdhooks.demo:teacher_cnn",
            "--input-shape", "2,1,8,8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "connector fitnets" in out and "Conv2d(8, 64" in out
    config.write_text("terms:\n  - kind: fitnets\n    student: stage2\n    teacher: stage7\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "terms[0].teacher" in err and "'stage" in err


def test_an_integration_command_is_imported_only_when_it_runs():
    # 'kdhooks plugins' must not pay for importing mmdet; 'kdhooks mmdet' must find its command
    code = ("import sys; from kdhooks.cli import main; main(['plugins']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmengine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    with pytest.raises(SystemExit) as exit_info:
        main(["mmdet", "--help"])
    assert exit_info.value.code == 0


def test_check_with_named_teachers(tmp_path, capsys):
    config = tmp_path / "two.yaml"
    config.write_text("terms:\n  - {kind: kd, teacher_role: wide}\n"
                      "  - {kind: fitnets, teacher_role: deep, student: stage2, teacher: stage2}\n")
    base = ["check", str(config), "--student", "kdhooks.demo:student_cnn", "--input-shape", "2,1,8,8"]
    teachers = ["--teacher", "wide=kdhooks.demo:teacher_cnn", "--teacher", "deep=kdhooks.demo:teacher_cnn"]
    assert main([*base, *teachers]) == 0
    out = capsys.readouterr().out
    assert "tap terms[0].teacher: wide logits" in out and "tap terms[1].teacher: deep stage2" in out
    assert main([*base, "--teacher", "wide=kdhooks.demo:teacher_cnn", "--teacher", "kdhooks.demo:teacher_cnn"]) == 2
    assert "name every teacher or none" in capsys.readouterr().err
