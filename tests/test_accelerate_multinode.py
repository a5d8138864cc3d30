"""The Accelerate example on two simulated machines without a shared disk (about 40 s on 2 cores).

Two ``torchrun --nnodes 2 --nproc_per_node 1`` processes on this machine, each in its own folder, with
the same relative paths: machine 1 never sees machine 0's files (the teacher checkpoint, the state saved
by ``save_state``). The example trains, saves on each machine, resumes; a machine whose checkpoint is
gone stops both with a clear error.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

from test_accelerate import EXAMPLE, free_port  # noqa: E402

ARGS = ["--epochs", "1", "--teacher-epochs", "2", "--teacher", "runs/teacher.pt", "--checkpoint-dir", "runs/state"]


def two_machines(machines: list[Path], *args: str, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Machine 0 and machine 1 (node ranks), one process each, started together; their results.

    A machine that fails leaves the other waiting (in a collective, or its torchrun agent in the exit barrier,
    300 s): once one has failed the other gets 60 s, then is stopped, and the failing machine's output is shown.
    """
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = [tempfile.TemporaryFile(mode="w+") for _ in machines]
    running = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                                 "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                                 str(EXAMPLE), *ARGS, *args],
                                cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
               for rank, folder, output in zip(range(len(machines)), machines, outputs)]
    deadline = time.monotonic() + timeout
    while any(process.poll() is None for process in running) and time.monotonic() < deadline:
        if any(process.poll() not in (None, 0) for process in running):
            deadline = min(deadline, time.monotonic() + 60)
        time.sleep(0.5)
    for process in running:
        if process.poll() is None:                   # torchrun and its worker: the whole process group
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    results = []
    for process, output in zip(running, outputs):
        output.seek(0)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, output.read()))
        output.close()
    return results


def both_succeeded(results: list[subprocess.CompletedProcess]) -> bool:
    return [r.returncode for r in results] == [0, 0]


def shown(results: list[subprocess.CompletedProcess]) -> str:
    return "\n".join(f"--- machine {rank} (exit {r.returncode}):\n{r.stdout[-3000:]}" for rank, r in enumerate(results))


@pytest.mark.slow
def test_two_machines_without_a_shared_disk_train_and_resume(tmp_path):
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for folder in machines:
        folder.mkdir()

    first = two_machines(machines)
    assert both_succeeded(first), shown(first)
    output = first[0].stdout
    assert "world size: 2 (MULTI_CPU" in output and "machines: 2, checkpoints: saved on each machine" in output
    assert "epoch 1: step 20," in output  # 20 updates of 2 x 32 samples
    assert (machines[0] / "runs/teacher.pt").exists() and not (machines[1] / "runs/teacher.pt").exists()
    for rank, folder in enumerate(machines):  # each machine has the weights and its own process's RNG state
        state = folder / "runs/state"
        assert {"model.safetensors", "model_1.safetensors", "optimizer.bin"} <= {p.name for p in state.iterdir()}
        assert (state / f"random_states_{rank}.pkl").exists()

    resumed = two_machines(machines, "--resume")
    assert both_succeeded(resumed), shown(resumed)
    assert "epoch 1: step 40," in resumed[0].stdout  # the Distiller's step (and the schedules) went on

    for path in sorted((machines[1] / "runs/state").iterdir()):
        path.unlink()
    lost = two_machines(machines, "--resume")
    assert not both_succeeded(lost), shown(lost)
    for result in lost:
        assert "--resume: processes [1] do not see a complete checkpoint in runs/state" in result.stdout
