"""Encoder–decoder models (T5, BART): each NLP term against a hand computation, alone and under the Trainer."""
from __future__ import annotations

import pytest
import torch
import transformers
from _hf import LENGTH, full_tensor_divergence, seq2seq_data, tiny_bart, tiny_t5, training_args

import kdhooks
from kdhooks.integrations.hf import DistillationTrainer

transformers.logging.set_verbosity_error()

MODELS = {"t5": tiny_t5, "bart": tiny_bart}


def batch_of(items: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def decoder_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       temperature: float = 1.0, decoder_mask: torch.Tensor | None = None) -> float:
    """KL(teacher‖student) at each decoder position whose label is kept (no shift), mean · T², in float64."""
    keep = labels != -100
    if decoder_mask is not None:
        keep &= decoder_mask.bool()
    p = (teacher_logits.double() / temperature).log_softmax(-1)
    q = (student_logits.double() / temperature).log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1)[keep].mean() * temperature**2)


def sharpen(model: torch.nn.Module, factor: float = 8.0) -> None:
    """Scale every attention's queries: attention maps far from uniform, so their distances are well above rounding."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_proj", ".q")):
                module.weight.mul_(factor)


@pytest.mark.parametrize("model", ["t5", "bart"])
@pytest.mark.parametrize("target_length", [10, LENGTH])
def test_lm_kd_on_the_decoders_tokens_equals_the_hand_computation(model, target_length):
    """Decoder logits at i predict labels[i]: no shift, labels -100 out, the encoder's mask not applied."""
    make = MODELS[model]
    teacher, student = make(2, 32, seed=1), make(1, 16, seed=2)
    batch = batch_of(seq2seq_data(4, seed=0, target_length=target_length))
    batch["decoder_attention_mask"] = torch.ones_like(batch["labels"])
    batch["decoder_attention_mask"][0, 2] = 0  # a decoder position masked by hand counts no more
    config = {"task_weight": 0.0, "terms": [{"kind": "lm_kd", "name": "lm_kd", "temperature": 2.0, "chunk_size": 7},
                                            {"kind": "lm_kd", "name": "head", "temperature": 2.0,
                                             "student_head": "lm_head", "teacher_head": "lm_head"}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=batch) as kd:
        student.train()
        output = student(**batch)
        kd(output.loss, **batch).backward()
        losses = kd.last_losses
    with torch.no_grad():
        teacher_logits = teacher(**batch).logits  # labels → decoder inputs, as the student made them
    expected = decoder_divergence(output.logits.detach(), teacher_logits, batch["labels"], 2.0,
                                  batch["decoder_attention_mask"])
    assert losses["lm_kd"] == pytest.approx(expected, rel=1e-5)
    assert losses["head"] == pytest.approx(expected, rel=1e-5)
    assert student.lm_head.weight.grad.abs().sum() > 0


def test_lm_kd_refuses_a_causal_shift_on_an_encoder_decoder():
    batch = batch_of(seq2seq_data(2, seed=0))
    with pytest.raises(kdhooks.ConfigError, match="no shift") as error:
        kdhooks.Distiller(tiny_bart(1, 16), tiny_bart(2, 32), {"terms": [{"kind": "lm_kd", "causal": True}]},
                          example_inputs=batch)
    assert error.value.location == "terms[0].causal"


@pytest.mark.parametrize("model", ["t5", "bart"])
def test_hidden_states_and_attention_maps_address_encoder_decoder_and_cross_attention(model):
    make = MODELS[model]
    teacher, student = make(4, 32, seed=1), make(2, 16, seed=2)
    sharpen(teacher)
    batch = batch_of(seq2seq_data(3, seed=1))
    config = {"terms": [
        {"kind": "hidden_states", "name": "encoder", "layer_map": [[1, 2]], "embeddings": True},
        {"kind": "hidden_states", "name": "decoder", "stack": "decoder", "layer_map": [[1, 2]], "embeddings": True},
        {"kind": "attention_maps", "name": "encoder_self"},
        {"kind": "attention_maps", "name": "decoder_self", "stack": "decoder", "distance": "kl"},
        {"kind": "attention_maps", "name": "cross", "stack": "decoder", "attention": "cross", "heads": "matched"}]}
    kd = kdhooks.Distiller(student, teacher, config, example_inputs=batch)
    student.train()
    kd(student(**batch).loss, **batch).backward()
    assert all(p.grad is not None for p in kd.parameters())
    losses, connectors = kd.last_losses, dict(kd.connectors.items())
    kd.close()

    student.eval()
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True, output_attentions=True)
        t = teacher(**batch, output_hidden_states=True, output_attentions=True)
        source = batch["attention_mask"].bool()
        target = batch["labels"] != -100  # the decoder positions that predict a label

        def hidden(name, student_states, teacher_states, mask):
            projections = [module for key, module in connectors.items() if key.startswith(name)]
            return sum(((projection(student_states[i]) - teacher_states[j]) ** 2).mean(-1)[mask].mean()
                       for projection, (i, j) in zip(projections, [(0, 0), (1, 2)])) / 2

        assert losses["encoder"] == pytest.approx(
            float(hidden("encoder", s.encoder_hidden_states, t.encoder_hidden_states, source)), rel=1e-5)
        assert losses["decoder"] == pytest.approx(
            float(hidden("decoder", s.decoder_hidden_states, t.decoder_hidden_states, target)), rel=1e-5)

        def mse(student_maps, teacher_maps, queries, keys, averaged=True):
            total = 0.0
            for i, j in [(0, 1), (1, 3)]:  # uniform: student layer m ↔ teacher layer 2m
                a, b = student_maps[i], teacher_maps[j]
                if averaged:
                    a, b = a.mean(1, keepdim=True), b.mean(1, keepdim=True)
                rows = (queries[:, None, :, None] & keys[:, None, None, :]).expand_as(a)
                total += ((a - b) ** 2)[rows].mean()
            return float(total / 2)

        assert losses["encoder_self"] == pytest.approx(
            mse(s.encoder_attentions, t.encoder_attentions, source, source), rel=1e-5)
        assert losses["cross"] == pytest.approx(
            mse(s.cross_attentions, t.cross_attentions, target, source, averaged=False), rel=1e-5)
        kl = 0.0
        for i, j in [(0, 1), (1, 3)]:
            a, b = s.decoder_attentions[i].mean(1), t.decoder_attentions[j].mean(1)
            rows = ((torch.xlogy(b, b) - torch.xlogy(b, a)) * target[:, None, :]).sum(-1)
            kl += rows[target].mean()
        assert losses["decoder_self"] == pytest.approx(float(kl / 2), rel=1e-5)
    assert min(losses[name] for name in ("encoder_self", "decoder_self", "cross")) > 1e-5


