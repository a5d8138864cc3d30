"""kdhooks.integrations.accelerate under a real 2-process launch (accelerate launch, gloo on CPU).

Three launches in all: the worker's fp32 scenarios, its bf16 scenarios and the
example script. Every launched result asserts that the world really had 2
processes (``accelerate launch --cpu --num_processes 2`` would run one).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")

import kdhooks  # noqa: E402
from _accelerate_worker import GLOBAL_BATCH, KD_FITNETS, STEPS, build, trained_parameters  # noqa: E402
from kdhooks.demo import digits_tensors  # noqa: E402

TESTS = Path(__file__).parent
EXAMPLE = TESTS.parent / "examples" / "accelerate" / "train.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(script: Path, *args: str, mixed_precision: str = "no", cwd: Path) -> str:
    """``accelerate launch`` with 2 CPU processes (gloo); the combined output."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def run_worker(mode: str, mixed_precision: str, directory: Path) -> list[dict]:
    launch(TESTS / "_accelerate_worker.py", str(directory), mode, mixed_precision=mixed_precision, cwd=directory)
    ranks = [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks), "the launch did not give 2 processes"
    return ranks


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> list[dict]:
    return run_worker("fp32", "no", tmp_path_factory.mktemp("accelerate_fp32"))


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> list[dict]:
    return run_worker("bf16", "bf16", tmp_path_factory.mktemp("accelerate_bf16"))


