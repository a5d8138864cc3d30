"""evaluate() with distillation (issue #13): eval_distill/<term> against a hand computation, the default rule,
raw and weighted logs, and an evaluation that leaves training as it was (real Trainer, CPU, tiny models)."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from _hf import full_tensor_divergence, lm_data, sentiment_data, tiny_bert, tiny_gpt2, tiny_llama, training_args

from kdhooks.integrations.hf import DistillationTrainer

transformers.logging.set_verbosity_error()

CONFIG = {"task_weight": 0.5, "terms": [{"kind": "kd", "weight": 0.5, "temperature": 2.0},
                                        {"kind": "hidden_states", "weight": 0.1}]}
TRAIN, EVAL = sentiment_data(32, seed=5), sentiment_data(16, seed=6)


def confident_teacher(layers: int = 2, hidden: int = 32, heads: int = 4) -> torch.nn.Module:
    """A random-weight BERT whose logits are far from uniform, so that KD is not ~0 (float32 rounding)."""
    teacher = tiny_bert(layers, hidden, heads=heads, seed=1)
    with torch.no_grad():
        teacher.classifier.weight.mul_(30)
        teacher.classifier.bias.copy_(torch.tensor([2.0, -2.0]))
    return teacher


def trainer_for(tmp_path, teacher=None, config=CONFIG, **options) -> DistillationTrainer:
    args = {"max_steps": 2, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "logging_steps": 1}
    eval_distill = options.pop("eval_distill", None)
    args.update(options)
    return DistillationTrainer(model=tiny_bert(1, 16, seed=0), teacher=teacher, kd_config=config,
                               eval_distill=eval_distill, args=training_args(tmp_path, **args),
                               train_dataset=TRAIN, eval_dataset=EVAL)


def kd_by_hand(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> float:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over samples, in float64."""
    p = (teacher_logits.double() / temperature).softmax(-1)
    log_q = (student_logits.double() / temperature).log_softmax(-1)
    return float((p * (p.log() - log_q)).sum(-1).mean() * temperature**2)


def distill_keys(metrics: dict, prefix: str = "eval") -> set[str]:
    return {key for key in metrics if key.startswith(f"{prefix}_distill")}


def test_eval_distill_reports_each_term_as_computed_by_hand_with_the_prefix(tmp_path):
    teacher = confident_teacher()
    trainer = trainer_for(tmp_path, teacher, eval_distill=True)
    trainer.train()
    step = trainer.distiller.step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turned on: no note about turning it on
        metrics = trainer.evaluate()
    assert trainer.distiller.step == step  # evaluation does not advance the schedules' step
    assert distill_keys(metrics) == {"eval_distill/task", "eval_distill/kd", "eval_distill/hidden_states",
                                     "eval_distill/total", "eval_distill_raw/kd", "eval_distill_raw/hidden_states"}

    student = trainer.model.eval()
    by_hand = []
    with torch.no_grad():
        for start in (0, 8):   # the two eval batches, in order
            batch = {key: torch.stack([item[key] for item in EVAL[start:start + 8]])
                     for key in ("input_ids", "attention_mask")}
            by_hand.append(kd_by_hand(student(**batch).logits, teacher(**batch).logits, 2.0))
    kd = sum(by_hand) / 2
    assert metrics["eval_distill_raw/kd"] == pytest.approx(kd, rel=1e-5)
    assert metrics["eval_distill/kd"] == pytest.approx(0.5 * kd, rel=1e-5)
    assert metrics["eval_distill/hidden_states"] == pytest.approx(0.1 * metrics["eval_distill_raw/hidden_states"],
                                                                  rel=1e-6)
    # eval_loss stays the task loss; the total weighs it as training does
    assert metrics["eval_distill/task"] == pytest.approx(0.5 * metrics["eval_loss"], rel=1e-5)
    parts = ("task", "kd", "hidden_states")
    assert metrics["eval_distill/total"] == pytest.approx(sum(metrics[f"eval_distill/{p}"] for p in parts), rel=1e-6)

    dev = trainer.evaluate(metric_key_prefix="dev")
    assert distill_keys(dev, "dev") == {key.replace("eval_", "dev_", 1) for key in distill_keys(metrics)}
    assert dev["dev_distill/kd"] == pytest.approx(metrics["eval_distill/kd"], rel=1e-6)
    # unlabeled text: the Trainer runs the student without compute_loss, the terms are measured alone
    unlabeled = trainer.evaluate([{k: v for k, v in item.items() if k != "labels"} for item in EVAL])
    assert "eval_loss" not in unlabeled and "eval_distill/task" not in unlabeled
    assert unlabeled["eval_distill/kd"] == pytest.approx(metrics["eval_distill/kd"], rel=1e-6)
    assert unlabeled["eval_distill/total"] == pytest.approx(metrics["eval_distill/total"] - metrics[
        "eval_distill/task"], rel=1e-5)

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["distill/kd"] == pytest.approx(0.5 * entry["distill_raw/kd"], rel=1e-6)
        assert entry["distill/hidden_states"] == pytest.approx(0.1 * entry["distill_raw/hidden_states"], rel=1e-6)
        assert "distill_raw/task" not in entry and "distill_raw/total" not in entry


