"""What the Distiller adds to memory per rank under Accelerate (DDP, 2 CPU processes, gloo).

    python benchmarks/accelerate_memory.py        # launches itself on 2 processes, writes docs/benchmarks.md

Per rank: the bytes that stay (teacher replica, connector parameters, their
gradients, optimizer state and DDP buckets) and the peak of one training step,
student alone vs student + KD + FitNets through kdhooks.integrations.accelerate,
the same digits CNN pair and batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _measure import peak_bytes, write_section  # noqa: E402


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(batch: int) -> dict:
    from accelerate import Accelerator

    import kdhooks
    from kdhooks.demo import KD_FITNETS_CONFIG, digits_tensors, student_cnn, teacher_cnn
    from kdhooks.integrations.accelerate import prepare

    accelerator = Accelerator(cpu=True)
    images, labels = digits_tensors(0)[:2]
    share = slice(accelerator.process_index * batch, (accelerator.process_index + 1) * batch)
    x, y = images[share], labels[share]
    torch.manual_seed(0)
    teacher, student, plain = teacher_cnn(), student_cnn(), student_cnn()
    plain.load_state_dict(student.state_dict())

    kd = kdhooks.Distiller(student, teacher, KD_FITNETS_CONFIG, example_inputs=x[:2])
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.01, momentum=0.9)
    student, optimizer, wrapped = prepare(accelerator, student, optimizer, kd)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    plain, plain_optimizer = accelerator.prepare(plain, plain_optimizer)

    held: dict[str, int] = {}

    def teacher_captures(module, args, kwargs) -> None:
        held["teacher captures"] = tensor_bytes(v for tap, v in kd.captures.items() if tap.role == "teacher")
    kd.register_forward_pre_hook(teacher_captures, with_kwargs=True)

    def alone() -> None:
        loss = F.cross_entropy(plain(x), y)
        accelerator.backward(loss)
        plain_optimizer.step()
        plain_optimizer.zero_grad()

    def distilled() -> None:
        loss = wrapped(F.cross_entropy(student(x), y), labels=y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):  # optimizer state and DDP buckets exist after the first steps
        alone()
        distilled()
    peaks = {"alone": peak_bytes(alone), "distilled": peak_bytes(distilled)}
    connectors = list(kd.parameters())
    momentum = [optimizer.state[p]["momentum_buffer"] for p in connectors if "momentum_buffer" in optimizer.state[p]]
    return {
        "world_size": accelerator.num_processes, "rank": accelerator.process_index,
        "wrapper": type(wrapped).__name__, "batch": batch,
        "teacher weights": tensor_bytes([*teacher.parameters(), *teacher.buffers()]),
        "student weights": tensor_bytes([*plain.parameters(), *plain.buffers()]),
        "connector parameters": tensor_bytes(connectors),
        "connector gradients + DDP bucket": 2 * tensor_bytes(connectors),
        "connector optimizer state": tensor_bytes(momentum),
        **held, **{f"peak {name}": value for name, value in peaks.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256, help="per rank")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    if "LOCAL_RANK" in os.environ:  # a launched process
        result = measure(args.batch)
        Path(args.out, f"rank{result['rank']}.json").write_text(json.dumps(result))
        return

    import tempfile
    out = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__,
                    "--batch", str(args.batch), "--out", out], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(r["world_size"] == 2 for r in ranks), "the launch did not give 2 processes"
    kib = lambda value: f"{value / 2**10:.1f} KiB"  # noqa: E731
    rows = ["teacher weights", "connector parameters", "connector gradients + DDP bucket",
            "connector optimizer state", "teacher captures", "peak alone", "peak distilled"]
    lines = [f"| {name} | " + " | ".join(kib(r[name]) for r in ranks) + " |" for name in rows]
    extra = [r["peak distilled"] - r["peak alone"] for r in ranks]
    table = f"""## Accelerate: what the Distiller adds to memory per rank

DDP on 2 CPU processes (gloo), digits CNN pair (teacher width 32: {kib(ranks[0]['teacher weights'])} of weights;
student width 4: {kib(ranks[0]['student weights'])}), KD + FitNets (1x1 conv connector, wrapped by DDP as
`{ranks[0]['wrapper']}`), SGD with momentum, batch {args.batch} per rank. "Peak" is the peak of one training step
above the bytes held before it (profiler memory timeline on CPU), student alone vs student + kdhooks.
torch {torch.__version__}, {platform.machine()}.

| per rank | rank 0 | rank 1 |
|---|---|---|
{chr(10).join(lines)}
| **peak added by distillation** | **{kib(extra[0])}** | **{kib(extra[1])}** |

Command: `python benchmarks/accelerate_memory.py --batch {args.batch}`
"""
    print(table)
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", "accelerate-memory", table)


if __name__ == "__main__":
    main()
