"""kdhooks vs a hand-written loop computing the same KD + FitNets loss: step time and peak memory.

    python benchmarks/core_overhead.py            # writes its table into docs/benchmarks.md

Same CNN pair (kdhooks.demo), same digits batches, same initial weights; the
two loops run interleaved in one process and the medians are compared.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import kdhooks
from kdhooks.demo import KD_FITNETS_CONFIG, digits_tensors, student_cnn, teacher_cnn
from kdhooks.plugins.logits import kd_loss

sys.path.insert(0, str(Path(__file__).parent))
from _measure import interleaved_times, paired_ratio, peak_bytes, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    x_train, y_train, _, _ = digits_tensors(0)
    x, y = x_train[: args.batch].to(device), y_train[: args.batch].to(device)
    torch.manual_seed(0)
    teacher = teacher_cnn().to(device).eval()
    student_a = student_cnn().to(device)
    student_b = copy.deepcopy(student_a)

    kd = kdhooks.Distiller(student_b, teacher, KD_FITNETS_CONFIG, example_inputs=x[:2])
    connector = copy.deepcopy(kd.connectors["fitnets"])  # the same regressor, same initial weights
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt_a = torch.optim.SGD([*student_a.parameters(), *connector.parameters()], lr=0.01, momentum=0.9)
    opt_b = torch.optim.SGD([*student_b.parameters(), *kd.parameters()], lr=0.01, momentum=0.9)

    def hand_written() -> torch.Tensor:
        with torch.no_grad():
            t_hint = teacher.stage2(teacher.stage1(x))
            t_logits = teacher.fc(teacher.pool(teacher.stage3(t_hint)).flatten(1))
        s_hint = student_a.stage2(student_a.stage1(x))
        s_logits = student_a.fc(student_a.pool(student_a.stage3(s_hint)).flatten(1))
        loss = (0.5 * F.cross_entropy(s_logits, y) + 0.5 * kd_loss(s_logits, t_logits, 4.0)
                + 1.0 * F.mse_loss(connector(s_hint), t_hint))
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()
        return loss

    def with_kdhooks() -> torch.Tensor:
        loss = kd(F.cross_entropy(student_b(x), y), labels=y)
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()
        return loss

    first_a, first_b = hand_written().item(), with_kdhooks().item()
    assert abs(first_a - first_b) < 1e-5 * max(1.0, abs(first_a)), (first_a, first_b)
    times = interleaved_times({"hand-written": hand_written, "kdhooks": with_kdhooks},
                              repeats=args.steps, warmup=args.warmup)
    medians = {name: statistics.median(values) for name, values in times.items()}
    memory = {"hand-written": peak_bytes(hand_written), "kdhooks": peak_bytes(with_kdhooks)}
    kd.close()

    time_ratio, low, high = paired_ratio(times["kdhooks"], times["hand-written"])
    memory_ratio = memory["kdhooks"] / memory["hand-written"]
    command = (f"python benchmarks/core_overhead.py --batch {args.batch} --steps {args.steps} "
               f"--warmup {args.warmup} --threads {args.threads}")
    table = f"""## Core overhead: kdhooks vs a hand-written KD + FitNets loop

Digits CNN pair (teacher width 32, student width 4), batch {args.batch}, KD (T=4) + FitNets (stage2 → stage2,
1x1 conv regressor), SGD. Both loops start from the same weights and compute the same loss (first step:
{first_a:.6f} vs {first_b:.6f}); {args.steps} interleaved steps after {args.warmup} warm-up steps, medians;
the time ratio is the median of the ratios of steps run side by side (quartiles {low:.3f}–{high:.3f}).
Device: {device.type} ({platform.processor() or platform.machine()}, {args.threads} thread(s)), torch {torch.__version__}.

| | hand-written | kdhooks | ratio (target) |
|---|---|---|---|
| step time (median) | {medians['hand-written'] * 1e3:.2f} ms | {medians['kdhooks'] * 1e3:.2f} ms | **{time_ratio:.3f}** (≤ 1.02) |
| peak memory of one step | {memory['hand-written'] / 2**20:.2f} MiB | {memory['kdhooks'] / 2**20:.2f} MiB | **{memory_ratio:.3f}** (≤ 1.05) |

Command: `{command}`
"""
    print(table)
    if not args.no_write:
        write_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "core-overhead", table)


if __name__ == "__main__":
    main()
