"""LoRA fine-tuning of a small causal LM with TRL's SFTTrainer, distilled from a larger one (lm_kd).

    python examples/hf/lora_sft.py          # about a minute on one CPU core

A 2-layer Llama (hidden 64) learns arithmetic sequences that skip a term now
and then (probability 0.25) from 2000 examples: the teacher. A smaller Llama
(2 layers, hidden 32) is pre-trained on sequences that never skip: the base
model. It is then adapted with LoRA (rank 8 on every projection; the base stays
frozen) on 100 skipping sequences by ``trl.SFTTrainer`` with ``peft_config``,
once alone and once with ``with_distillation(SFTTrainer)`` and lora_sft.yaml:
SFTTrainer's fused LM head never builds the student's logits, so lm_kd forms
them from the backbone's hidden states (``student_hidden: model``, resolved
through PEFT's ``base_model.model.`` prefix).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import datasets
import peft
import torch
import transformers
import trl
from synthetic import LENGTH, counting, llama, word_tokenizer
from transformers import Trainer, TrainingArguments

from kdhooks.integrations.hf import with_distillation


def held_out_loss(model: torch.nn.Module, items: list[dict]) -> float:
    """Mean next-token cross-entropy on the labeled positions (the prompt is left out)."""
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=torch.stack([i["input_ids"] for i in items]),
                           attention_mask=torch.stack([i["attention_mask"] for i in items]),
                           labels=torch.stack([i["labels"] for i in items])).loss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(Path(__file__).with_name("lora_sft.yaml")))
    parser.add_argument("--examples", type=int, default=100, help="sequences the LoRA adapter sees")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="tiny models: one thread is fastest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    output = tempfile.mkdtemp(prefix="kdhooks-lora-")

    def arguments(epochs: int) -> TrainingArguments:
        return TrainingArguments(output_dir=output, use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
                                 num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=3e-3,
                                 lr_scheduler_type="constant", logging_steps=50, save_strategy="no")

    held_out = counting(500, seed=3)
    teacher = llama(2, 64, heads=4, seed=0)
    Trainer(model=teacher, args=arguments(8), train_dataset=counting(2000, seed=1)).train()

    def base_model() -> torch.nn.Module:
        torch.manual_seed(args.seed)
        base = llama(2, 32, heads=2, seed=10)
        Trainer(model=base, args=arguments(4), train_dataset=counting(2000, seed=5, skip=0.0)).train()
        return base

    base = base_model()
    print(f"held-out loss: teacher {held_out_loss(teacher, held_out):.3f}, "
          f"base student before LoRA {held_out_loss(base, held_out):.3f}")

    few = counting(args.examples, seed=2)
    dataset = datasets.Dataset.from_list([{"input_ids": i["input_ids"][i["attention_mask"].bool()].tolist()}
                                          for i in few])
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    sft = dict(output_dir=output, use_cpu=True, report_to=[], disable_tqdm=True, seed=args.seed,
               num_train_epochs=args.epochs, per_device_train_batch_size=20, learning_rate=1e-2,
               lr_scheduler_type="constant", logging_steps=25, save_strategy="no", max_length=LENGTH)

    alone = trl.SFTTrainer(model=base_model(), args=trl.SFTConfig(**sft), train_dataset=dataset,
                           processing_class=word_tokenizer(), peft_config=lora)
    alone.train()

    trainer = with_distillation(trl.SFTTrainer)(model=base_model(), teacher=teacher, kd_config=args.config,
                                               args=trl.SFTConfig(**sft), train_dataset=dataset,
                                               processing_class=word_tokenizer(), peft_config=lora)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    print(f"LoRA student: {trainable} of {total} parameters train ({type(trainer.model).__name__})")
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    print("last logged terms:", {k: round(v, 4) for k, v in last.items() if k.startswith("distill/")})
    print(f"held-out loss after LoRA SFT: alone {held_out_loss(alone.model, held_out):.3f}   "
          f"distilled {held_out_loss(trainer.model, held_out):.3f}")
    trainer.distiller.close()


if __name__ == "__main__":
    main()
