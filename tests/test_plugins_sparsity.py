"""ab (activation boundaries, plugins/sparsity.py) against its formula; AB's init-then-train recipe."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from _models import batch, pair
from kdhooks.plugins.sparsity import ab_loss

RELUS = ["stage1.2", "stage2.1.2", "stage3.1.2"]


def ab_by_hand(student, teacher, margin=1.0):
    total = 0.0
    for s, t in zip(student, teacher):
        for s_value, t_value in zip(s.flatten().tolist(), t.flatten().tolist()):
            if t_value > 0:
                total += max(0.0, margin - s_value) ** 2
            else:
                total += max(0.0, margin + s_value) ** 2
    return total / len(student)


def test_ab_is_the_margin_hinge_on_pre_activations():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(3, 2, 3, 3, generator=g) * 2, torch.randn(3, 2, 3, 3, generator=g)
    for margin in (1.0, 0.5):
        assert ab_loss(student, teacher, margin).item() == pytest.approx(ab_by_hand(student, teacher, margin), rel=1e-5)


def test_ab_term_connects_logs_disagreement_and_trains_student_and_connector():
    student, teacher = pair()
    x, y = batch()
    config = {"task_weight": 0, "terms": [{"kind": "ab", "student": RELUS[:2], "teacher": RELUS[:2]}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        student.train()
        total = kd(F.cross_entropy(student(x), y), labels=y)
        connectors = list(kd.connectors.values())
        teacher.eval()
        with torch.no_grad():  # pre-activations: the BatchNorm outputs before each ReLU
            s1 = student.stage1[1](student.stage1[0](x))
            t1 = teacher.stage1[1](teacher.stage1[0](x))
            s2 = student.stage2[1][1](student.stage2[1][0](student.stage2[0](student.stage1(x))))
            t2 = teacher.stage2[1][1](teacher.stage2[1][0](teacher.stage2[0](teacher.stage1(x))))
            r1, r2 = connectors[0](s1), connectors[1](s2)
    assert [type(m).__name__ for m in connectors[0]] == ["Conv2d", "BatchNorm2d"]  # the paper's 1x1 conv + BN
    assert total.item() == pytest.approx(ab_by_hand(r1, t1) + ab_by_hand(r2, t2), rel=1e-4)
    disagreement = ((r1 > 0) != (t1 > 0)).float().mean() / 2 + ((r2 > 0) != (t2 > 0)).float().mean() / 2
    assert float(kd.last_metrics["ab.disagreement"]) == pytest.approx(disagreement.item(), rel=1e-5)
    total.backward()
    assert student.stage1[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in connectors for p in m.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_ab_refuses_in_place_activations():
    student, teacher = pair()
    student.stage1[2] = nn.ReLU(inplace=True)
    with pytest.raises(kdhooks.ConfigError, match="modified in place") as error:
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "ab", "student": "stage1.2", "teacher": "stage1.2"}]},
                          example_inputs=batch(2)[0])
    assert error.value.location == "terms[0].student"


def test_ab_initialization_then_training_with_schedules():
    """The paper's recipe: AB alone for the first steps (task weight 0), then the task loss alone."""
    student, teacher = pair()
    x, y = batch(32)
    switch = 8
    config = {
        "task_weight": {"schedule": "step", "milestones": [switch], "values": [0.0, 1.0]},
        "terms": [{"kind": "ab", "student": RELUS, "teacher": RELUS,
                   "weight": {"schedule": "step", "milestones": [switch], "values": [1e-3, 0.0]}}],
    }
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.05, momentum=0.9)
        disagreement = []
        student.train()
        for step in range(12):
            task_loss = F.cross_entropy(student(x), y)
            total = kd(task_loss, labels=y)
            if step < switch:
                assert kd.last_losses["task"] == 0 and total.item() == pytest.approx(kd.last_losses["ab"], rel=1e-6)
                disagreement.append(float(kd.last_metrics["ab.disagreement"]))
            else:  # AB switched off but its connectors kept in the graph (DDP): total = task loss
                assert kd.last_losses["ab"] == 0 and total.item() == pytest.approx(task_loss.item(), rel=1e-6)
            optimizer.zero_grad()
            total.backward()
            if step >= switch:
                assert all(p.grad is not None for p in kd.connectors.parameters())
            optimizer.step()
    # the student learns the teacher's activation boundaries
    assert disagreement[-1] < disagreement[0] - 0.05
