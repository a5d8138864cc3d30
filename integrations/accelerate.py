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
FSDP or a DeepSpeed teacher plugin a sharded evaluation model that stays
sharded between its forwards) and runs under the accelerator's autocast; a
Distiller with connectors is prepared by the engine like any model (so DDP or
FSDP synchronise its gradients, no ``find_unused_parameters`` needed: each
connector gets a gradient every step; under FSDP2 it is its own FSDP unit);
one without trainable parameters stays unwrapped and is registered for
checkpointing. Under gradient accumulation the Distiller's step (which drives
schedules) counts optimizer updates, and each update's per-term losses,
averaged over its micro-batches, go to ``accelerator.log``. ``prepare`` logs
the engine it really got (a CPU rehearsal with an FSDP or DeepSpeed plugin
may silently be DDP), once, on the main process.

``fsdp2_shard_teacher`` and ``fsdp2_shard_distiller`` are the FSDP2 steps
``prepare`` takes; a loop on plain ``torch.distributed.fsdp.fully_shard``
calls them itself.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

import kdhooks

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
logger = logging.getLogger(__name__)


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
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    fsdp2 = accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2
    if trainable and deepspeed:
        raise kdhooks.ConfigError(
            "prepare", "DeepSpeed prepares one trainable model per Accelerator, and this Distiller has trainable "
            f"parts ({', '.join(_trainable_parts(distiller))})",
            fix="train connectors under DDP, FSDP1 or FSDP2, or use terms without trainable parts (kd) here")
    if trainable and fsdp2:
        # accelerate's FSDP2 prepares one model per call: the Distiller becomes its own FSDP unit, and its
        # parameters leave the optimizer while accelerate swaps the student's for their shards
        optimizers = [obj for obj in others if isinstance(obj, torch.optim.Optimizer)]
        held = _take_parameters(optimizers, distiller)
        prepared = list(_prepare_all(accelerator, *others))
        fsdp2_shard_distiller(distiller, **_fsdp2_options(accelerator))
        _give_back_parameters(held, distiller)
        wrapped = distiller
        accelerator.register_for_checkpointing(_FullState(distiller))  # whole tensors, not rank 0's shards
    else:
        prepared = list(_prepare_all(accelerator, *others, *([distiller] if trainable else [])))
        if trainable:
            wrapped = prepared.pop()
        else:
            wrapped = distiller.to(accelerator.device)
            accelerator.register_for_checkpointing(distiller)
    placements = {}
    for role in distiller.roles:
        if role != "student" and not distiller.is_trainable(role):
            placements[role] = _prepare_teacher(accelerator, distiller, role, dtype)
    distiller.counts_steps = False  # it counts updates, not micro-batches
    distiller.register_forward_hook(_Updates(accelerator, log_prefix))
    if accelerator.is_main_process:
        _log_engine(accelerator, wrapped, placements)
    prepared.insert(index, wrapped)
    return tuple(prepared) if len(prepared) > 1 else prepared[0]


def _prepare_all(accelerator: Accelerator, *objects: Any) -> tuple:
    if not objects:
        return ()
    result = accelerator.prepare(*objects)
    return result if len(objects) > 1 else (result,)


# --- the teacher ---------------------------------------------------------------------------------


