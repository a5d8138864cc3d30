"""Distill a tiny causal LM into a smaller one with the HF Trainer (lm_kd, generalized JSD).

    python examples/hf/lm.py            # ~20 s on one CPU core

A 2-layer Llama (hidden 64) learns to continue arithmetic sequences from 2000
examples; a 1-layer Llama (hidden 32) then learns from 100, once alone and
once with the teacher's next-token distributions, as lm.yaml says. The
prompt tokens (label -100) and padding take no part in either loss.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from synthetic import counting, llama
from transformers import Trainer, TrainingArguments

from kdhooks.integrations.hf import DistillationTrainer


def held_out_loss(model: torch.nn.Module, items: list[dict]) -> float:
    """Mean next-token cross-entropy on the labeled positions (the sequences' own randomness bounds it below)."""
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=torch.stack([i["input_ids"] for i in items]),
                           attention_mask=torch.stack([i["attention_mask"] for i in items]),
                           labels=torch.stack([i["labels"] for i in items])).loss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(Path(__file__).with_name("lm.yaml")))
    parser.add_argument("--examples", type=int, default=100, help="sequences the student sees")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="tiny models: one thread is fastest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    output = tempfile.mkdtemp(prefix="kdhooks-hf-")

    def arguments(epochs: int, seed: int = 0) -> TrainingArguments:
        return TrainingArguments(output_dir=output, use_cpu=True, report_to=[], disable_tqdm=True, seed=seed,
                                 num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=3e-3,
                                 lr_scheduler_type="constant", logging_steps=20, save_strategy="no")

    held_out = counting(500, seed=3)
    teacher = llama(2, 64, heads=4, seed=0)
    Trainer(model=teacher, args=arguments(8), train_dataset=counting(2000, seed=1)).train()
    print(f"teacher: {held_out_loss(teacher, held_out):.3f} held-out loss")

    few = counting(args.examples, seed=2)
    alone = llama(1, 32, heads=2, seed=args.seed)
    Trainer(model=alone, args=arguments(args.epochs, args.seed), train_dataset=few).train()

    student = llama(1, 32, heads=2, seed=args.seed)
    trainer = DistillationTrainer(model=student, teacher=teacher, kd_config=args.config,
                                  args=arguments(args.epochs, args.seed), train_dataset=few)
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    print("last logged terms:", {k: round(v, 4) for k, v in last.items() if k.startswith("distill/")})
    print(f"held-out loss of the student alone: {held_out_loss(alone, held_out):.3f}   "
          f"distilled: {held_out_loss(student, held_out):.3f}")
    trainer.distiller.close()


if __name__ == "__main__":
    main()
