"""Distill a tiny BERT classifier into a smaller one with the HF Trainer (kd + hidden_states + attention_maps).

    python examples/hf/text_classification.py            # ~10 s on one CPU core

A 2-layer BERT (hidden 32, 4 heads) is fine-tuned on 1000 generated sentences;
a 1-layer BERT (hidden 16, 2 heads) then learns from only 40 labeled ones, once
alone and once with the teacher as text_classification.yaml says, the teacher
also labeling 200 unlabeled sentences (a transfer set: label -100, so the task
loss skips them and only the distillation terms see them).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from synthetic import bert, sentiment
from transformers import Trainer, TrainingArguments

from kdhooks.integrations.hf import DistillationTrainer


def accuracy(model: torch.nn.Module, items: list[dict]) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.stack([i["input_ids"] for i in items]),
                       attention_mask=torch.stack([i["attention_mask"] for i in items])).logits
    return float((logits.argmax(-1) == torch.stack([i["labels"] for i in items])).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(Path(__file__).with_name("text_classification.yaml")))
    parser.add_argument("--labeled", type=int, default=40, help="labeled sentences the student sees")
    parser.add_argument("--unlabeled", type=int, default=200, help="sentences only the teacher labels")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the student alone (40 labeled)")
    parser.add_argument("--distill-epochs", type=int, default=8, help="epochs of distillation (240 sentences)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="tiny models: one thread is fastest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    output = tempfile.mkdtemp(prefix="kdhooks-hf-")

    def arguments(epochs: int, seed: int = 0, **more) -> TrainingArguments:
        return TrainingArguments(output_dir=output, use_cpu=True, report_to=[], disable_tqdm=True, seed=seed,
                                 num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=3e-3,
                                 lr_scheduler_type="constant", logging_steps=10, save_strategy="no", **more)

    held_out = sentiment(500, seed=3)
    teacher = bert(2, 32, heads=4, seed=0)
    Trainer(model=teacher, args=arguments(5), train_dataset=sentiment(1000, seed=1)).train()
    print(f"teacher: {accuracy(teacher, held_out):.3f} held-out accuracy")

    few = sentiment(args.labeled, seed=2)
    alone = bert(1, 16, heads=2, seed=args.seed)
    Trainer(model=alone, args=arguments(args.epochs, args.seed), train_dataset=few).train()

    # each labeled sentence followed by its share of unlabeled ones: in order, every batch holds some labels
    unlabeled = [{**item, "labels": torch.tensor(-100)} for item in sentiment(args.unlabeled, seed=4)]
    share = len(unlabeled) // len(few)
    transfer = [item for i, labeled in enumerate(few) for item in [labeled, *unlabeled[i * share:(i + 1) * share]]]
    student = bert(1, 16, heads=2, seed=args.seed)
    trainer = DistillationTrainer(model=student, teacher=teacher, kd_config=args.config, train_dataset=transfer,
                                  args=arguments(args.distill_epochs, args.seed, train_sampling_strategy="sequential"))
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    print("last logged terms:", {k: round(v, 4) for k, v in last.items() if k.startswith("distill/")})
    print(f"student alone: {accuracy(alone, held_out):.3f}   distilled: {accuracy(student, held_out):.3f}")
    trainer.distiller.close()


if __name__ == "__main__":
    main()
