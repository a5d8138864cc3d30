"""Distil a DeepLabV3 teacher into an LR-ASPP student on generated shapes, in a plain PyTorch loop (CPU, minutes).

    python examples/segmentation/train.py                              # pixel KD + pair-wise + adversarial
    python examples/segmentation/train.py --config examples/segmentation/cwd.yaml
    python examples/segmentation/train.py --config none                # the student alone

The teacher is trained first (and kept in --teacher for the next run). The
student's loop is the usual one: cross-entropy on the masks; kdhooks adds the
terms of the config from forward hooks (``kd(task_loss, labels=masks)``). The
adversarial term's discriminator is trained by the plugin inside ``kd(...)``:
the optimizer below holds the student and ``kd.parameters()`` (connectors), never
the discriminator, which is saved with ``kd.state_dict()``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kdhooks

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402
from shapes import evaluate, make  # noqa: E402

BATCH = 16
LR = 2e-3
AUX_WEIGHT = 0.4  # the teacher's auxiliary head, as torchvision's reference training


def data(train: int = 2000, val: int = 256, size: int = 32) -> tuple[tuple, tuple]:
    """The training and validation sets (different seeds), made on the fly."""
    return make(train, size, seed=0), make(val, size, seed=1)


def batches(count: int, steps: int, seed: int):
    """``steps`` batches of indices into a set of ``count``, in an order fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, count, (BATCH,), generator=g)


def optimizer_for(parameters, steps: int):
    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=1e-4)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=steps, pct_start=0.1)


def train_teacher(train_set: tuple, steps: int = 800, seed: int = 0) -> nn.Module:
    images, masks = train_set
    torch.manual_seed(seed)
    teacher = models.teacher()
    optimizer, schedule = optimizer_for(teacher.parameters(), steps)
    teacher.train()
    for index in batches(len(images), steps, seed):
        out = teacher(images[index])
        loss = F.cross_entropy(out["out"], masks[index]) + AUX_WEIGHT * F.cross_entropy(out["aux"], masks[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return teacher.eval()


def train_student(teacher: nn.Module, config: str | dict | None, train_set: tuple, steps: int = 300,
                  seed: int = 0, log_every: int = 0) -> nn.Module:
    """The student trained ``steps`` steps with cross-entropy plus, when ``config`` is given, the kdhooks terms."""
    images, masks = train_set
    torch.manual_seed(seed)
    student = models.student()
    kd = kdhooks.Distiller(student, teacher, config, example_inputs=images[:2]) if config else None
    try:
        parameters = [*student.parameters(), *(kd.parameters() if kd else [])]
        optimizer, schedule = optimizer_for(parameters, steps)
        student.train()
        meter = kdhooks.LossMeter()
        for step, index in enumerate(batches(len(images), steps, seed + 1000), 1):
            out = student(images[index])
            loss = F.cross_entropy(out["out"], masks[index])
            if kd:
                loss = kd(loss, labels=masks[index])
                meter.add(kd)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if kd and log_every and step % log_every == 0:
                # the terms' weighted means, and the critic's loss (seg_adversarial.discriminator)
                print(f"step {step}: {({k: round(v, 4) for k, v in meter.means().items()})}")
                meter.reset()
    finally:
        if kd:
            kd.close()
    return student.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "skd.yaml"), help="a kdhooks config, or 'none'")
    parser.add_argument("--teacher", default="runs/segmentation/teacher.pt", help="trained here if missing")
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_set, val_set = data()
    path = Path(args.teacher)
    if path.exists():
        teacher = models.teacher()
        teacher.load_state_dict(torch.load(path))
    else:
        start = time.time()
        teacher = train_teacher(train_set, args.teacher_steps)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), path)
        print(f"teacher trained in {time.time() - start:.0f} s, saved to {path}")
    teacher.eval()
    print(f"teacher mIoU {evaluate(teacher, *val_set):.3f}")
    start = time.time()
    config = None if args.config == "none" else args.config
    student = train_student(teacher, config, train_set, args.steps, args.seed, log_every=50)
    print(f"student ({config or 'alone'}) mIoU {evaluate(student, *val_set):.3f} after {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
