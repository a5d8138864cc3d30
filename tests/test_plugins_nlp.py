"""NLP terms on tiny HF models (no Trainer): each value against a formula written here, chunking, SDPA."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _hf import full_tensor_divergence, lm_data, tiny_bert, tiny_llama
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import kdhooks
from kdhooks.plugins.nlp import LinearHead, layer_pairs, lm_kd_loss, lm_token_mask

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")


def lm_batch() -> dict[str, torch.Tensor]:
    items = lm_data(4, seed=5)
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    # one left-padded row too: masking must follow attention_mask, not only labels
    batch["attention_mask"][3, :2] = 0
    batch["labels"][3, :4] = -100
    return batch


@pytest.mark.parametrize("top_k", [None, 7])
def test_lm_kd_each_divergence_equals_full_tensor_formula(top_k):
    teacher, student = tiny_llama(2, 32, seed=1), tiny_llama(1, 16, seed=2)
    batch = lm_batch()
    terms = [{"kind": "lm_kd", "name": d, "divergence": d, "beta": 0.3, "temperature": 2.0, "chunk_size": 9,
              "top_k": top_k} for d in DIVERGENCES]
    kd = kdhooks.Distiller(student, teacher, {"task_weight": 0.0, "terms": terms}, example_inputs=batch)
    student.train()
    output = student(**batch)
    kd(output.loss, **batch).backward()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for divergence in DIVERGENCES:
        expected = full_tensor_divergence(output.logits.detach(), teacher_logits, batch["labels"],
                                          batch["attention_mask"], divergence, 0.3, 2.0, top_k)
        assert kd.last_losses[divergence] == pytest.approx(expected, rel=1e-5, abs=1e-6), divergence
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.lm_head.parameters())
    kd.close()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_equals_unchunked_in_value_and_gradient(divergence):
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(3, 11, 8), torch.randn(50, 8), torch.randn(50)
    teacher = LinearHead(torch.randn(3, 11, 8), torch.randn(50, 8))
    mask = torch.rand(3, 11) > 0.3
    results = []
    for head, chunk_size, top_k in [(False, None, None), (False, 4, None), (True, 5, None), (True, None, None),
                                    (False, None, 6), (True, 4, 6)]:
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        student = LinearHead(*leaves) if head else F.linear(*leaves)
        loss = lm_kd_loss(student, teacher, mask=mask, divergence=divergence, beta=0.7, temperature=1.5,
                          top_k=top_k, chunk_size=chunk_size)
        loss.backward()
        results.append((top_k, loss.detach(), *[leaf.grad for leaf in leaves]))
    for top_k, *values in results[1:]:
        reference = next(r for r in results if r[0] == top_k)[1:]
        for got, want in zip(values, reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_lm_kd_from_the_output_layer_equals_lm_kd_from_logits():
    teacher, batch = tiny_llama(2, 32, seed=1), lm_batch()
    values = []
    for heads in ({}, {"student_head": "lm_head", "teacher_head": "lm_head"},
                  {"student_head": "lm_head", "student_hidden": "model", "teacher_head": "lm_head",
                   "teacher_hidden": "model:last_hidden_state"}):
        student = tiny_llama(1, 16, seed=2)
        config = {"terms": [{"kind": "lm_kd", "divergence": "jsd", "chunk_size": 5, **heads}]}
        with kdhooks.Distiller(student, teacher, config, example_inputs=batch) as kd:
            student.train()
            kd(student(**batch).loss, **batch).backward()
            values.append((kd.last_losses["lm_kd"], student.lm_head.weight.grad.clone()))
    for value, grad in values[1:]:
        assert values[0][0] == pytest.approx(value, rel=1e-5)
        torch.testing.assert_close(values[0][1], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options, location, says", [
    ({"student_hidden": "model"}, "terms[0].student_hidden", "student_head"),
    ({"student_head": "lm_haed"}, "terms[0].student_head", "'lm_head'"),
    ({"student_head": "lm_head", "student_hidden": "model.layers.0.mlp.up_proj"}, "terms[0].student_hidden", "32"),
])
def test_lm_kd_head_options_that_cannot_work(options, location, says):
    """Each fails while the Distiller is built (at the latest at its dry pass), not at the first step."""
    teacher, student, batch = tiny_llama(2, 32, seed=1), tiny_llama(1, 16, seed=2), lm_batch()
    with pytest.raises(kdhooks.ConfigError) as error:
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "lm_kd", **options}]}, example_inputs=batch)
    assert error.value.location == location and says in str(error.value)


def test_hidden_states_and_attention_maps_equal_their_formulas():
    teacher, student = tiny_bert(4, 32, heads=2, seed=1), tiny_bert(2, 16, heads=2, seed=2)
    with torch.no_grad():  # sharper teacher attention: a KL well above float32 rounding
        for layer in teacher.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8)
    batch = {"input_ids": torch.randint(3, 40, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1])}
    batch["attention_mask"][1, 6:] = 0
    config = {"terms": [{"kind": "hidden_states", "embeddings": True},
                        {"kind": "attention_maps", "name": "att_mse", "heads": "matched"},
                        {"kind": "attention_maps", "name": "att_kl", "distance": "kl", "layer_map": "last",
                         "embeddings": True}]}
    kd = kdhooks.Distiller(student, teacher, config, example_inputs=batch)
    student.train()
    kd(student(**batch).loss, labels=batch["labels"], attention_mask=batch["attention_mask"]).backward()
    assert all(p.grad is not None for p in kd.parameters())  # every projection is trained
    losses = kd.last_losses
    kd.close()

    student.eval()
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, output_attentions=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, output_attentions=True)
        real = batch["attention_mask"].bool()
        projections = [kd.connectors[k] for k in kd.connectors if k.startswith("hidden_states")]
        pairs = [(0, 0), (1, 2), (2, 4)]  # embeddings, then uniform: student m -> teacher 2m
        hidden = sum(((projection(s.hidden_states[i]) - t.hidden_states[j]) ** 2).mean(-1)[real].mean()
                     for projection, (i, j) in zip(projections, pairs)) / 3
        assert losses["hidden_states"] == pytest.approx(float(hidden), rel=1e-5)

        rows = real[:, None, :, None] & real[:, None, None, :]
        mse = sum(((s.attentions[i] - t.attentions[j]) ** 2)[rows.expand_as(s.attentions[i])].mean()
                  for i, j in [(0, 1), (1, 3)]) / 2
        assert losses["att_mse"] == pytest.approx(float(mse), rel=1e-5)

        s_avg, t_avg = s.attentions[1].mean(1), t.attentions[3].mean(1)
        kl_rows = ((torch.xlogy(t_avg, t_avg) - torch.xlogy(t_avg, s_avg)) * real[:, None, :]).sum(-1)
        kl = kl_rows[real].mean()
        embedding_projection = kd.connectors["att_kl"]
        embeddings = ((embedding_projection(s.hidden_states[0]) - t.hidden_states[0]) ** 2).mean(-1)[real].mean()
        assert losses["att_kl"] == pytest.approx(float(kl), rel=1e-5)
        assert losses["att_kl.embeddings"] == pytest.approx(float(embeddings), rel=1e-5)


def test_layer_maps():
    assert layer_pairs("uniform", 2, 4) == [(1, 2), (2, 4)]
    assert layer_pairs("uniform", 3, 4) == [(1, 1), (2, 2), (3, 4)]
    assert layer_pairs("last", 2, 6) == [(2, 6)]
    assert layer_pairs([[0, 0], [2, 3]], 2, 4, first=0) == [(0, 0), (2, 3)]
    with pytest.raises(kdhooks.ConfigError, match="out of range") as error:
        kdhooks.Distiller(tiny_bert(2, 16), tiny_bert(4, 32),
                          {"terms": [{"kind": "hidden_states", "layer_map": [[1, 5]]}]})
    assert error.value.location == "terms[0].layer_map"


def test_matched_heads_need_equal_head_counts():
    batch = {"input_ids": torch.randint(3, 40, (2, 8))}
    with pytest.raises(kdhooks.ConfigError, match="heads") as error:
        kdhooks.Distiller(tiny_bert(1, 16, heads=2), tiny_bert(2, 32, heads=4),
                          {"terms": [{"kind": "attention_maps", "heads": "matched"}]}, example_inputs=batch)
    assert error.value.fix == "use `heads: averaged`"


def test_sdpa_models_switch_to_eager_with_a_warning_and_back_on_close():
    teacher, student = tiny_bert(2, 32, attn="sdpa"), tiny_bert(1, 16, attn="sdpa")
    batch = {"input_ids": torch.randint(3, 40, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kd = kdhooks.Distiller(student, teacher, {"terms": [{"kind": "attention_maps", "name": "attention_maps"},
                                                            {"kind": "attention_maps", "name": "again"}]},
                               example_inputs=batch)
    switched = sorted(str(w.message) for w in caught if "to 'eager'" in str(w.message))
    assert len(switched) == 2  # once per model, whichever term asked first, each naming its model
    assert "switching the student (BertForSequenceClassification)" in switched[0]
    assert "switching the teacher (BertForSequenceClassification)" in switched[1]
    assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"
    student.train()
    student(**batch)
    probabilities = kd.captures[next(t for t in kd.captures if t.role == "teacher")]
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 2, 8))  # real probabilities, not None
    kd(None, **batch)
    assert kd.last_losses["attention_maps"] > 0
    kd.close()
    assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"


class _FixedConfig(PretrainedConfig):
    model_type = "kdhooks_fixed_attention"


class _FixedAttention(nn.Module):
    """An attention block written without transformers' attention interface: it cannot be switched."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v), None


