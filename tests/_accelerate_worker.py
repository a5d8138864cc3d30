"""Launched by tests/test_accelerate.py as 2 real processes (accelerate launch, gloo on CPU).

``python _accelerate_worker.py OUT_DIR fp32|bf16``: every process runs the
scenarios of its mode and writes what it saw to ``OUT_DIR/rank{N}.json``;
the test compares that with a single-process loop it runs itself.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.tracking import GeneralTracker
from torch import nn

import kdhooks
from kdhooks.demo import digits_tensors, student_cnn, teacher_cnn
from kdhooks.integrations.accelerate import prepare

STEPS = 10          # optimizer updates per scenario
GLOBAL_BATCH = 32   # samples per update, all processes together
LR = 0.05
KD_FITNETS = {"task_weight": 0.5, "terms": [
    {"kind": "kd", "weight": 0.5, "temperature": {"schedule": "linear", "start": 8, "end": 2, "steps": STEPS}},
    {"kind": "fitnets", "weight": 2.0, "student": "stage2", "teacher": "stage2"},
]}
KD_ONLY = {"task_weight": 0.5, "terms": [KD_FITNETS["terms"][0]]}


def per_sample_norm(model: nn.Module) -> nn.Module:
    """BatchNorm → GroupNorm(1, C).

    Under DDP BatchNorm statistics are per process (SyncBatchNorm needs a GPU),
    so 2 x B would not be the computation 1 x 2B is; a per-sample norm is.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.GroupNorm(1, child.num_features))
    return model


def build(config: dict = KD_FITNETS, seed: int = 0, batch_norm: bool = False):
    """(student, teacher, distiller, optimizer): the same teacher always, the student and connectors by ``seed``."""
    torch.manual_seed(1234)  # the teacher stands for a trained model loaded from disk
    teacher = teacher_cnn()
    torch.manual_seed(seed)
    student = student_cnn()
    if not batch_norm:
        student = per_sample_norm(student)
    images = digits_tensors(0)[0]
    kd = kdhooks.Distiller(student, teacher, config, example_inputs=images[:2])
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=LR, momentum=0.9)
    return student, teacher, kd, optimizer