def test_cross_attention_needs_the_decoder_stack():
    batch = batch_of(seq2seq_data(2, seed=0))
    with pytest.raises(kdhooks.ConfigError, match="decoder") as error:
        kdhooks.Distiller(tiny_t5(1, 16), tiny_t5(2, 32), {"terms": [{"kind": "attention_maps", "attention": "cross"}]},
                          example_inputs=batch)
    assert error.value.location == "terms[0].attention" and error.value.fix == "set `stack: decoder`"


@pytest.mark.parametrize("model, target_length", [("t5", 10), ("bart", 10), ("bart", LENGTH)])
def test_the_trainer_gives_the_teacher_the_students_decoder_inputs(model, target_length, tmp_path):
    """The teacher gets decoder_input_ids made from the labels (and no labels); lm_kd logs the hand value."""
    make = MODELS[model]
    teacher, student, initial = make(2, 32, seed=1), make(1, 16, seed=2), make(1, 16, seed=2)
    items = seq2seq_data(8, seed=3, target_length=target_length)
    calls = []
    teacher.register_forward_hook(lambda module, args, kwargs, output: calls.append(kwargs), with_kwargs=True)
    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=items,
                                  kd_config={"task_weight": 0.5, "terms": [{"kind": "lm_kd", "temperature": 2.0},
                                                                           {"kind": "hidden_states",
                                                                            "stack": "decoder"}]},
                                  args=training_args(tmp_path, per_device_train_batch_size=8, max_steps=2,
                                                     logging_steps=1))
    calls.clear()  # the dry pass
    trainer.train()
    assert len(calls) == 2
    assert all("labels" not in kwargs and kwargs["decoder_input_ids"].shape == (8, target_length) for kwargs in calls)
    first = [entry for entry in trainer.state.log_history if "distill/lm_kd" in entry][0]

    batch = batch_of(items)
    with torch.no_grad():
        student_logits = initial(**batch).logits
        teacher_logits = teacher(**batch).logits
    right = decoder_divergence(student_logits, teacher_logits, batch["labels"], 2.0)
    assert first["distill/lm_kd"] == pytest.approx(right, rel=1e-5)
    if target_length == LENGTH and model == "bart":
        # what a teacher that decodes the shifted input ids, masked by the encoder's shifted mask, would give
        with torch.no_grad():
            shifted = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        wrong = full_tensor_divergence(student_logits, shifted, batch["labels"], batch["attention_mask"],
                                       "forward_kl", 0.5, 2.0)
        print(f"BART lm_kd, equal lengths: {right:.4f} (teacher on the labels' decoder inputs), "
              f"{wrong:.4f} (on the shifted input ids)")
        assert abs(wrong - right) > 0.05 * right
    trainer.distiller.close()


@pytest.mark.parametrize("model", ["t5", "bart"])
def test_evaluation_gives_the_teacher_the_decoder_inputs_too(model, tmp_path):
    """eval_distill: the eval batches reach the teacher as training batches do (labels → decoder inputs), so the
    evaluated lm_kd is the hand value on the eval set, not a teacher decoding something else."""
    make = MODELS[model]
    teacher, student = make(2, 32, seed=1), make(1, 16, seed=2)
    train, held_out = seq2seq_data(8, seed=3, target_length=10), seq2seq_data(8, seed=4, target_length=10)
    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=train, eval_dataset=held_out,
                                  eval_distill=True,
                                  kd_config={"task_weight": 0.5, "terms": [{"kind": "lm_kd", "weight": 0.3,
                                                                           "temperature": 2.0}]},
                                  args=training_args(tmp_path, per_device_eval_batch_size=8, max_steps=1))
    metrics = trainer.evaluate()
    batch = batch_of(held_out)
    with torch.no_grad():
        expected = decoder_divergence(student.eval()(**batch).logits, teacher(**batch).logits, batch["labels"], 2.0)
    # float32 log-probabilities near log(1/40) differ by a few hundredths per token, so the float32 loss (the
    # textbook float32 form's too) is 1e-5 off this float64 value; a teacher decoding other inputs, what this
    # test guards against, moves it by over 5% (the training test above)
    assert metrics["eval_distill_raw/lm_kd"] == pytest.approx(expected, rel=1e-4)
    assert metrics["eval_distill/lm_kd"] == pytest.approx(0.3 * expected, rel=1e-4)
    assert metrics["eval_distill/task"] == pytest.approx(0.5 * metrics["eval_loss"], rel=1e-5)
    trainer.distiller.close()
