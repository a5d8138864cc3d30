"""Distill a tiny encoder–decoder (BART) into a smaller one with the HF Trainer (lm_kd + decoder hidden states
+ cross-attention maps).

    python examples/hf/seq2seq.py           # about a minute on one CPU core

The task: from the first 4–10 terms of an arithmetic sequence that skips a term
with probability 0.25, write its next 6 terms and EOS (sources and targets have
different lengths). A 2-layer BART (hidden 64) learns it from 2000 examples; a
1-layer BART (hidden 32) then learns from 200, once alone and once with the
teacher as seq2seq.yaml says. The teacher is given the decoder inputs the
student makes from its labels; lm_kd compares the decoders' distributions at
each labeled target position (no shift, the encoder's padding not involved).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from synthetic import bart, continuation
from transformers import Trainer, TrainingArguments

from kdhooks.integrations.hf import DistillationTrainer


def evaluate(model: torch.nn.Module, items: list[dict]) -> tuple[float, float]:
    """Held-out cross-entropy of the target tokens, and the share of them predicted right (teacher forcing)."""
    model.eval()
    with torch.no_grad():
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        output = model(**batch)
    keep = batch["labels"] != -100
    return float(output.loss), float((output.logits.argmax(-1) == batch["labels"])[keep].float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(Path(__file__).with_name("seq2seq.yaml")))
    parser.add_argument("--examples", type=int, default=200, help="pairs the student sees")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="tiny models: one thread is fastest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    output = tempfile.mkdtemp(prefix="kdhooks-seq2seq-")

    def arguments(epochs: int, seed: int = 0) -> TrainingArguments:
        return TrainingArguments(output_dir=output, use_cpu=True, report_to=[], disable_tqdm=True, seed=seed,
                                 num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=3e-3,
                                 lr_scheduler_type="constant", logging_steps=50, save_strategy="no")

    held_out = continuation(500, seed=3)
    teacher = bart(2, 64, heads=4, seed=0)
    Trainer(model=teacher, args=arguments(10), train_dataset=continuation(2000, seed=1)).train()
    loss, accuracy = evaluate(teacher, held_out)
    print(f"teacher: held-out loss {loss:.3f}, token accuracy {accuracy:.3f}")

    few = continuation(args.examples, seed=2)
    alone = bart(1, 32, heads=2, seed=args.seed)
    Trainer(model=alone, args=arguments(args.epochs, args.seed), train_dataset=few).train()

    student = bart(1, 32, heads=2, seed=args.seed)
    trainer = DistillationTrainer(model=student, teacher=teacher, kd_config=args.config,
                                  args=arguments(args.epochs, args.seed), train_dataset=few)
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    print("last logged terms:", {k: round(v, 4) for k, v in last.items() if k.startswith("distill/")})
    for name, model in (("alone", alone), ("distilled", student)):
        loss, accuracy = evaluate(model, held_out)
        print(f"student {name}: held-out loss {loss:.3f}, token accuracy {accuracy:.3f}")
    trainer.distiller.close()


if __name__ == "__main__":
    main()
