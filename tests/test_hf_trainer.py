"""kdhooks inside a real transformers Trainer (CPU): accuracy, logs, checkpoints, accumulation, precision."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from _hf import accuracy, full_tensor_divergence, lm_data, sentiment_data, tiny_bert, tiny_llama, training_args
from transformers import Trainer

import kdhooks
from kdhooks.integrations.hf import DISTILLER_STATE, DistillationTrainer, with_distillation

transformers.logging.set_verbosity_error()


TINYBERT = {"task_weight": 0.5,
            "terms": [{"kind": "kd", "weight": 0.5, "temperature": 2.0},
                      {"kind": "hidden_states", "weight": 0.1},
                      {"kind": "attention_maps", "weight": 1.0}]}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")


@pytest.fixture(scope="module")
def sentiment_teacher(tmp_path_factory):
    """A 2-layer BERT fine-tuned with the plain Trainer on 1000 generated sentences."""
    teacher = tiny_bert(2, 32, heads=4)
    Trainer(model=teacher, args=training_args(tmp_path_factory.mktemp("teacher"), num_train_epochs=5),
            train_dataset=sentiment_data(1000, seed=1)).train()
    return teacher


def distill_log(trainer: Trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def with_transfer_set(labeled: list[dict], unlabeled: list[dict]) -> list[dict]:
    """Labeled sentences spread among unlabeled ones (label -100): in order, every batch holds a few labels."""
    per_label = len(unlabeled) // len(labeled)
    mixed = []
    for i, item in enumerate(labeled):
        mixed += [item, *[{**u, "labels": torch.tensor(-100)} for u in unlabeled[i * per_label:(i + 1) * per_label]]]
    return mixed


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_distilled_bert_beats_the_same_student_trained_alone(sentiment_teacher, tmp_path, seed):
    """40 labeled sentences; distillation adds 200 unlabeled ones that only the teacher labels (a transfer set)."""
    labeled, held_out = sentiment_data(40, seed=2), sentiment_data(500, seed=3)
    assert accuracy(sentiment_teacher, held_out) > 0.95
    alone = tiny_bert(1, 16, seed=seed)
    Trainer(model=alone, args=training_args(tmp_path, num_train_epochs=20, seed=seed), train_dataset=labeled).train()

    student = tiny_bert(1, 16, seed=seed)
    trainer = DistillationTrainer(model=student, teacher=sentiment_teacher, kd_config=TINYBERT,
                                  args=training_args(tmp_path, num_train_epochs=8, seed=seed,
                                                     train_sampling_strategy="sequential"),
                                  train_dataset=with_transfer_set(labeled, sentiment_data(200, seed=4)))
    trainer.train()
    print(f"held-out accuracy: alone {accuracy(alone, held_out):.3f}, distilled {accuracy(student, held_out):.3f}")
    assert accuracy(student, held_out) > accuracy(alone, held_out) + 0.1
    log = distill_log(trainer)
    assert len(log) == 64 // 5
    for entry in log:
        assert {"distill/task", "distill/kd", "distill/hidden_states", "distill/attention_maps",
                "distill/total"} <= set(entry)
        assert entry["distill/total"] == pytest.approx(entry["loss"], rel=1e-4)
    assert log[-1]["distill/kd"] < log[0]["distill/kd"]


def test_resume_from_checkpoint_gives_the_losses_of_an_uninterrupted_run(sentiment_teacher, tmp_path):
    config = {**TINYBERT, "terms": [*TINYBERT["terms"][:2],
                                    {"kind": "attention_maps", "weight": {"schedule": "linear", "start": 0,
                                                                          "end": 20, "steps": 6}}]}
    data = sentiment_data(48, seed=4)

    def run(output_dir, resume=None):
        args = training_args(output_dir, per_device_train_batch_size=16, max_steps=6, logging_steps=1,
                             save_strategy="steps", save_steps=3, learning_rate=1e-2, seed=7)
        trainer = DistillationTrainer(model=tiny_bert(1, 16, seed=3, dropout=0.1), teacher=sentiment_teacher,
                                      kd_config=config, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {entry["step"]: entry for entry in distill_log(trainer)}

    whole, whole_log = run(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert (checkpoint / DISTILLER_STATE).is_file()
    saved = torch.load(checkpoint / DISTILLER_STATE, weights_only=True)
    assert any(key.startswith("connectors.hidden_states") for key in saved)
    resumed, resumed_log = run(tmp_path / "resumed", resume=str(checkpoint))
    assert sorted(resumed_log) == [1, 2, 3, 4, 5, 6]  # 1-3 come back with the checkpoint's trainer state
    for step in (4, 5, 6):
        for key in ("loss", "distill/kd", "distill/hidden_states", "distill/attention_maps", "distill/task"):
            assert resumed_log[step][key] == pytest.approx(whole_log[step][key], rel=1e-6), (step, key)
    assert resumed.distiller.step == whole.distiller.step == 6
    for name, value in whole.distiller.state_dict().items():
        torch.testing.assert_close(resumed.distiller.state_dict()[name], value)


class _StepProbe(kdhooks.Term):
    """Logs the step the Distiller's schedules see; adds nothing to the loss."""

    kind = "step_probe"

    def loss(self, ctx: kdhooks.LossContext, **captures) -> torch.Tensor:
        ctx.log("seen_step", ctx.step)
        return torch.zeros(())


