"""The core's `grad` and `attention` taps, checked against autograd and the modules run by hand."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from _models import batch, pair


def teacher_state(teacher: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in teacher.state_dict().items()}


# --- grad ------------------------------------------------------------------------------


def test_student_input_gradient_is_dL_dx_kept_in_the_graph():
    student, teacher = pair()
    x, y = batch()
    tap = kdhooks.Tap("student", "", "grad")
    with kdhooks.Distiller(student, teacher, {}, example_inputs=x[:2]) as kd:
        kd.add_tap(tap)
        student.train()
        task_loss = F.cross_entropy(student(x), y)
        gradient = kdhooks.LossContext(kd, task_loss, {"labels": y})[tap]
    # by hand: the same student (train mode, same batch statistics) on a leaf copy of x
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(student(leaf), y), leaf)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)
    # create_graph: a loss on dL/dx has a gradient with respect to the student's weights (double backprop)
    assert gradient.requires_grad
    (second_order,) = torch.autograd.grad(gradient.pow(2).sum(), student.stage1[0].weight)
    assert second_order.abs().sum() > 0


def test_teacher_gradients_use_teacher_loss_and_leave_the_teacher_frozen():
    student, teacher = pair()
    x, y = batch()
    before = teacher_state(teacher)
    taps = {"input": kdhooks.Tap("teacher", "", "grad"), "stage2": kdhooks.Tap("teacher", "stage2", "grad")}

    def logit_margin(output, extras):  # a custom teacher loss: any scalar of the teacher's output
        return (output.gather(1, extras["labels"][:, None]) - output.logsumexp(1, keepdim=True)).sum()

    for teacher_loss in (None, logit_margin):
        with kdhooks.Distiller(student, teacher, {}, example_inputs=x[:2], teacher_loss=teacher_loss) as kd:
            for tap in taps.values():
                kd.add_tap(tap)
            student.train()
            ctx = kdhooks.LossContext(kd, F.cross_entropy(student(x), y), {"labels": y})
            gradients = {name: ctx[tap] for name, tap in taps.items()}
            assert not any(p.requires_grad for p in teacher.parameters())
        assert all(p.grad is None for p in teacher.parameters())
        # by hand, on an unfrozen copy in eval mode
        reference = copy.deepcopy(teacher).eval()
        leaf = x.clone().requires_grad_(True)
        feature = reference.stage2(reference.stage1(leaf))
        logits = reference.fc(reference.pool(reference.stage3(feature)).flatten(1))
        loss = F.cross_entropy(logits, y) if teacher_loss is None else teacher_loss(logits, {"labels": y})
        expected_input, expected_stage2 = torch.autograd.grad(loss, [leaf, feature])
        torch.testing.assert_close(gradients["input"], expected_input, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gradients["stage2"], expected_stage2, rtol=1e-5, atol=1e-7)
        assert not gradients["input"].requires_grad  # the teacher's target carries no graph
    after = teacher_state(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in teacher.parameters())


def test_a_feature_gradient_of_a_frozen_teacher_alone():
    """Without an input tap nothing upstream needs grad: the tapped output itself becomes the leaf."""
    student, teacher = pair()
    x, y = batch()
    tap = kdhooks.Tap("teacher", "stage3", "grad")
    with kdhooks.Distiller(student, teacher, {}, example_inputs=x[:2]) as kd:
        kd.add_tap(tap)
        student.train()
        gradient = kdhooks.LossContext(kd, F.cross_entropy(student(x), y), {"labels": y})[tap]
    reference = copy.deepcopy(teacher).eval()
    with torch.no_grad():
        feature = reference.stage3(reference.stage2(reference.stage1(x)))
    feature.requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(reference.fc(reference.pool(feature).flatten(1)), y), feature)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


# --- attention -------------------------------------------------------------------------


class Encoder(nn.Module):
    """A transformer layer, a bare MultiheadAttention called with need_weights=False, a classifier."""

    def __init__(self, width: int = 8, heads: int = 2):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(width, heads, 16, dropout=0.0, batch_first=True)
        self.mixer = nn.MultiheadAttention(width, heads, batch_first=True)
        self.head = nn.Linear(width, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.layer(tokens)
        mixed, _ = self.mixer(hidden, hidden, hidden, need_weights=False)
        return self.head(mixed.mean(1))


def test_multihead_attention_taps_return_probabilities_over_keys():
    torch.manual_seed(0)
    student, teacher = Encoder(), Encoder(width=16, heads=4)
    tokens = torch.randn(3, 5, 8)
    taps = [kdhooks.Tap(role, path, "attention") for role in ("student", "teacher") for path in ("layer.self_attn", "mixer")]
    with kdhooks.Distiller(student, teacher, {}, example_inputs=tokens[:2], teacher_call=lambda m, a, k: m(
            F.pad(a[0], (0, 8)))) as kd:
        for tap in taps:
            kd.add_tap(tap)
        student.train()
        student(tokens)
        captures = dict(kd.captures)
    for tap in taps:
        heads = 2 if tap.role == "student" else 4
        assert captures[tap].shape == (3, heads, 5, 5)
        torch.testing.assert_close(captures[tap].sum(-1), torch.ones(3, heads, 5))
        assert (captures[tap] >= 0).all()
    # the student's probabilities are those of the module asked for them by hand, per head
    hidden = student.layer(tokens)
    _, expected = student.mixer(hidden, hidden, hidden, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(captures[taps[1]], expected)
    assert captures[taps[1]].requires_grad and not captures[taps[3]].requires_grad


class ScoredAttention(nn.Module):
    """A hand-written attention returning a dict; its probabilities are picked by a selector."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.query, self.key = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.query(tokens) @ self.key(tokens).transpose(1, 2) / tokens.shape[-1] ** 0.5
        probabilities = scores.softmax(-1)
        return {"hidden": probabilities @ tokens, "probs": probabilities}


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attend = ScoredAttention()
        self.head = nn.Linear(6, 2)

    def forward(self, tokens):
        return self.head(self.attend(tokens)["hidden"].mean(1))


