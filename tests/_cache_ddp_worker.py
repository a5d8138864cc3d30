"""2-process gloo worker: each rank trains on its half; in epoch 2 the halves swap, so each reads the other's shards."""
import gc
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kdhooks
from kdhooks.demo import student_cnn, teacher_cnn


def main(folder: str, cache: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    torch.manual_seed(1)
    student, teacher = student_cnn(), teacher_cnn()
    runs = []
    teacher.register_forward_hook(lambda module, args, output: runs.append(True))
    terms = [{"kind": "kd"}, {"kind": "fitnets", "student": "stage2", "teacher": "stage2"}]
    if cache != "-":
        terms.append({"kind": "teacher_cache", "path": cache, "shard_size": 8})
    losses, rates = [], []
    with kdhooks.Distiller(student, teacher, {"terms": terms}, example_inputs=x[:2]) as kd:
        for epoch in range(2):
            half = (rank + epoch) % 2   # epoch 2: the other rank's samples
            for start in range(16 * half, 16 * half + 16, 8):
                student.train()
                loss = kd(F.cross_entropy(student(x[start:start + 8]), y[start:start + 8]))
                losses.append(loss.item())
                rates.append(float(kd.last_metrics.get("teacher_cache.hit_rate", -1)))
            dist.barrier()   # epoch 1's shards are written (shard_size 8: one a batch) before epoch 2 reads
    with open(f"{folder}/rank{rank}.json", "w") as file:
        json.dump({"losses": losses, "runs": len(runs), "rates": rates, "world": dist.get_world_size()}, file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # free what is left in reference cycles before interpreter shutdown, where gloo's threads can abort a finished
    # process (SIGABRT; see examples/accelerate/train.py)
    gc.collect()
