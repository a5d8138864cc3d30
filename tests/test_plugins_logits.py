"""kd, logits_l2 and dkd (plugins/logits.py) against their published formulas, computed here by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdhooks
from _models import batch, pair
from kdhooks.plugins.logits import dkd_loss


def run_one_step(config):
    student, teacher = pair()
    x, y = batch()
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        student.train()
        logits = student(x)
        total = kd(F.cross_entropy(logits, y), labels=y)
        losses = kd.last_losses
    return student, teacher, x, y, logits, total, losses


def teacher_logits(teacher, x):
    with torch.no_grad():
        return teacher.eval()(x)


def test_logits_l2_is_the_mean_squared_logit_difference():
    student, teacher, x, y, logits, total, losses = run_one_step(
        {"task_weight": 0, "terms": [{"kind": "logits_l2", "weight": 2.0}]})
    expected = sum((s - t) ** 2 for s, t in zip(logits.flatten().tolist(), teacher_logits(teacher, x).flatten().tolist()))
    assert losses["logits_l2"] == pytest.approx(2.0 * expected / logits.numel(), rel=1e-5)


def dkd_by_hand(student_logits, teacher_logits, labels, alpha, beta, temperature):
    """Zhao et al. 2022, eq. (6)-(7), one sample at a time with explicit probabilities."""
    total = 0.0
    for s, t, label in zip(student_logits.tolist(), teacher_logits.tolist(), labels.tolist()):
        p_s = [math.exp(v / temperature) for v in s]
        p_t = [math.exp(v / temperature) for v in t]
        p_s = [v / sum(p_s) for v in p_s]
        p_t = [v / sum(p_t) for v in p_t]
        b_s, b_t = (p_s[label], 1 - p_s[label]), (p_t[label], 1 - p_t[label])
        tckd = sum(bt * math.log(bt / bs) for bt, bs in zip(b_t, b_s))
        others = [c for c in range(len(s)) if c != label]
        hat_s = [p_s[c] / (1 - p_s[label]) for c in others]
        hat_t = [p_t[c] / (1 - p_t[label]) for c in others]
        nckd = sum(ht * math.log(ht / hs) for ht, hs in zip(hat_t, hat_s))
        total += (alpha * tckd + beta * nckd) * temperature**2
    return total / len(labels)


def test_dkd_equals_target_and_non_target_kl_by_hand():
    g = torch.Generator().manual_seed(3)
    student_logits, teacher_logits_ = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    labels = torch.randint(0, 5, (6,), generator=g)
    for alpha, beta, temperature in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0)):
        expected = dkd_by_hand(student_logits, teacher_logits_, labels, alpha, beta, temperature)
        assert dkd_loss(student_logits, teacher_logits_, labels, alpha, beta, temperature).item() == pytest.approx(
            expected, rel=1e-5)
    # rows labelled -100 (padding tokens) take no part
    padded = torch.cat([labels, torch.tensor([-100])])
    extra = torch.randn(1, 5, generator=g)
    value = dkd_loss(torch.cat([student_logits, extra]), torch.cat([teacher_logits_, extra * 2]), padded)
    assert value.item() == pytest.approx(dkd_by_hand(student_logits, teacher_logits_, labels, 1, 8, 4), rel=1e-5)


def test_dkd_term_ramps_in_over_warmup_steps():
    student, teacher = pair()
    x, y = batch()
    with kdhooks.Distiller(student, teacher, {"terms": [{"kind": "dkd", "warmup": 4}]}, example_inputs=x[:2]) as kd:
        student.train()
        for step in range(6):
            logits = student(x)
            kd(F.cross_entropy(logits, y), labels=y)
            full = dkd_by_hand(logits.detach(), teacher_logits(teacher, x), y, 1.0, 8.0, 4.0)
            assert kd.last_losses["dkd"] == pytest.approx(min((step + 1) / 4, 1) * full, rel=1e-4)


def test_kd_equals_a_hand_computation():
    student, teacher = pair()
    x, y = batch()
    with kdhooks.Distiller(student, teacher, {"task_weight": 0.3, "terms": [{"kind": "kd", "weight": 0.7, "temperature": 3}]}) as kd:
        s_logits = student(x)
        total = kd(F.cross_entropy(s_logits, y), labels=y)
    with torch.no_grad():
        t_logits = teacher.eval()(x)
    T = 3.0
    p_t = torch.softmax(t_logits / T, 1)
    by_hand = (p_t * (torch.log(p_t) - torch.log_softmax(s_logits / T, 1))).sum(1).mean() * T * T
    expected = 0.3 * F.cross_entropy(s_logits, y) + 0.7 * by_hand
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    assert kd.last_losses["kd"] == pytest.approx(0.7 * by_hand.item(), rel=1e-5)
    assert kd.last_losses["total"] == pytest.approx(expected.item(), rel=1e-5)


def test_logits_l2_is_mean_squared_logits():
    student, teacher = pair()
    x, y = batch()
    with kdhooks.Distiller(student, teacher, {"terms": [{"kind": "logits_l2"}]}) as kd:
        s_logits = student(x)
        kd(None)
    assert kd.last_losses["logits_l2"] == pytest.approx(((s_logits - teacher.eval()(x)) ** 2).mean().item(), rel=1e-5)
