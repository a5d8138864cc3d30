"""On-policy distillation (GKD, Agarwal et al. 2024) of a small causal LM in the plain HF Trainer.

    python examples/hf/on_policy.py          # about a minute on one CPU core

A 2-layer Llama (hidden 64) learns arithmetic sequences that skip a term now
and then (probability 0.25): the teacher. A 1-layer Llama (hidden 16) starts from a
short supervised fine-tuning on the same data, then is distilled with lm_kd
(generalized JSD, β = 0.5) from 3-token prompts, the same number of steps three
ways: off-policy (λ = 0, the dataset's sequences), on-policy as on_policy.yaml
says (λ = 0.5: half the batches are the student's own continuations of their
prompts) and fully on-policy (λ = 1). Held-out prompts are then continued by each
student (sampling, temperature 1), and measured: the divergence to the teacher on
the student's own continuations, which is what the student meets when it
generates, and on the dataset's held-out sequences; and the teacher's per-token
loss on the student's continuations (how likely the teacher finds them).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import transformers
import yaml
from synthetic import LENGTH, PAD, counting, llama
from transformers import Trainer, TrainingArguments

from kdhooks.integrations.hf import DistillationTrainer

PROMPT = 3  # counting(): the start token and the first two terms


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's generalized JSD per position (float64): β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m), m = β·p_T + (1 − β)·p_S."""
    log_s, log_t = student_logits.double().log_softmax(-1), teacher_logits.double().log_softmax(-1)
    log_m = (beta * log_t.exp() + (1 - beta) * log_s.exp()).log()
    return (beta * log_t.exp() * (log_t - log_m) + (1 - beta) * log_s.exp() * (log_s - log_m)).sum(-1)


def measured(student: torch.nn.Module, teacher: torch.nn.Module, held_out: list[dict], seed: int) -> dict[str, float]:
    """The student's divergence to the teacher on its own sampled continuations and on the data; the teacher's
    per-token loss on the continuations."""
    student.eval()
    teacher.eval()
    prompts = torch.stack([item["input_ids"][:PROMPT] for item in held_out])
    torch.manual_seed(seed)
    with torch.no_grad():
        sequences = student.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=LENGTH - PROMPT,
                                     pad_token_id=PAD)
        own = {"input_ids": sequences, "attention_mask": torch.ones_like(sequences)}
        s, t = student(**own).logits[:, PROMPT - 1:-1], teacher(**own).logits[:, PROMPT - 1:-1]
        on_policy = float(jsd(s, t).mean())
        teacher_nll = float(torch.nn.functional.cross_entropy(t.flatten(0, 1), sequences[:, PROMPT:].flatten()))
        data = {key: torch.stack([item[key] for item in held_out]) for key in ("input_ids", "attention_mask")}
        labels = torch.stack([item["labels"] for item in held_out])[:, 1:]
        keep = labels != -100
        s, t = student(**data).logits[:, :-1], teacher(**data).logits[:, :-1]
        off_policy = float(jsd(s, t)[keep].mean())
    return {"on_policy_jsd": on_policy, "data_jsd": off_policy, "teacher_nll": teacher_nll}


def data_loss(model: torch.nn.Module, items: list[dict]) -> float:
    """Mean next-token cross-entropy on the labeled positions (the prompt is left out)."""
    model.eval()
    with torch.no_grad():
        return float(model(**{k: torch.stack([i[k] for i in items]) for k in ("input_ids", "attention_mask",
                                                                               "labels")}).loss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(Path(__file__).with_name("on_policy.yaml")))
    parser.add_argument("--steps", type=int, default=150, help="distillation steps of each student")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="tiny models: one thread is fastest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    output = tempfile.mkdtemp(prefix="kdhooks-on-policy-")
    started = time.perf_counter()

    def arguments(**options) -> TrainingArguments:
        return TrainingArguments(**{**dict(output_dir=output, use_cpu=True, report_to=[], disable_tqdm=True,
                                           seed=args.seed, per_device_train_batch_size=32, learning_rate=3e-3,
                                           lr_scheduler_type="constant", logging_steps=50, save_strategy="no"),
                                    **options})

    held_out = counting(1024, seed=3)
    teacher = llama(2, 64, heads=4, seed=0)
    Trainer(model=teacher, args=arguments(num_train_epochs=8), train_dataset=counting(2000, seed=1)).train()
    student = llama(1, 16, heads=2, seed=10)  # supervised fine-tuning first, as in the paper
    Trainer(model=student, args=arguments(num_train_epochs=1), train_dataset=counting(2000, seed=5)).train()
    print(f"teacher: data loss {data_loss(teacher, held_out):.3f}; student after SFT: "
          + ", ".join(f"{k} {v:.4f}" for k, v in measured(student, teacher, held_out, args.seed).items()))

    config = yaml.safe_load(Path(args.config).read_text())
    for lmbda in (0.0, config["on_policy"]["lmbda"], 1.0):
        kd_config = {**config, "on_policy": {**config["on_policy"], "lmbda": lmbda}}
        distilled = copy.deepcopy(student)
        trainer = DistillationTrainer(model=distilled, teacher=teacher, kd_config=kd_config,
                                      train_dataset=counting(4000, seed=2),
                                      args=arguments(max_steps=args.steps, learning_rate=1e-2))
        trainer.train()
        generated = trainer.on_policy.generated["student"]
        trainer.distiller.close()
        print(f"λ = {lmbda:<3} ({generated:3d} of {args.steps} batches generated): "
              + ", ".join(f"{k} {v:.4f}" for k, v in measured(distilled, teacher, held_out, args.seed).items()))
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