class _FixedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _FixedAttention()

    def forward(self, x):
        return x + self.attn(x)[0]


class _FixedModel(PreTrainedModel):
    config_class = _FixedConfig
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList([_FixedBlock(), _FixedBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_model_that_cannot_switch_gets_a_config_error_that_says_how():
    fixed = _FixedModel(_FixedConfig(attn_implementation="sdpa"))
    assert fixed.config._attn_implementation == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(kdhooks.ConfigError, match="cannot be switched") as error:
            kdhooks.Distiller(_FixedModel(_FixedConfig(attn_implementation="sdpa")), fixed,
                              {"terms": [{"kind": "attention_maps"}]})
    assert "attn_implementation='eager'" in error.value.fix


def test_token_masks_for_causal_and_masked_lms():
    labels = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, 8, 9, 4]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    # causal: position i counts when it and i+1 are real and label i+1 is kept
    assert lm_token_mask((2, 5), labels, attention_mask, causal=True).tolist() == [
        [True, True, True, False, False], [False, True, True, True, False]]
    # masked LM: the labeled positions themselves
    assert lm_token_mask((2, 5), labels, attention_mask, causal=False).tolist() == [
        [False, True, True, True, False], [False, False, True, True, True]]


def test_attention_dropout_in_the_student_is_warned_about():
    with pytest.warns(UserWarning, match="attention_probs_dropout_prob=0.1 drops attention probabilities"):
        kdhooks.Distiller(tiny_bert(1, 16, attention_dropout=0.1), tiny_bert(2, 32),
                          {"terms": [{"kind": "attention_maps"}]},
                          example_inputs={"input_ids": torch.randint(3, 40, (2, 8))})


@pytest.mark.parametrize("heads", [{}, {"student_head": "lm_head", "teacher_head": "lm_head"},
                                   {"student_head": "lm_head", "student_hidden": "model"}])
def test_different_vocabularies_fail_at_the_dry_pass_with_the_fix(heads):
    teacher, student, batch = tiny_llama(2, 32, seed=1, vocab=48), tiny_llama(1, 16, seed=2), lm_batch()
    with pytest.raises(kdhooks.ConfigError, match="vocabulary has 40 entries and the teacher's 48") as error:
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "lm_kd", **heads}]}, example_inputs=batch)
    assert error.value.location == "terms[0]" and "tokenizer" in error.value.fix

