"""Launched by tests/test_accelerate_deepspeed.py as 2 real processes (accelerate launch --use_deepspeed,
DeepSpeed's CPU accelerator, gloo).

``python _accelerate_worker_deepspeed.py OUT_DIR``: every process runs the
scenarios below through ``kdhooks.integrations.accelerate.prepare`` and writes
what it saw to ``OUT_DIR/rank{N}.json``. No ``cpu=True`` here: with it
Accelerate would drop the DeepSpeed plugin and run plain DDP. Accelerate is
given the gloo backend instead (on a machine without GPUs it has none), and
DeepSpeed runs on its CPU accelerator.

Scenarios (10 updates of 32 samples, 16 per process, KD with a scheduled temperature):
- ``one_plugin_launcher``: the usual ``accelerate launch --use_deepspeed --zero_stage 2``, the one
  plugin Accelerate makes from the launcher's environment;
- ``one_plugin_zero{1,2,3}``: one plugin for the student, from a config;
- ``pair``: ``deepspeed_plugins={"student": ZeRO-2, "teacher": ZeRO-3}``, the teacher's plugin
  leaving ``train_micro_batch_size_per_gpu`` at "auto";
- ``connectors``: KD + FitNets under DeepSpeed, refused with a ConfigError.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs

import kdhooks
from _accelerate_worker import KD_FITNETS, KD_ONLY, STEPS, build, loader, same, snapshot, trained_parameters
from kdhooks.integrations.accelerate import prepare


def ds_config(stage: int) -> dict:
    """A DeepSpeed config as a user writes it: batch sizes left to accelerate, no gradient clipping
    (the single-process reference clips nothing); ZeRO-3 partitions every parameter, however small."""
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": 0.0}


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters this rank holds now (ZeRO-3: its partition plus anything gathered)."""
    total = 0
    for p in module.parameters():
        total += p.data.numel() * p.element_size()
        partition = getattr(p, "ds_tensor", None)
        if partition is not None:
            total += partition.numel() * partition.element_size()
    return total


def accelerator_for(plugins) -> Accelerator:
    AcceleratorState._reset_state()  # one Accelerator per scenario; the process group stays
    return Accelerator(deepspeed_plugins=plugins, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])


def train(plugins, out: dict, records: Records) -> None:
    accelerator = accelerator_for(plugins)
    student, teacher, kd, optimizer = build(KD_ONLY)
    teacher_before = snapshot(teacher)
    full_bytes = resident_bytes(teacher)
    initial = trained_parameters(student, kd)
    first = len(records.lines)
    student, optimizer, batches, wrapped = prepare(accelerator, student, optimizer, loader(16), kd)
    losses = []
    for index, (x, y) in enumerate(batches):
        if index == STEPS:
            break
        with accelerator.accumulate(student, wrapped):
            loss = wrapped(F.cross_entropy(student(x), y), labels=y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(kd.last_losses)
    engine = accelerator.unwrap_model(student)
    if type(student).__name__ == "DeepSpeedEngine" and student.zero_optimization_stage() == 3:
        from deepspeed import zero

        with zero.GatheredParameters(list(engine.parameters())):
            parameters = trained_parameters(engine, kd)
    else:
        parameters = trained_parameters(engine, kd)
    teacher_module = kd.model("teacher")
    out.update(world_size=accelerator.num_processes, distributed_type=str(accelerator.distributed_type),
               student=type(student).__name__, step=kd.step, losses=losses, initial=initial, parameters=parameters,
               teacher_training=teacher_module.training,
               teacher_requires_grad=any(p.requires_grad for p in teacher_module.parameters()),
               teacher_full_bytes=full_bytes, teacher_resident_bytes=resident_bytes(teacher_module),
               models_checkpointed=len(accelerator._models), log=records.lines[first:])
    if not any(hasattr(p, "ds_tensor") for p in teacher_module.parameters()):
        out["teacher_unchanged"] = same(teacher_before, teacher)
    kd.close()
    accelerator.free_memory()


def connectors(out: dict) -> None:
    accelerator = accelerator_for(DeepSpeedPlugin(hf_ds_config=ds_config(2)))
    student, _, kd, optimizer = build(KD_FITNETS)
    try:
        prepare(accelerator, student, optimizer, loader(16), kd)
        out["error"] = None
    except kdhooks.ConfigError as error:
        out["error"] = str(error)
    kd.close()
    accelerator.free_memory()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    records = Records()
    logging.getLogger("kdhooks.integrations.accelerate").addHandler(records)
    logging.getLogger("kdhooks.integrations.accelerate").setLevel(logging.INFO)
    results: dict = {}
    # the plugin `accelerate launch --use_deepspeed --zero_stage 2` makes from its environment
    train(None, results.setdefault("one_plugin_launcher", {}), records)
    for stage in (1, 2, 3):
        train(DeepSpeedPlugin(hf_ds_config=ds_config(stage)), results.setdefault(f"one_plugin_zero{stage}", {}), records)
    train({"student": DeepSpeedPlugin(hf_ds_config=ds_config(2)), "teacher": DeepSpeedPlugin(hf_ds_config=ds_config(3))},
          results.setdefault("pair", {}), records)
    connectors(results.setdefault("connectors", {}))
    state = AcceleratorState()
    results.update(world_size=state.num_processes, rank=state.process_index,
                   environment_world_size=int(os.environ.get("WORLD_SIZE", "1")))
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps(results))
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # free what is left in reference cycles before interpreter shutdown, where gloo's threads can abort a finished
    # process (SIGABRT; see examples/accelerate/train.py)
    gc.collect()
