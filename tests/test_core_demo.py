"""The demo (kdhooks/demo.py) end to end on a reduced size."""


def test_the_demo_runs_end_to_end_on_a_reduced_size(tmp_path, capsys):
    from kdhooks.demo import run_demo

    results = run_demo(seeds=1, epochs=2, teacher_epochs=6, out=tmp_path, subset=600)
    assert set(results) == {"teacher", "student alone", "student + KD", "student + KD + FitNets"}
    assert all(len(v) == 1 and 0.0 <= v[0] <= 1.0 for v in results.values())
    assert results["teacher"][0] > 0.6  # six epochs on 600 images already learn
    assert (tmp_path / "learning_curves.png").stat().st_size > 5000
    assert "student + KD" in capsys.readouterr().out