def test_off_by_default_with_a_teacher_saying_once_how_to_turn_it_on(tmp_path):
    teacher = confident_teacher()
    trainer = trainer_for(tmp_path, teacher)
    with pytest.warns(UserWarning, match=r"costs a forward of the teacher per eval batch.*eval_distill=True"):
        first = trainer.evaluate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = trainer.evaluate()   # once per trainer
    assert not distill_keys(first) and not distill_keys(second) and "eval_loss" in first

    quiet = trainer_for(tmp_path, teacher, eval_distill=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not distill_keys(quiet.evaluate())


def test_on_by_default_when_no_teacher_runs(tmp_path):
    # Be Your Own Teacher: the student's own deepest classifier teaches heads on its shallow layers
    config = {"terms": [{"kind": "byot", "stages": ["bert.encoder.layer.0.output"], "classifier": "classifier",
                         "weight": 0.3}]}
    trainer = trainer_for(tmp_path, None, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = trainer.evaluate()
    stage = "byot.bert.encoder.layer.0.output"
    assert {f"eval_distill/{stage}", f"eval_distill_raw/{stage}", "eval_distill/total"} <= distill_keys(metrics)
    assert metrics[f"eval_distill/{stage}"] == pytest.approx(0.3 * metrics[f"eval_distill_raw/{stage}"], rel=1e-6)


def test_evaluating_between_training_steps_changes_no_training_loss(tmp_path):
    teacher = confident_teacher()
    plain = trainer_for(tmp_path / "plain", teacher, max_steps=4)
    plain.train()
    evaluated = trainer_for(tmp_path / "evaluated", teacher, max_steps=4, eval_distill=True,
                            eval_strategy="steps", eval_steps=1)
    evaluated.train()
    losses = [[{k: v for k, v in entry.items() if k in ("loss", "distill/total", "distill/kd")}
               for entry in trainer.state.log_history if "loss" in entry] for trainer in (plain, evaluated)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert len([entry for entry in evaluated.state.log_history if "eval_distill/kd" in entry]) == 4
    assert evaluated.distiller.step == plain.distiller.step


def test_a_gradient_term_is_left_out_of_evaluation_with_a_note(tmp_path):
    teacher = confident_teacher(1, 16, 2)   # grad_at compares gradient maps of one shape
    config = {"terms": [{"kind": "kd", "temperature": 2.0},
                        {"kind": "grad_at", "student": "bert.embeddings", "teacher": "bert.embeddings"}]}
    trainer = trainer_for(tmp_path, teacher, config, eval_distill=True, max_steps=1)
    trainer.train()
    assert "distill/grad_at" in trainer.state.log_history[0]
    with pytest.warns(UserWarning, match=r"'grad_at' .* left out of evaluation: it reads gradients"):
        metrics = trainer.evaluate()
    assert "eval_distill/kd" in metrics and "eval_distill/grad_at" not in metrics


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_evaluated_lm_kd_on_causal_lms_equals_the_hand_computation(make, tmp_path):
    """Llama and GPT-2 eval batches (prompt and padding -100, right padding): the causal shift and the masks as in
    training, over the whole eval set."""
    teacher, student = make(2, 32, seed=1), make(1, 16, seed=2)
    held_out = lm_data(8, seed=9)
    config = {"task_weight": 1.0, "terms": [{"kind": "lm_kd", "divergence": "jsd", "temperature": 2.0}]}
    trainer = DistillationTrainer(model=student, teacher=teacher, kd_config=config, eval_distill=True,
                                  args=training_args(tmp_path, per_device_eval_batch_size=8, max_steps=1),
                                  train_dataset=lm_data(8, seed=8), eval_dataset=held_out)
    metrics = trainer.evaluate()
    batch = {key: torch.stack([item[key] for item in held_out]) for key in held_out[0]}
    with torch.no_grad():
        student_logits = student.eval()(**batch).logits
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = full_tensor_divergence(student_logits, teacher_logits, batch["labels"], batch["attention_mask"],
                                      "jsd", 0.5, 2.0)
    assert metrics["eval_distill_raw/lm_kd"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_distill/total"] == pytest.approx(metrics["eval_loss"] + expected, rel=1e-5)
    trainer.distiller.close()
