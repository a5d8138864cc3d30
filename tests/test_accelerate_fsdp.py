"""The FSDP steps of kdhooks.integrations.accelerate under plain torch FSDP2 and FSDP1: 2 real processes, gloo.

One launch (about 20 s on 2 cores) runs tests/_accelerate_worker_fsdp.py. Accelerate itself runs FSDP on
GPUs only (``cpu=True`` turns an FSDP plugin into DDP), so the worker shards the student with
``fully_shard`` on a CPU mesh (FSDP2) or ``FullyShardedDataParallel(device_id=cpu)`` (FSDP1), and the teacher
and the Distiller with the functions ``prepare`` applies under FSDP. Compared with the single-process loop:
parameters and losses, the teacher's bytes per rank, the connector trained and checkpointed.
"""
from __future__ import annotations

import json

import pytest

from test_accelerate import TESTS, assert_losses_match, launch, max_difference, single_process_run

FULL = 376_744   # the digits teacher's parameters, fp32
SHARD = FULL // 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("accelerate_fsdp")
    launch(TESTS / "_accelerate_worker_fsdp.py", str(directory), cwd=directory)
    result = [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in result] == [0, 1]
    assert all(r["world_size"] == r["environment_world_size"] == 2 for r in result), "not a world of 2 processes"
    return result


@pytest.fixture(scope="module")
def reference() -> dict:
    return single_process_run()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["fsdp2", "fsdp1"])
def test_fsdp_equals_the_single_process_run_connector_trained(ranks, reference, scenario):
    """KD + FitNets, the connector sharded and trained with the student: parameters (1e-5) and losses equal."""
    rank0, rank1 = (r[scenario] for r in ranks)
    assert max_difference(reference["initial"], reference["parameters"]) > 1e-2
    assert any(name.startswith("kd.connectors.fitnets") for name in rank0["parameters"])
    assert max_difference(rank0["parameters"], rank1["parameters"]) == 0.0
    assert max_difference(rank0["parameters"], reference["parameters"]) < 1e-5
    assert_losses_match(rank0["losses"], rank1["losses"], reference["losses"])
    for rank in (rank0, rank1):
        assert rank["connector_changed"] and rank["step"] == 10
        assert rank["teacher_unchanged"] and not rank["teacher_training"] and not rank["teacher_requires_grad"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["fsdp2", "fsdp1"])
def test_teacher_stays_at_its_shard_between_steps(ranks, scenario):
    for rank in ranks:
        result = rank[scenario]
        assert result["teacher_full_bytes"] == FULL
        assert result["teacher_bytes_sharded"] == SHARD
        assert result["teacher_bytes_after_steps"] == [SHARD] * 10  # after every step, not only before the first
        assert SHARD < result["teacher_peak_bytes"] <= SHARD + FULL  # gathered while it runs
    # FSDP2, one unit per block: the peak is the shard plus the largest block (stage3), not the whole teacher
    assert ranks[0]["fsdp2"]["teacher_peak_bytes"] < FULL
    assert ranks[0]["fsdp2"]["teacher_units"] == 5  # stage1, stage2, stage3, fc and the root


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["fsdp2_root_only_teacher", "fsdp1_root_teacher"])
def test_a_teacher_as_the_root_unit_stays_gathered(ranks, scenario):
    """Why the teacher needs more than a plain wrap: the root is kept gathered for a backward that never comes."""
    for rank in ranks:
        result = rank[scenario]
        assert result["teacher_bytes_sharded"] == SHARD
        assert all(after >= FULL for after in result["teacher_bytes_after_steps"])


@pytest.mark.slow
def test_fsdp2_distiller_is_its_own_unit_and_checkpoints_whole_tensors(ranks):
    for rank in ranks:
        result = rank["fsdp2"]
        assert result["connector_is_dtensor"] and result["resumed_is_dtensor"]
        assert result["optimizer_holds_connector_shards"]  # put back by prepare's steps, after the student's swap
        assert result["saved_shapes"]["connectors.fitnets.0.weight"] == [64, 8, 1, 1]  # whole, not a shard
        assert result["resumed_equal"] and result["resumed_step"] == 10
