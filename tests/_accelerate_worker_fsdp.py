"""Launched by tests/test_accelerate_fsdp.py as 2 real processes: plain torch FSDP2 and FSDP1 on CPU (gloo).

``python _accelerate_worker_fsdp.py OUT_DIR``. Accelerate runs FSDP on GPUs only (with ``cpu=True`` it
turns an FSDP plugin into DDP), so the student is sharded here with ``fully_shard`` on a CPU device mesh
(FSDP2) or ``FullyShardedDataParallel(device_id=cpu)`` (FSDP1), and the teacher and the Distiller with the
functions ``kdhooks.integrations.accelerate.prepare`` uses under FSDP (``fsdp2_shard_teacher``,
``fsdp2_shard_distiller``, ``fsdp1_shard_teacher``). Every process writes what it saw to
``OUT_DIR/rank{N}.json``; the test compares it with the single-process loop of tests/test_accelerate.py.

Scenarios: 10 SGD updates of 32 samples (16 per process), KD + FitNets (a trainable connector):
- ``fsdp2``: per-block FSDP2 student, teacher, the Distiller its own unit;
- ``fsdp2_root_only_teacher``: the teacher as a single default ``fully_shard`` unit (what stays gathered);
- ``fsdp1_root_teacher``: the teacher as the root FSDP1 unit (what stays gathered);
- ``fsdp1``: FSDP1 student and Distiller (as accelerate prepares them), teacher through ``fsdp1_shard_teacher``.
The FSDP2 Distiller's checkpoint goes through what ``prepare`` registers for ``save_state`` (``_FullState``).
"""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from _accelerate_worker import GLOBAL_BATCH, KD_FITNETS, STEPS, build, same, snapshot, trained_parameters
from kdhooks.demo import digits_tensors
from kdhooks.integrations.accelerate import (_FullState, _give_back_parameters, _take_parameters, fsdp1_shard_teacher,
                                             fsdp2_shard_distiller, fsdp2_shard_teacher)

CPU = torch.device("cpu")


def fsdp2_bytes(module: nn.Module) -> int:
    """Parameter bytes this rank holds for ``module`` now: a shard (DTensor) or, while gathered, the whole."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def fsdp1_bytes(module: nn.Module) -> int:
    """The same for FSDP1: each unit's local shard of its flat parameter plus its gathered buffer, if allocated."""
    total = 0
    for unit in FSDP.fsdp_modules(module):
        handle = unit._handle
        if handle is None:
            continue
        flat = handle.flat_param
        shard = getattr(flat, "_local_shard", flat)
        total += shard.numel() * shard.element_size()
        padded = getattr(flat, "_full_param_padded", None)
        if padded is not None:
            total += padded.untyped_storage().nbytes()
    return total


def full_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def batches(rank: int):
    images, labels = digits_tensors(0)[:2]
    half = GLOBAL_BATCH // 2
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + rank * half
        yield images[start:start + half], labels[start:start + half]


def watch_peak(teacher: nn.Module, measure) -> dict:
    """The most bytes of the teacher's parameters held at the end of any of its modules' forward."""
    seen = {"peak": 0}

    def hook(module, args, output):
        seen["peak"] = max(seen["peak"], measure())
    for module in teacher.modules():
        module.register_forward_hook(hook)
    return seen


def run_teacher(distiller, runner: nn.Module) -> None:
    """What ``prepare`` does under FSDP1: the Distiller runs the teacher's wrapper."""
    distiller.wrap_call("teacher", lambda call: lambda module, args, kwargs: call(runner, args, kwargs))