def test_lm_kd_through_the_trainer_logs_each_divergence_as_the_full_formula(tmp_path):
    """Two micro-batches per optimizer step: the first logged values are the mean over them at the initial weights."""
    items = lm_data(8, seed=6)
    teacher, student = tiny_llama(2, 32, seed=1), tiny_llama(1, 16, seed=2)
    initial = tiny_llama(1, 16, seed=2)
    terms = [{"kind": "lm_kd", "name": d, "divergence": d, "beta": 0.3, "temperature": 2.0, "chunk_size": 16}
             for d in DIVERGENCES]
    config = {"task_weight": 0.5, "terms": [*terms, _StepProbe(name="probe")]}
    args = training_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                         logging_steps=1, train_sampling_strategy="sequential")
    trainer = DistillationTrainer(model=student, teacher=teacher, kd_config=config, args=args, train_dataset=items)
    trainer.train()
    log = distill_log(trainer)
    assert [entry["distill/seen_step"] for entry in log] == [0, 1, 2]  # optimizer steps, not micro-batches
    assert trainer.distiller.step == trainer.state.global_step == 3

    expected = {d: 0.0 for d in DIVERGENCES}
    token_loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for half in (items[:4], items[4:]):
            batch = {k: torch.stack([item[k] for item in half]) for k in half[0]}
            student_logits = initial(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for d in DIVERGENCES:
                expected[d] += full_tensor_divergence(student_logits, teacher_logits, batch["labels"],
                                                      batch["attention_mask"], d, 0.3, 2.0) / 2
            targets = batch["labels"][:, 1:]
            token_loss_sum += float(F.cross_entropy(student_logits[:, :-1].transpose(1, 2), targets,
                                                    ignore_index=-100, reduction="sum"))
            tokens += int((targets != -100).sum())
    for d in DIVERGENCES:
        assert log[0][f"distill/{d}"] == pytest.approx(expected[d], rel=1e-5, abs=1e-6), d
    # the model's loss is normalized over both micro-batches' tokens (num_items_in_batch): the Trainer's
    # loss is the task weight times the token mean, plus the terms averaged over the micro-batches
    assert log[0]["loss"] == pytest.approx(0.5 * token_loss_sum / tokens + sum(expected.values()), rel=1e-5)
    assert log[-1]["distill/forward_kl"] < log[0]["distill/forward_kl"]


class _ClassWeightedTrainer(Trainer):
    """A user's Trainer subclass with its own loss."""

    calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels, weight=torch.tensor([1.0, 3.0]))
        _ClassWeightedTrainer.calls += 1
        return (loss, outputs) if return_outputs else loss


def test_a_trainer_subclass_gets_distillation_with_bf16_autocast_and_its_connectors_trained(tmp_path):
    teacher, student = tiny_bert(2, 32, heads=4, seed=1), tiny_bert(1, 16, seed=2)
    teacher_calls = []
    teacher.register_forward_hook(lambda module, args, kwargs, output: teacher_calls.append(
        (sorted(kwargs), output.logits.dtype)), with_kwargs=True)
    trainer_class = with_distillation(_ClassWeightedTrainer)
    assert issubclass(trainer_class, _ClassWeightedTrainer) and trainer_class.__name__.startswith("Distillation")
    data = sentiment_data(32, seed=5)
    trainer = trainer_class(model=student, teacher=teacher, args=training_args(
        tmp_path, bf16=True, per_device_train_batch_size=8, max_steps=4, logging_steps=2, eval_strategy="no"),
        kd_config={"terms": [{"kind": "kd"}, {"kind": "hidden_states"}]}, train_dataset=data, eval_dataset=data)
    projection = trainer.distiller.connectors["hidden_states"]
    before = [p.detach().clone() for p in projection.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    teacher_calls.clear()  # the dry pass at construction
    trainer.train()

    assert _ClassWeightedTrainer.calls == 4  # the subclass's own loss was the task loss
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in projection.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, projection.parameters()))
    assert len(teacher_calls) == 4
    assert all("labels" not in kwargs and dtype == torch.bfloat16 for kwargs, dtype in teacher_calls)
    assert all(torch.equal(b, p) for b, p in zip(teacher_before, teacher.parameters()))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all("distill/kd" in entry and "distill/hidden_states" in entry for entry in distill_log(trainer))

    metrics = trainer.evaluate()  # the student alone: no teacher call, no term
    assert "eval_loss" in metrics and len(teacher_calls) == 4


@pytest.mark.slow
def test_torchrun_two_processes_keep_the_connectors_in_step(tmp_path):
    """DDP wraps the student only: the Distiller's gradients are averaged by the integration, logs reduced."""
    tests = Path(__file__).parent
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(tests / "_hf_ddp_worker.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tests)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["connector"] == ranks[1]["connector"]  # each rank saw other data, the gradients were averaged
    assert ranks[0]["log"] == ranks[1]["log"] and len(ranks[0]["log"]) == 2
    assert all("distill/hidden_states" in entry for entry in ranks[0]["log"])


def test_max_grad_norm_clips_the_student_and_its_connectors_together(tmp_path):
    teacher, student = tiny_bert(2, 32, heads=4, seed=1), tiny_bert(1, 16, seed=2)
    norms = []

    class _Norms(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            connectors = [p.grad for p in trainer.distiller.parameters() if p.grad is not None]
            student_grads = [p.grad for p in student.parameters() if p.grad is not None]
            norms.append((torch.nn.utils.get_total_norm(connectors).item(),
                          torch.nn.utils.get_total_norm([*student_grads, *connectors]).item()))

    trainer = DistillationTrainer(model=student, teacher=teacher, kd_config={"terms": [{"kind": "hidden_states"}]},
                                  args=training_args(tmp_path, max_steps=3, max_grad_norm=1e-3),
                                  train_dataset=sentiment_data(96, seed=5), callbacks=[_Norms()])
    trainer.train()
    assert len(norms) == 3
    for connectors, total in norms:
        assert 0 < connectors and total == pytest.approx(1e-3, rel=1e-3)
