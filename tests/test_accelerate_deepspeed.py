"""kdhooks.integrations.accelerate under DeepSpeed: 2 real processes, DeepSpeed's CPU accelerator, gloo.

One launch (``accelerate launch --use_deepspeed --zero_stage 2``, about 40 s on 2 cores) runs every
scenario of tests/_accelerate_worker_deepspeed.py: one plugin (from the launcher, ZeRO-1, -2, -3), the
student/teacher pair of plugins (ZeRO-2 student, ZeRO-3 teacher), connectors refused. Each is compared
with the hand-written single-process loop on the global batch. Skipped when deepspeed is not installed
(``pip install -e ".[deepspeed]"``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

from _accelerate_worker import KD_ONLY, STEPS  # noqa: E402
from test_accelerate import assert_losses_match, free_port, max_difference, single_process_run  # noqa: E402

TESTS = Path(__file__).parent
SCENARIOS = ["one_plugin_launcher", "one_plugin_zero1", "one_plugin_zero2", "one_plugin_zero3", "pair"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("accelerate_deepspeed")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "2",
               "--num_machines", "1", "--zero_stage", "2", "--gradient_clipping", "0", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(TESTS / "_accelerate_worker_deepspeed.py"), str(directory)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    done = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in result] == [0, 1]
    assert all(r["world_size"] == r["environment_world_size"] == 2 for r in result), "not a world of 2 processes"
    return result


@pytest.fixture(scope="module")
def reference() -> dict:
    """The hand-written loop in this process: KD alone, 10 SGD steps on batches of 2B = 32."""
    return single_process_run(KD_ONLY)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_deepspeed_equals_the_single_process_run(ranks, reference, scenario):
    """Same parameters after 10 updates (1e-5) and the same losses: the mean of the ranks' half batches."""
    rank0, rank1 = (r[scenario] for r in ranks)
    assert rank0["distributed_type"] == "DistributedType.DEEPSPEED" and rank0["student"] == "DeepSpeedEngine"
    assert max_difference(rank0["initial"], reference["parameters"]) > 1e-2  # the reference really trained
    assert max_difference(rank0["parameters"], rank1["parameters"]) == 0.0
    assert max_difference(rank0["parameters"], reference["parameters"]) < 1e-5
    assert_losses_match(rank0["losses"], rank1["losses"], reference["losses"])
    assert rank0["step"] == rank1["step"] == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_teacher_frozen_in_eval_and_out_of_the_checkpoint(ranks, scenario):
    for rank in ranks:
        result = rank[scenario]
        assert not result["teacher_training"] and not result["teacher_requires_grad"]
        assert result["models_checkpointed"] == 1  # save_state saves the student's engine, never the teacher's
        if scenario != "pair":
            assert result["teacher_unchanged"]


@pytest.mark.slow
def test_one_plugin_keeps_a_replica_the_pair_shards_the_teacher_with_zero3(ranks):
    for rank in ranks:
        for scenario in SCENARIOS[:-1]:
            assert rank[scenario]["teacher_resident_bytes"] == rank[scenario]["teacher_full_bytes"]
        pair = rank["pair"]
        # after 10 steps each rank holds its partition (half of the parameters), nothing gathered
        assert pair["teacher_resident_bytes"] <= pair["teacher_full_bytes"] // 2 + 64


@pytest.mark.slow
def test_prepare_logs_the_engine_once_on_the_main_process(ranks):
    rank0, rank1 = ranks
    lines = {scenario: rank0[scenario]["log"] for scenario in SCENARIOS}
    assert all(len(found) == 1 and found[0].startswith("INFO: kdhooks prepare: DEEPSPEED") for found in lines.values())
    assert "ZeRO-2, world size 2" in lines["one_plugin_launcher"][0]
    assert "ZeRO-3, world size 2" in lines["one_plugin_zero3"][0]
    assert "teacher: replicated on every rank" in lines["one_plugin_zero2"][0]
    assert "teacher: DeepSpeed plugin 'teacher' (ZeRO-3, sharded over 2 ranks), torch.float32" in lines["pair"][0]
    assert all(rank1[scenario]["log"] == [] for scenario in SCENARIOS)


@pytest.mark.slow
def test_connectors_under_deepspeed_are_a_config_error(ranks):
    error = ranks[0]["connectors"]["error"]
    assert "DeepSpeed prepares one trainable model per Accelerator" in error and "(fitnets)" in error
