"""Accelerate: a Distiller in an Accelerate loop, from one process to DDP, FSDP and DeepSpeed.

    kd = kdhooks.Distiller(student, teacher, "kd.yaml", example_inputs=x0)
    optimizer = torch.optim.AdamW([*student.parameters(), *kd.parameters()])
    student, optimizer, loader, kd = kdhooks.integrations.accelerate.prepare(
        accelerator, student, optimizer, loader, kd)
    for x, y in loader:
        with accelerator.accumulate(student, kd):
            loss = kd(F.cross_entropy(student(x), y), labels=y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()

``prepare`` is ``accelerator.prepare`` that knows the Distiller. It translates,
nothing more: the teacher goes where the engine wants it (the device; under
FSDP or DeepSpeed a sharded evaluation model) and runs under the accelerator's
autocast; a Distiller with connectors is prepared by the engine like any model
(so DDP or FSDP synchronise its gradients, no ``find_unused_parameters``
needed: each connector gets a gradient every step); one without trainable
parameters stays unwrapped and is registered for checkpointing. Under gradient
accumulation the Distiller's step (which drives schedules) counts optimizer
updates, and each update's per-term losses, averaged over its micro-batches,
go to ``accelerator.log``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

import kdhooks

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prepare(accelerator: Accelerator, *objects: Any, teacher_dtype: torch.dtype | str | None = None,
            log_prefix: str = "kd/") -> Any:
    """``accelerator.prepare(*objects)`` where one of the objects is a ``kdhooks.Distiller``.

    Returns the objects in the order given, the Distiller as the engine wrapped
    it (reach the Distiller itself with ``accelerator.unwrap_model(kd)``).
    ``teacher_dtype`` (``torch.bfloat16`` or ``"bf16"``, ...) keeps the teachers
    in a lower precision; their inputs are cast to it.
    """
    if isinstance(teacher_dtype, str) and teacher_dtype not in _DTYPES:
        raise kdhooks.ConfigError("teacher_dtype", f"unknown dtype {teacher_dtype!r}", value=teacher_dtype,
                                  fix=f"use one of {', '.join(_DTYPES)} or a torch.dtype")
    dtype = _DTYPES[teacher_dtype] if isinstance(teacher_dtype, str) else teacher_dtype
    found = [i for i, obj in enumerate(objects) if isinstance(obj, kdhooks.Distiller)]
    if len(found) != 1:
        raise kdhooks.ConfigError("prepare", f"expected one Distiller among the objects, got {len(found)}",
                                  fix="pass the Distiller next to the student, optimizer and data loaders")
    index = found[0]
    distiller: kdhooks.Distiller = objects[index]
    others = objects[:index] + objects[index + 1:]
    trainable = any(p.requires_grad for p in distiller.parameters())
    if trainable and _engine_trains_one_model(accelerator):
        raise kdhooks.ConfigError(
            "prepare", f"{_engine_name(accelerator)} prepares one trainable model per Accelerator, and this "
            f"Distiller has trainable parts ({', '.join(_trainable_parts(distiller))})",
            fix="train connectors under DDP or FSDP1, or use terms without trainable parts (kd) here")
    prepared = list(_prepare_all(accelerator, *others, *([distiller] if trainable else [])))
    if trainable:
        wrapped = prepared.pop()
    else:
        wrapped = distiller.to(accelerator.device)
        accelerator.register_for_checkpointing(distiller)
    for role in distiller.roles:
        if role != "student" and not distiller.is_trainable(role):
            _prepare_teacher(accelerator, distiller, role, dtype)
    distiller.counts_steps = False  # it counts updates, not micro-batches
    distiller.register_forward_hook(_Updates(accelerator, log_prefix))
    prepared.insert(index, wrapped)
    return tuple(prepared) if len(prepared) > 1 else prepared[0]


def _prepare_all(accelerator: Accelerator, *objects: Any) -> tuple:
    if not objects:
        return ()
    result = accelerator.prepare(*objects)
    return result if len(objects) > 1 else (result,)


def _prepare_teacher(accelerator: Accelerator, distiller: kdhooks.Distiller, role: str,
                     dtype: torch.dtype | None) -> None:
    """Frozen and in eval mode already (the Distiller saw to it): placed, sharded where the engine shards."""
    teacher = distiller.model(role)
    if dtype is not None:
        teacher.to(dtype=dtype)
    runner: nn.Module = teacher
    deepspeed_plugins = getattr(accelerator.state, "deepspeed_plugins", None) or {}
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2:
        from accelerate.utils import fsdp2_prepare_model

        fsdp2_prepare_model(accelerator, teacher)  # shards in place: the same module, hooks kept
    elif accelerator.distributed_type == DistributedType.FSDP:
        # FSDP1 wraps the teacher; the Distiller runs the wrapper, its taps stay on the modules inside
        runner = accelerator.prepare_model(teacher).eval()
    elif accelerator.distributed_type == DistributedType.DEEPSPEED and role in deepspeed_plugins:
        # accelerate's multi-model DeepSpeed: a plugin named like the role (e.g. ZeRO-3 for "teacher")
        active = next(name for name, plugin in deepspeed_plugins.items() if plugin.selected)
        accelerator.state.select_deepspeed_plugin(role)
        runner = accelerator.prepare(teacher).eval()
        accelerator.state.select_deepspeed_plugin(active)
    else:
        teacher.to(accelerator.device)
    distiller.wrap_call(role, lambda call: _run_teacher(accelerator, call, runner))


def _run_teacher(accelerator: Accelerator, call: Callable, runner: nn.Module) -> Callable:
    def run(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        # the student's forward runs under the accelerator's autocast; the teacher, called from its
        # pre-hook, runs under the same precision
        with accelerator.autocast():
            return call(runner, args, kwargs)
    return run


class _Updates:
    """A forward hook on the Distiller: its step counts optimizer updates; their losses go to the trackers.

    Inside ``accelerator.accumulate`` only the micro-batch that ends an update
    (``accelerator.sync_gradients``) advances the step, so schedules run in
    updates; the update's losses are averaged over its micro-batches.
    """

    def __init__(self, accelerator: Accelerator, prefix: str):
        self.accelerator = accelerator
        self.prefix = prefix
        self.meter = kdhooks.LossMeter()

    def __call__(self, distiller: kdhooks.Distiller, args: tuple, output: Any) -> None:
        if self.accelerator.trackers:  # only the main process has trackers: no host sync elsewhere
            self.meter.add(distiller)
        if not self.accelerator.sync_gradients:
            return  # the update is not finished: its micro-batches share one step
        distiller.step += 1
        if self.meter.steps:
            self.accelerator.log({self.prefix + name: mean for name, mean in self.meter.means().items()},
                                 step=distiller.step)
        self.meter.reset()


def _engine_trains_one_model(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED or (
        accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2)


def _engine_name(accelerator: Accelerator) -> str:
    return "DeepSpeed" if accelerator.distributed_type == DistributedType.DEEPSPEED else "FSDP2"


def _trainable_parts(distiller: kdhooks.Distiller) -> list[str]:
    return sorted({name.split(".")[1] for name, p in distiller.named_parameters() if p.requires_grad and "." in name})