def gathered(student: nn.Module, kd: nn.Module) -> dict[str, list]:
    named = {f"student.{k}": (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in student.named_parameters()}
    named.update({f"kd.{k}": (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in kd.named_parameters()})
    return {name: value.detach().float().flatten().tolist() for name, value in named.items()}


def train(student, kd_call, kd, optimizer, rank: int, after_step=None) -> list[dict]:
    losses = []
    student.train()
    for x, y in batches(rank):
        loss = kd_call(F.cross_entropy(student(x), y), labels=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(kd.last_losses)
        if after_step is not None:
            after_step()
    return losses


def checkpoint_round_trip(kd, mesh, directory: Path, out: dict) -> None:
    """What ``accelerator.save_state``/``load_state`` do with the Distiller ``prepare`` registers under FSDP2:
    ``state_dict`` on every rank, saved by rank 0 alone; loaded on every rank into a fresh sharded Distiller."""
    state = _FullState(kd).state_dict()
    path = directory / "distiller.pt"
    if dist.get_rank() == 0:
        torch.save(state, path)
    dist.barrier()
    _, _, fresh, _ = build(KD_FITNETS, seed=1)
    fsdp2_shard_distiller(fresh, mesh=mesh)
    _FullState(fresh).load_state_dict(torch.load(path, weights_only=False))
    out["resumed_step"] = fresh.step
    out["resumed_equal"] = all(torch.equal(a.full_tensor(), b.full_tensor())
                               for a, b in zip(kd.parameters(), fresh.parameters()))
    out["resumed_is_dtensor"] = all(isinstance(p, DTensor) for p in fresh.parameters())
    out["saved_shapes"] = {name: list(value.shape) for name, value in state.items()}
    fresh.close()


def fsdp2(rank: int, mesh, out: dict, directory: Path) -> None:
    student, teacher, kd, optimizer = build(KD_FITNETS)  # the optimizer holds the student's and the connector's
    teacher_before = snapshot(teacher)
    connector_before = [p.detach().clone() for p in kd.parameters()]
    out["teacher_full_bytes"] = full_bytes(teacher)
    # prepare's steps under FSDP2: the Distiller's parameters leave the optimizer while accelerate shards the
    # student and swaps its parameters for their shards (done here as accelerate does it, by name)...
    held = _take_parameters([optimizer], kd)
    before = {name: p for name, p in student.named_parameters()}
    for block in (student.stage1, student.stage2, student.stage3, student.fc):
        fully_shard(block, mesh=mesh)
    fully_shard(student, mesh=mesh)
    after_names = {id(before[name]): p for name, p in student.named_parameters()}
    for group in optimizer.param_groups:
        group["params"] = [after_names[id(p)] for p in group["params"]]
    optimizer.load_state_dict(optimizer.state_dict())  # accelerate's optimizer wrapper: new param-group dicts
    # ...then the teacher and the Distiller are sharded, and the Distiller's shards go back into the optimizer
    fsdp2_shard_teacher(teacher, mesh=mesh)
    fsdp2_shard_distiller(kd, mesh=mesh)
    _give_back_parameters(held, kd)
    out["optimizer_holds_connector_shards"] = [
        sum(isinstance(p, DTensor) for p in group["params"]) for group in optimizer.param_groups] == [
        len(list(student.parameters())) + len(list(kd.parameters()))]
    out["teacher_bytes_sharded"] = fsdp2_bytes(teacher)
    peak = watch_peak(teacher, lambda: fsdp2_bytes(teacher))
    after: list[int] = []
    out["losses"] = train(student, kd, kd, optimizer, rank, lambda: after.append(fsdp2_bytes(teacher)))
    out.update(teacher_bytes_after_steps=after, teacher_peak_bytes=peak["peak"],
               parameters=gathered(student, kd), step=kd.step,
               teacher_units=sum(type(m).__name__.startswith("FSDP") for m in teacher.modules()),
               connector_is_dtensor=all(isinstance(p, DTensor) for p in kd.parameters()),
               connector_changed=any(not torch.equal(a, b.full_tensor()) for a, b in zip(connector_before, kd.parameters())),
               teacher_training=teacher.training, teacher_requires_grad=any(p.requires_grad for p in teacher.parameters()))
    checkpoint_round_trip(kd, mesh, directory, out)
    kd.close()
    out["teacher_unchanged"] = all(torch.equal(v, (teacher.state_dict()[k].full_tensor()
                                                    if isinstance(teacher.state_dict()[k], DTensor)
                                                    else teacher.state_dict()[k]))
                                   for k, v in teacher_before.items())


def fsdp2_root_only_teacher(rank: int, mesh, out: dict) -> None:
    student, teacher, kd, optimizer = build(KD_FITNETS)
    fully_shard(teacher, mesh=mesh)  # one unit, the root: FSDP2 keeps it gathered after forward
    out["teacher_bytes_sharded"] = fsdp2_bytes(teacher)
    after: list[int] = []
    train(student, kd, kd, optimizer, rank, lambda: after.append(fsdp2_bytes(teacher)))
    out["teacher_bytes_after_steps"] = after
    kd.close()


def fsdp1_root_teacher(rank: int, out: dict) -> None:
    student, teacher, kd, optimizer = build(KD_FITNETS)
    runner = FSDP(teacher, device_id=CPU)  # the teacher as the root unit: FSDP1 keeps it gathered after forward
    run_teacher(kd, runner)
    out["teacher_bytes_sharded"] = fsdp1_bytes(runner)
    after: list[int] = []
    train(student, kd, kd, optimizer, rank, lambda: after.append(fsdp1_bytes(runner)))
    out["teacher_bytes_after_steps"] = after
    kd.close()


def fsdp1(rank: int, out: dict) -> None:
    student, teacher, kd, _ = build(KD_FITNETS)
    teacher_before = snapshot(teacher)
    connector_before = [p.detach().clone() for p in kd.parameters()]
    out["teacher_full_bytes"] = full_bytes(teacher)
    student = FSDP(student, device_id=CPU, use_orig_params=True)
    wrapped = FSDP(kd, device_id=CPU, use_orig_params=True)  # as accelerate prepares a Distiller with connectors
    runner = fsdp1_shard_teacher(teacher, device_id=CPU)
    run_teacher(kd, runner)
    optimizer = torch.optim.SGD([*student.parameters(), *wrapped.parameters()], lr=0.05, momentum=0.9)
    out["teacher_bytes_sharded"] = fsdp1_bytes(runner)
    peak = watch_peak(teacher, lambda: fsdp1_bytes(runner))
    after: list[int] = []
    out["losses"] = train(student, wrapped, kd, optimizer, rank, lambda: after.append(fsdp1_bytes(runner)))
    out.update(teacher_bytes_after_steps=after, teacher_peak_bytes=peak["peak"], step=kd.step,
               teacher_training=teacher.training, teacher_requires_grad=any(p.requires_grad for p in teacher.parameters()))
    with FSDP.summon_full_params(student), FSDP.summon_full_params(wrapped):
        out["parameters"] = trained_parameters(student.module, kd)
        out["connector_changed"] = any(not torch.equal(a, b) for a, b in zip(connector_before, kd.parameters()))
    with FSDP.summon_full_params(runner):
        out["teacher_unchanged"] = same(teacher_before, teacher)
    kd.close()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results: dict = {"world_size": dist.get_world_size(), "rank": rank,
                     "environment_world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    fsdp2(rank, mesh, results.setdefault("fsdp2", {}), Path(out_dir))
    fsdp2_root_only_teacher(rank, mesh, results.setdefault("fsdp2_root_only_teacher", {}))
    fsdp1_root_teacher(rank, results.setdefault("fsdp1_root_teacher", {}))
    fsdp1(rank, results.setdefault("fsdp1", {}))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # free what is left in reference cycles before interpreter shutdown, where gloo's threads can abort a finished
    # process (SIGABRT; see examples/accelerate/train.py)
    gc.collect()