def test_attention_of_a_custom_module_through_a_selector():
    torch.manual_seed(0)
    student, teacher = TinyModel(), TinyModel()
    tokens = torch.randn(4, 7, 6)
    tap = kdhooks.Tap("teacher", "attend:probs", "attention")
    with kdhooks.Distiller(student, teacher, {}, example_inputs=tokens[:2]) as kd:
        kd.add_tap(tap)
        student.train()
        student(tokens)
        probabilities = kd.captures[tap]
    torch.testing.assert_close(probabilities, teacher.attend(tokens)["probs"].detach())
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(4, 7))


class NoProbabilities(nn.Module):
    """Like an HF attention under SDPA: no probabilities where they belong."""

    def forward(self, tokens):
        return {"hidden": tokens, "probs": None}


class AttentionProbe(kdhooks.Term):
    path: str = "attend:probs"

    def taps(self):
        return {"probabilities": kdhooks.Tap("teacher", self.path, "attention")}

    def loss(self, ctx, probabilities):
        return probabilities.sum()


def test_an_attention_tap_that_records_nothing_is_a_config_error_at_attach():
    student, teacher = TinyModel(), TinyModel()
    teacher.attend = NoProbabilities()
    with pytest.raises(kdhooks.ConfigError, match="returned no attention probabilities"):
        kdhooks.Distiller(student, teacher, {"terms": [AttentionProbe(name="probe")]},
                          example_inputs=torch.randn(2, 7, 6))


def test_an_attention_tap_on_an_sdpa_model_switches_it_to_eager_and_names_which_model():
    pytest.importorskip("transformers")
    from _hf import tiny_bert

    teacher, student = tiny_bert(2, 32, attn="sdpa"), tiny_bert(1, 16, attn="sdpa")
    batch = {"input_ids": torch.randint(3, 40, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with kdhooks.Distiller(student, teacher, {}, example_inputs=batch) as kd:
        with pytest.warns(UserWarning, match=r"switching the teacher \(BertForSequenceClassification\) to 'eager'"):
            kd.add_tap(kdhooks.Tap("teacher", "bert.encoder.layer.0.attention.self", "attention"))
        assert teacher.config._attn_implementation == "eager" and student.config._attn_implementation == "sdpa"
        student.train()
        student(**batch)
        probabilities = kd.captures[kdhooks.Tap("teacher", "bert.encoder.layer.0.attention.self", "attention")]
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 2, 8))
    assert teacher.config._attn_implementation == "sdpa"