def _prepare_teacher(accelerator: Accelerator, distiller: kdhooks.Distiller, role: str,
                     dtype: torch.dtype | None) -> str:
    """Frozen and in eval mode already (the Distiller saw to it): placed, sharded where the engine shards.

    Returns where it lives, in words, for the log.
    """
    teacher = distiller.model(role)
    if dtype is not None:
        teacher.to(dtype=dtype)
    runner: nn.Module = teacher
    plugins = _deepspeed_plugins(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2:
        fsdp2_shard_teacher(teacher, blocks=_fsdp2_blocks(accelerator, teacher), **_fsdp2_options(accelerator))
        place = f"FSDP2, sharded over {accelerator.num_processes} ranks, one unit per block, resharded after forward"
    elif accelerator.distributed_type == DistributedType.FSDP:
        # FSDP1 wraps the teacher as the plugin says; the Distiller runs the wrapper (in a shell, so that the
        # teacher is not the root FSDP keeps gathered for a backward), its taps stay on the modules inside
        unit = _outside_checkpoints(accelerator, lambda: accelerator.prepare_model(teacher))
        plugin = accelerator.state.fsdp_plugin
        runner = fsdp1_shard_teacher(unit, device_id=accelerator.device, mixed_precision=plugin.mixed_precision_policy)
        place = f"FSDP1, sharded over {accelerator.num_processes} ranks, resharded after forward"
    elif accelerator.distributed_type == DistributedType.DEEPSPEED and role in plugins:
        # accelerate's multi-model DeepSpeed: a plugin named like the role (e.g. ZeRO-3 for "teacher")
        runner = _deepspeed_teacher(accelerator, plugins, role, teacher)
        stage = plugins[role].deepspeed_config.get("zero_optimization", {}).get("stage", 0)
        place = (f"DeepSpeed plugin {role!r} (ZeRO-{stage}"
                 + (f", sharded over {accelerator.num_processes} ranks)" if stage == 3 else ", replicated)"))
    else:
        teacher.to(accelerator.device)
        place = f"replicated on every rank ({accelerator.device})"
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            place += (f"; one DeepSpeed plugin: pass deepspeed_plugins={{'student': ..., {role!r}: <ZeRO-3>}} "
                      "to shard it")
    distiller.wrap_call(role, lambda call: _run_teacher(accelerator, call, runner))
    first = next(teacher.parameters(), None)
    return f"{place}, {first.dtype if first is not None else 'no parameters'}"


def _deepspeed_teacher(accelerator: Accelerator, plugins: dict, role: str, teacher: nn.Module) -> nn.Module:
    """The teacher as a DeepSpeed inference engine under its own plugin (then the student's plugin again)."""
    active = next(name for name, plugin in plugins.items() if plugin.selected)
    plugin = plugins[role]
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        # no data loader is prepared with the teacher, so accelerate cannot fill "auto"; DeepSpeed validates
        # the batch size of an inference engine too: the student's is the one the teacher sees
        student_batch = plugins[active].deepspeed_config.get("train_micro_batch_size_per_gpu")
        if not isinstance(student_batch, int):
            raise kdhooks.ConfigError(
                f"deepspeed_plugins[{role!r}]", "train_micro_batch_size_per_gpu is 'auto' and no data loader was "
                "prepared with the student to take it from",
                fix="prepare the training DataLoader in the same call, or set train_micro_batch_size_per_gpu "
                    "in the teacher's DeepSpeed config")
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = student_batch
    accelerator.state.select_deepspeed_plugin(role)
    try:
        engine = _outside_checkpoints(accelerator, lambda: accelerator.prepare(teacher))
    finally:
        accelerator.state.select_deepspeed_plugin(active)
    engine.eval()  # DeepSpeedEngine.eval() returns None: never chain it
    return engine


def _outside_checkpoints(accelerator: Accelerator, prepare_one: Callable[[], nn.Module]) -> nn.Module:
    """``prepare_one()`` without the teacher joining ``accelerator.save_state`` (it is never checkpointed)."""
    count = len(accelerator._models)
    runner = prepare_one()
    del accelerator._models[count:]  # what this call appended: the teacher's wrapper
    return runner


def _run_teacher(accelerator: Accelerator, call: Callable, runner: nn.Module) -> Callable:
    def run(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        # the student's forward runs under the accelerator's autocast; the teacher, called from its
        # pre-hook, runs under the same precision
        with accelerator.autocast():
            return call(runner, args, kwargs)
    return run


def _deepspeed_plugins(accelerator: Accelerator) -> dict:
    """The named plugins of multi-model DeepSpeed; none for a single plugin (stored as the plugin itself)."""
    plugins = getattr(accelerator.state, "deepspeed_plugins", None)
    return plugins if isinstance(plugins, dict) else {}


# --- FSDP2 ---------------------------------------------------------------------------------------


def fsdp2_shard_teacher(teacher: nn.Module, *, blocks: Iterable[nn.Module] | None = None, mesh: Any = None,
                        mp_policy: Any = None, offload_policy: Any = None) -> nn.Module:
    """Shard a model that only runs forward (a teacher) with FSDP2 so that it stays sharded.

    Each block (``blocks``; by default the modules named in ``teacher._no_split_modules``, else the
    children that hold parameters) is an FSDP unit, the root another, all with
    ``reshard_after_forward=True``: a rank holds its shard plus one unit while the teacher runs. (FSDP2
    keeps a root unsharded after forward for the backward that follows; a teacher has none.)
    In place: the same module, the Distiller's taps kept. Returns it.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
               "offload_policy": offload_policy or OffloadPolicy(), "reshard_after_forward": True}
    if isinstance(teacher, FSDPModule):
        return teacher
    units = list(blocks) if blocks is not None else _default_blocks(teacher)
    for module in units:
        if module is not teacher and not isinstance(module, FSDPModule) and _has_parameters(module):
            fully_shard(module, **options)
    fully_shard(teacher, **options)
    return teacher


def fsdp2_shard_distiller(distiller: kdhooks.Distiller, *, mesh: Any = None, mp_policy: Any = None,
                          offload_policy: Any = None) -> kdhooks.Distiller:
    """Make the Distiller's trainable parts (connectors, heads) one FSDP2 unit of their own.

    ``kd(...)`` gathers them for the loss; backward reduce-scatters their gradients like the student's.
    In place; the parameters become new (sharded) objects: build the optimizer afterwards, or let
    ``prepare`` swap them in the optimizer.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if isinstance(distiller, FSDPModule) or not any(p.requires_grad for p in distiller.parameters()):
        return distiller
    fully_shard(distiller, mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(),
                offload_policy=offload_policy or OffloadPolicy(), reshard_after_forward=True)
    return distiller


def fsdp1_shard_teacher(teacher: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Shard a model that only runs forward (a teacher) with FSDP1 so that it stays sharded; returns its runner.

    The teacher becomes an FSDP unit (``fsdp_kwargs``: ``device_id``, ``auto_wrap_policy``, ...; or it is one
    already) inside a parameterless root: FSDP1 keeps the root's parameters gathered after forward for the
    backward that follows, and a teacher has none. Run the returned wrapper (``distiller.wrap_call``); the
    teacher's modules, and the Distiller's taps on them, are inside it.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    unit = teacher if isinstance(teacher, FSDP) else FSDP(teacher, **fsdp_kwargs)
    root = {k: v for k, v in fsdp_kwargs.items() if k in ("process_group", "device_id", "mixed_precision")}
    runner = FSDP(_Shell(unit), **root)
    runner.eval()
    return runner


class _Shell(nn.Module):
    """A parameterless module around the teacher's FSDP1 unit: the root FSDP wraps it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


class _FullState:
    """The checkpoint of an FSDP2-sharded Distiller for ``accelerator.save_state``: whole tensors.

    accelerate saves a registered object's ``state_dict()`` from the main process only, which would be rank
    0's shards; every rank calls ``state_dict`` (gathering is collective) and ``load_state_dict``, which
    takes back each rank's shard of the saved whole.
    """

    def __init__(self, distiller: nn.Module):
        self.distiller = distiller

    def state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        return {name: value.full_tensor() if isinstance(value, DTensor) else value
                for name, value in self.distiller.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        own = self.distiller.state_dict()
        for name, value in own.items():
            if isinstance(value, DTensor) and name in state:
                whole = state[name].to(device=value.device, dtype=value.dtype)
                state[name] = distribute_tensor(whole, value.device_mesh, value.placements)
        self.distiller.load_state_dict(state)


def _fsdp2_options(accelerator: Accelerator) -> dict:
    """The mesh and policies accelerate's FSDP2 uses for the student (``fsdp2_prepare_model``)."""
    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    return {"mesh": mesh, "mp_policy": plugin.mixed_precision_policy, "offload_policy": plugin.cpu_offload or None}


def _fsdp2_blocks(accelerator: Accelerator, teacher: nn.Module) -> list[nn.Module] | None:
    """The units the FSDP plugin's auto-wrap policy picks in the teacher (None: the default blocks)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    plugin.set_auto_wrap_policy(teacher)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, teacher)
    if policy is None:
        return None
    return [m for m in teacher.modules() if m is not teacher and policy(m)] or None


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    return [child for child in model.children() if _has_parameters(child)]


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _take_parameters(optimizers: list[torch.optim.Optimizer], distiller: kdhooks.Distiller) -> list:
    """Remove the Distiller's parameters from the optimizers (no state yet); where they were, to put back.

    By optimizer and group index: accelerate's optimizer wrapper reloads the state dict, which makes new
    param-group dicts in the same optimizer.
    """
    ids = {id(p): name for name, p in distiller.named_parameters()}
    held = []
    for optimizer in optimizers:
        for index, group in enumerate(optimizer.param_groups):
            places = [(i, ids[id(p)]) for i, p in enumerate(group["params"]) if id(p) in ids]
            if any(optimizer.state.get(p) for p in group["params"] if id(p) in ids):
                raise kdhooks.ConfigError("prepare", "the optimizer already has state for the Distiller's parameters",
                                          fix="call prepare before the first optimizer step")
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            held.append((optimizer, index, places))
    return held


def _give_back_parameters(held: list, distiller: kdhooks.Distiller) -> None:
    """Put the Distiller's (now sharded) parameters back where they were in each param group."""
    by_name = dict(distiller.named_parameters())
    for optimizer, index, places in held:
        params = list(optimizer.param_groups[index]["params"])
        for position, name in places:  # ascending: each lands where it was
            params.insert(position, by_name[name])
        optimizer.param_groups[index]["params"] = params


# --- steps and logs ------------------------------------------------------------------------------


class _Updates:
    """A forward hook on the Distiller: its step counts optimizer updates; their losses go to the trackers
    (``<prefix><part>`` as added to the loss, ``<prefix>_raw/<term>`` before the term's weight).

    Inside ``accelerator.accumulate`` only the micro-batch that ends an update
    (``accelerator.sync_gradients``) advances the step, so schedules run in
    updates; the update's losses are averaged over its micro-batches.
    """

    def __init__(self, accelerator: Accelerator, prefix: str):
        self.accelerator = accelerator
        self.prefix = prefix
        # each term before its weight: `kd/` → `kd_raw/` (as the HF adapter's distill/ → distill_raw/)
        self.raw_prefix = f"{prefix[:-1]}_raw/" if prefix.endswith("/") else f"{prefix}raw_"
        self.meter = kdhooks.LossMeter()

    def __call__(self, distiller: kdhooks.Distiller, args: tuple, output: Any) -> None:
        if distiller.is_evaluating:
            return  # kd(...) inside kd.evaluating(): not an update, nothing to log as training
        if self.accelerator.trackers:  # only the main process has trackers: no host sync elsewhere
            self.meter.add(distiller)
        if not self.accelerator.sync_gradients:
            return  # the update is not finished: its micro-batches share one step
        distiller.step += 1
        if self.meter.steps:
            logs = {self.prefix + name: mean for name, mean in self.meter.means().items()}
            logs.update({self.raw_prefix + name: mean for name, mean in self.meter.raw_means().items()})
            self.accelerator.log(logs, step=distiller.step)
        self.meter.reset()


def _log_engine(accelerator: Accelerator, wrapped: nn.Module, placements: dict[str, str]) -> None:
    """One line on the engine prepare really got; a warning when a requested FSDP/DeepSpeed plugin was dropped."""
    engine = accelerator.distributed_type.value
    if accelerator.distributed_type == DistributedType.FSDP:
        engine += "2" if accelerator.is_fsdp2 else "1"
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        engine += f" ZeRO-{plugin.deepspeed_config.get('zero_optimization', {}).get('stage', 0)}"
    teachers = "; ".join(f"{role}: {where}" for role, where in placements.items()) or "no teacher"
    message = (f"kdhooks prepare: {engine}, world size {accelerator.num_processes}, device {accelerator.device}, "
               f"mixed precision {accelerator.mixed_precision}; Distiller: {type(wrapped).__name__}; {teachers}")
    requested = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(variable, "false").lower() == "true"]
    got = {"FSDP": DistributedType.FSDP, "DeepSpeed": DistributedType.DEEPSPEED}
    dropped = [name for name in requested if accelerator.distributed_type != got[name]]
    if dropped:
        logger.warning("%s (%s was requested, but accelerate runs %s: Accelerator(cpu=True) and machines without "
                       "GPUs turn the plugin into plain data parallelism)", message, " and ".join(dropped),
                       accelerator.distributed_type.value)
    else:
        logger.info(message)


def _trainable_parts(distiller: kdhooks.Distiller) -> list[str]:
    return sorted({name.split(".")[1] for name, p in distiller.named_parameters() if p.requires_grad and "." in name})