def single_process_run(config: dict = KD_FITNETS) -> dict:
    """The hand-written loop in this process: 10 SGD steps on batches of 2B = 32.

    The initial and final parameters and each step's losses (``kd.last_losses``).
    """
    student, teacher, kd, optimizer = build(config)
    initial = trained_parameters(student, kd)
    images, labels = digits_tensors(0)[:2]
    student.train()
    losses = []
    for step in range(STEPS):
        x, y = images[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH], labels[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        loss = kd(F.cross_entropy(student(x), y), labels=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(kd.last_losses)
    kd.close()
    return {"initial": initial, "parameters": trained_parameters(student, kd), "losses": losses}


def one_process_reference() -> tuple[dict[str, list], dict[str, list]]:
    """The hand-written loop in this process: 10 SGD steps on batches of 2B = 32 (the initial and final parameters)."""
    run = single_process_run()
    return run["initial"], run["parameters"]


def assert_losses_match(rank0: list[dict], rank1: list[dict], expected: list[dict], tolerance: float = 1e-5) -> None:
    """Each step's losses of 2 ranks on half batches, averaged, are the single process's on the whole batch."""
    assert len(rank0) == len(rank1) == len(expected)
    for step, losses in enumerate(expected):
        assert rank0[step].keys() == losses.keys()
        for name, value in losses.items():
            assert abs((rank0[step][name] + rank1[step][name]) / 2 - value) < tolerance, (step, name)


def max_difference(a: dict[str, list], b: dict[str, list]) -> float:
    assert a.keys() == b.keys()
    return max((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, list], dict[str, list]]:
    return one_process_reference()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["data_parallel", "accumulation"])
def test_two_processes_equal_one_process_with_twice_the_batch(fp32, reference, scenario):
    """2 x B (and 2 x 2 micro-batches of B/2 under accumulate) == 1 x 2B after 10 updates, KD + FitNets."""
    initial, expected = reference
    rank0, rank1 = (r[scenario] for r in fp32)
    assert rank0["distributed_type"] == "DistributedType.MULTI_CPU"
    assert rank0["wrapper"] == "DistributedDataParallel"  # the connector is synchronised by DDP itself
    assert any(name.startswith("kd.connectors.fitnets") for name in expected)
    assert max_difference(initial, expected) > 1e-2  # the reference really trained
    assert max_difference(rank0["parameters"], rank1["parameters"]) == 0.0
    assert max_difference(rank0["parameters"], expected) < 1e-5
    assert rank0["step"] == rank1["step"] == STEPS  # under accumulation too: the step counts updates


@pytest.mark.slow
def test_teacher_is_unchanged_frozen_and_in_eval_mode_on_every_rank(fp32, bf16):
    for rank in fp32:
        for scenario in ("data_parallel", "accumulation"):
            assert rank[scenario]["teacher_unchanged"]
            assert not rank[scenario]["teacher_training"] and not rank[scenario]["teacher_requires_grad"]
        assert rank["resume"]["teacher_unchanged"] and rank["resume_kd_only"]["teacher_unchanged"]
    for rank in bf16:
        assert rank["bf16_teacher_fp32"]["teacher_unchanged"] and rank["bf16_teacher_bf16"]["teacher_unchanged"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario, wrapper", [("resume", "DistributedDataParallel"), ("resume_kd_only", "Distiller")])
def test_save_state_load_state_resumes_with_identical_losses(fp32, scenario, wrapper):
    """Fresh models of another seed + load_state give the next 3 losses exactly; the scheduled step is restored."""
    for rank in fp32:
        result = rank[scenario]
        assert result["wrapper"] == wrapper  # with connectors: DDP; KD only: left unwrapped, checkpointed as an object
        assert result["step_after_load"] == 4
        assert len(result["resumed"]) == 3
        assert result["resumed"] == result["before"]


@pytest.mark.slow
def test_per_term_losses_go_to_accelerator_log_once_per_update(fp32):
    for scenario in ("data_parallel", "accumulation"):
        logged = fp32[0][scenario]["logged"]
        assert [entry["step"] for entry in logged] == list(range(1, STEPS + 1))
        for entry in logged:
            assert set(entry) == {"step", "kd/task", "kd/kd", "kd/fitnets", "kd/total", "kd_raw/kd", "kd_raw/fitnets"}
            parts = entry["kd/task"] + entry["kd/kd"] + entry["kd/fitnets"]
            assert abs(parts - entry["kd/total"]) < 1e-5
            # the config's weights: kd 0.5, fitnets 2.0
            assert entry["kd/kd"] == pytest.approx(0.5 * entry["kd_raw/kd"], rel=1e-6)
            assert entry["kd/fitnets"] == pytest.approx(2.0 * entry["kd_raw/fitnets"], rel=1e-6)
        assert fp32[1][scenario]["logged"] == []  # trackers live on the main process only


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["bf16_teacher_fp32", "bf16_teacher_bf16"])
def test_bf16_autocast_on_cpu_features_and_connectors_meet_in_bf16(bf16, scenario):
    for rank in bf16:
        result = rank[scenario]
        assert result["mixed_precision"] == "bf16"
        assert result["connector_input"] == ["torch.bfloat16"]   # autocast really ran the student in bf16
        assert result["teacher_feature"] == ["torch.bfloat16"]   # and the teacher under the same autocast
        assert len(result["losses"]) == STEPS and result["finite"]
    expected = "torch.bfloat16" if scenario == "bf16_teacher_bf16" else "torch.float32"
    assert bf16[0][scenario]["teacher_parameters"] == [expected]


@pytest.mark.slow
def test_example_trains_kd_fitnets_on_two_processes(tmp_path):
    output = launch(EXAMPLE, "--epochs", "2", "--teacher-epochs", "4", "--teacher", str(tmp_path / "teacher.pt"),
                    "--checkpoint-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert "world size: 2 (MULTI_CPU" in output
    final = [line for line in output.splitlines() if line.startswith("final student accuracy:")]
    assert len(final) == 1 and float(final[0].split(":")[1]) > 0.3  # chance is 0.1
    assert (tmp_path / "state" / "model_1.safetensors").exists()  # the Distiller's connectors and step


# --- in this process: the precision fixes the launches rely on, and bad input ------------------------


def test_connector_outside_autocast_takes_bf16_features():
    """A student run under autocast, the loss formed outside it: the connector computes in its own dtype."""
    student, teacher, kd, optimizer = build(KD_FITNETS)
    x, y = digits_tensors(0)[0][:16], digits_tensors(0)[1][:16]
    student.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(x)
    assert kd.captures[kdhooks.Tap("student", "stage2")].dtype == torch.bfloat16
    loss = kd(F.cross_entropy(logits.float(), y), labels=y)
    loss.backward()
    weight = kd.connectors["fitnets"][0].weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    kd.close()


def test_teacher_in_bf16_takes_the_students_fp32_inputs():
    """A teacher kept in bf16 in an fp32 loop: the Distiller casts its inputs (else: a dtype error)."""
    student, teacher, kd, optimizer = build(KD_FITNETS)
    teacher.to(torch.bfloat16)
    x, y = digits_tensors(0)[0][:16], digits_tensors(0)[1][:16]
    student.train()
    student(x)
    assert kd.captures[kdhooks.Tap("teacher", "stage2")].dtype == torch.bfloat16
    loss = kd(F.cross_entropy(student(x), y), labels=y)
    assert torch.isfinite(loss) and kd.last_losses["kd"] > 0
    kd.close()


@pytest.mark.slow
def test_teacher_in_bf16_under_fp32_accelerate_training(fp32):
    for rank in fp32:
        result = rank["fp32_teacher_bf16"]
        assert result["mixed_precision"] == "no" and result["finite"] and len(result["losses"]) == STEPS
        assert result["teacher_parameters"] == ["torch.bfloat16"] and result["teacher_feature"] == ["torch.bfloat16"]
        assert result["connector_input"] == ["torch.float32"]


@pytest.mark.slow
def test_prepare_logs_the_engine_it_got_once_on_the_main_process(fp32):
    rank0, rank1 = fp32
    # data_parallel, accumulation, resume x2 (2 prepares each), fp32_teacher_bf16; bad_input's calls raise first
    assert len(rank0["log"]) == 7 and rank1["log"] == []
    assert all(line.startswith("INFO: kdhooks prepare: MULTI_CPU, world size 2, device cpu") for line in rank0["log"])
    assert "mixed precision no; Distiller: DistributedDataParallel; teacher: replicated on every rank" in rank0["log"][0]
    assert rank0["log"][0].endswith("torch.float32") and rank0["log"][-1].endswith("torch.bfloat16")


@pytest.mark.slow
def test_a_cpu_rehearsal_of_fsdp_warns_that_it_runs_data_parallel(fp32):
    rank0, rank1 = fp32
    assert rank0["rehearsal"]["distributed_type"] == "DistributedType.MULTI_CPU"
    [line] = rank0["rehearsal"]["log"]
    assert line.startswith("WARNING: kdhooks prepare: MULTI_CPU, world size 2")
    assert "(FSDP was requested, but accelerate runs MULTI_CPU" in line
    assert rank1["rehearsal"]["log"] == []


@pytest.mark.slow
def test_prepare_needs_exactly_one_distiller_and_a_known_teacher_dtype(fp32):
    errors = fp32[0]["errors"]
    assert "expected one Distiller among the objects, got 0" in errors["no_distiller"]
    assert "unknown dtype 'bf8'" in errors["teacher_dtype"] and "bf16" in errors["teacher_dtype"]