def trained_parameters(student: nn.Module, kd: nn.Module) -> dict[str, list]:
    named = {f"student.{k}": v for k, v in student.named_parameters()}
    named.update({f"kd.{k}": v for k, v in kd.named_parameters()})
    return {name: value.detach().float().flatten().tolist() for name, value in named.items()}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def loader(batch_size: int) -> torch.utils.data.DataLoader:
    images, labels = digits_tensors(0)[:2]
    dataset = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def train_steps(accelerator, student, kd, optimizer, batches, micro_batches: int, record: list | None = None):
    """The user's loop: ``micro_batches`` forward/backward passes per optimizer update."""
    for index, (x, y) in enumerate(batches):
        if index == micro_batches * STEPS:
            break
        with accelerator.accumulate(student, kd):
            loss = kd(F.cross_entropy(student(x), y), labels=y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if record is not None:
            record.append(accelerator.unwrap_model(kd).last_losses)


class RecordingTracker(GeneralTracker):
    """An accelerate tracker that keeps what ``accelerator.log`` sends it."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.logged: list[dict] = []

    @property
    def tracker(self):
        return self

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append({"step": step, **values})


def data_parallel(accumulation: int, out: dict) -> None:
    """10 updates of 32 samples: 2 processes x 16, or (accumulation=2) 2 processes x 2 micro-batches of 8."""
    tracker = RecordingTracker()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation, log_with=[tracker])
    accelerator.init_trackers("kdhooks-test")
    student, teacher, kd, optimizer = build()
    teacher_before = snapshot(teacher)
    micro_batch = GLOBAL_BATCH // accelerator.num_processes // accumulation
    student, optimizer, batches, wrapped = prepare(accelerator, student, optimizer, loader(micro_batch), kd)
    train_steps(accelerator, student, wrapped, optimizer, batches, accumulation)
    out.update(world_size=accelerator.num_processes, distributed_type=str(accelerator.distributed_type),
               wrapper=type(wrapped).__name__, step=kd.step, teacher_unchanged=same(teacher_before, teacher),
               teacher_training=teacher.training, teacher_requires_grad=any(p.requires_grad for p in teacher.parameters()),
               parameters=trained_parameters(accelerator.unwrap_model(student), kd), logged=tracker.logged)
    kd.close()


def resume(config: dict, directory: Path, out: dict) -> None:
    """4 updates, save_state, 3 more; then fresh models (another seed), load_state, the same 3 updates."""
    accelerator = Accelerator(cpu=True)
    student, teacher, kd, optimizer = build(config)
    teacher_before = snapshot(teacher)
    student, optimizer, batches, wrapped = prepare(accelerator, student, optimizer, loader(16), kd)
    batch_list = list(batches)
    first, after = [], []
    train_steps(accelerator, student, wrapped, optimizer, batch_list[:4], 1, first)
    accelerator.save_state(str(directory))
    train_steps(accelerator, student, wrapped, optimizer, batch_list[4:7], 1, after)
    kd.close()

    accelerator = Accelerator(cpu=True)
    student, teacher2, kd2, optimizer = build(config, seed=1)
    student, optimizer, batches, wrapped = prepare(accelerator, student, optimizer, loader(16), kd2)
    accelerator.load_state(str(directory))
    step_after_load = kd2.step
    resumed = []
    train_steps(accelerator, student, wrapped, optimizer, list(accelerator.skip_first_batches(batches, 4))[:3], 1,
                resumed)
    out.update(wrapper=type(wrapped).__name__, step_after_load=step_after_load, before=after, resumed=resumed,
               teacher_unchanged=same(teacher_before, teacher))
    kd2.close()


def mixed_precision(teacher_dtype: str | None, out: dict) -> None:
    """bf16 autocast on CPU, BatchNorm student, a conv1x1+BN connector; what dtypes met where."""
    accelerator = Accelerator(cpu=True)
    config = {**KD_FITNETS, "terms": [KD_FITNETS["terms"][0], {**KD_FITNETS["terms"][1], "connector": "conv1x1_bn"}]}
    student, teacher, kd, optimizer = build(config, batch_norm=True)
    seen: dict[str, set] = {"connector_input": set(), "teacher_feature": set(), "teacher_parameters": set()}
    connector = kd.connectors["fitnets"]
    connector.register_forward_pre_hook(lambda m, args: seen["connector_input"].add(str(args[0].dtype)))
    teacher.stage2.register_forward_hook(lambda m, args, output: seen["teacher_feature"].add(str(output.dtype)))
    student, optimizer, batches, wrapped = prepare(accelerator, student, optimizer, loader(16), kd,
                                                   teacher_dtype=teacher_dtype)
    teacher_before = snapshot(teacher)
    losses: list[dict] = []
    train_steps(accelerator, student, wrapped, optimizer, batches, 1, losses)
    seen["teacher_parameters"] = {str(p.dtype) for p in teacher.parameters()}
    finite = all(math.isfinite(v) for step in losses for v in step.values())
    finite = finite and all(torch.isfinite(p).all() for p in [*student.parameters(), *kd.parameters()])
    out.update(mixed_precision=accelerator.mixed_precision, losses=losses, finite=bool(finite),
               teacher_unchanged=same(teacher_before, teacher), **{k: sorted(v) for k, v in seen.items()})
    kd.close()


def bad_input(out: dict) -> None:
    """The ConfigErrors of ``prepare``: no Distiller among the objects, an unknown teacher dtype."""
    accelerator = Accelerator(cpu=True)
    student, teacher, kd, optimizer = build()
    for name, call in (("no_distiller", lambda: prepare(accelerator, student, optimizer)),
                       ("teacher_dtype", lambda: prepare(accelerator, student, optimizer, kd, teacher_dtype="bf8"))):
        try:
            call()
            out[name] = None
        except kdhooks.ConfigError as error:
            out[name] = str(error)
    kd.close()


class LogRecords(logging.Handler):
    """What ``prepare`` logs (kdhooks.integrations.accelerate), as 'LEVEL: message' lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def rehearsal(out: dict) -> None:
    """A CPU rehearsal of an FSDP run: Accelerator(cpu=True, fsdp_plugin=...) is DDP; prepare says so."""
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    student, teacher, kd, optimizer = build(KD_ONLY)
    try:
        prepare(accelerator, student, optimizer, kd)
        out["distributed_type"] = str(accelerator.distributed_type)
    finally:
        os.environ.pop("ACCELERATE_USE_FSDP", None)  # the plugin set it for this process
        kd.close()


def main(out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    results: dict = {"world_size": state.num_processes, "rank": state.process_index}
    records = LogRecords()
    logging.getLogger("kdhooks.integrations.accelerate").addHandler(records)
    logging.getLogger("kdhooks.integrations.accelerate").setLevel(logging.INFO)
    if mode == "fp32":
        for name, accumulation in (("data_parallel", 1), ("accumulation", 2)):
            data_parallel(accumulation, results.setdefault(name, {}))
        for name, config in (("resume", KD_FITNETS), ("resume_kd_only", KD_ONLY)):
            resume(config, Path(out_dir) / name, results.setdefault(name, {}))
        mixed_precision("bf16", results.setdefault("fp32_teacher_bf16", {}))
        bad_input(results.setdefault("errors", {}))
        results["log"] = list(records.lines)  # one line per prepare above, on the main process only
        rehearsal(results.setdefault("rehearsal", {}))
        results["rehearsal"]["log"] = records.lines[len(results["log"]):]
    else:
        for name, teacher_dtype in (("bf16_teacher_fp32", None), ("bf16_teacher_bf16", "bf16")):
            mixed_precision(teacher_dtype, results.setdefault(name, {}))
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps(results))
    # gloo's threads must be joined before the interpreter exits, or a rank can abort at exit
    # ("terminate called without an active exception")
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    # free what is left in reference cycles before interpreter shutdown, where gloo's threads can abort a finished
    # process (SIGABRT; see examples/accelerate/train.py)
    gc.collect()
