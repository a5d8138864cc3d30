"""Run by torchrun (2 CPU processes, gloo) from test_hf_trainer.py: DistillationTrainer under DDP.

Each rank trains on its own shard of the data; at the end it writes its world size, its
connector weights and the Trainer's logs to ``<dir>/rank<r>.json``.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from _hf import sentiment_data, tiny_bert, training_args

from kdhooks.integrations.hf import DistillationTrainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    directory = Path(sys.argv[1])
    trainer = DistillationTrainer(
        model=tiny_bert(1, 16, seed=0), teacher=tiny_bert(2, 32, heads=4, seed=1),
        kd_config={"terms": [{"kind": "kd"}, {"kind": "hidden_states"}]},
        args=training_args(directory, per_device_train_batch_size=8, max_steps=4, logging_steps=2,
                           ddp_backend="gloo", learning_rate=1e-2),
        train_dataset=sentiment_data(64, seed=5))
    trainer.train()
    rank = dist.get_rank()
    result = {"rank": rank, "world_size": dist.get_world_size(),
              "connector": [p.detach().flatten().tolist() for p in trainer.distiller.parameters()],
              "log": [e for e in trainer.state.log_history if "loss" in e]}
    (directory / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()  # join gloo's threads before exit
    del trainer
    # free what is left in reference cycles before interpreter shutdown, where gloo's threads can abort a finished
    # process (SIGABRT; see examples/accelerate/train.py)
    gc.collect()
