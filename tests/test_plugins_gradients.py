"""grad_at against its formula and in training; every term's gradients reach the student and its connectors only."""
import copy

import pytest
import torch
import torch.nn.functional as F

import kdhooks
from _models import batch, pair
from kdhooks.plugins.gradients import grad_at_loss

RELUS = ["stage1.2", "stage2.1.2", "stage3.1.2"]
STAGES = ["stage1", "stage2", "stage3"]

EVERY_TERM = {
    "kd": {"kind": "kd"},
    "logits_l2": {"kind": "logits_l2"},
    "dkd": {"kind": "dkd"},
    "weights": {"kind": "weights", "student": "stage3.1.0.weight", "teacher": "stage3.1.0.weight"},
    "fitnets": {"kind": "fitnets", "student": "stage2", "teacher": "stage2"},
    "mmd": {"kind": "mmd", "student": STAGES, "teacher": STAGES},
    "ft": {"kind": "ft", "student": "stage3", "teacher": "stage3", "paraphraser_steps": 1},
    "grad_at": {"kind": "grad_at"},
    "at": {"kind": "at", "student": STAGES, "teacher": STAGES},
    "ab": {"kind": "ab", "student": RELUS, "teacher": RELUS},
    "fsp": {"kind": "fsp", "student": [["stage1", "stage2"]], "teacher": [["stage1", "stage2"]]},
    "rkd": {"kind": "rkd", "student": "pool", "teacher": "pool"},
    "sp": {"kind": "sp", "student": "stage3", "teacher": "stage3"},
    "pkt": {"kind": "pkt", "student": "pool", "teacher": "pool"},
}


@pytest.mark.parametrize("kind", list(EVERY_TERM))
def test_gradients_reach_student_and_connectors_never_the_teacher(kind):
    student, teacher = pair()
    x, y = batch(16)
    before = copy.deepcopy(teacher.state_dict())
    with kdhooks.Distiller(student, teacher, {"task_weight": 0, "terms": [EVERY_TERM[kind]]},
                           example_inputs=x[:2]) as kd:
        student.train()
        for _ in range(2):  # FT transfers from its second step on
            student.zero_grad()
            kd.zero_grad()
            total = kd(F.cross_entropy(student(x), y), labels=y)
            total.backward()
        assert total.item() > 0
        trained = [p for p in kd.parameters() if p.requires_grad]  # FT's paraphraser trains itself
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
        reached = [name for name, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert reached, f"{kind}: no gradient reached the student"
        assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_grad_at_is_beta_half_norm_of_normalized_gradient_difference():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    expected = 0.0
    for s, t in zip(student, teacher):
        s, t = s.flatten(), t.flatten()
        expected += float((s / s.norm() - t / t.norm()).norm())
    assert grad_at_loss(student, teacher, beta=3.0).item() == pytest.approx(1.5 * expected / 3, rel=1e-5)


def input_gradient_gap(student, teacher, x, y):
    """Mean over samples of ‖J_S/‖J_S‖ − J_T/‖J_T‖‖, by hand; the student on batch statistics as in training."""
    maps = []
    for model, training in ((student, True), (teacher, False)):
        model = copy.deepcopy(model).train(training)
        leaf = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(F.cross_entropy(model(leaf), y), leaf)
        maps.append(F.normalize(gradient.flatten(1), dim=1))
    return (maps[0] - maps[1]).norm(dim=1).mean().item()


def test_grad_at_moves_the_students_input_gradients_toward_the_teachers():
    student, teacher = pair()
    x, y = batch(64)
    teacher_optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):  # a teacher that knows something about this batch
        teacher_optimizer.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        teacher_optimizer.step()
    gaps = {}
    for beta in (0.0, 10.0):  # the same student and steps with grad_at off and on
        trained = copy.deepcopy(student)
        with kdhooks.Distiller(trained, teacher, {"terms": [{"kind": "grad_at", "beta": beta}]},
                               example_inputs=x[:2]) as kd:
            optimizer = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
            trained.train()
            for _ in range(20):
                loss = kd(F.cross_entropy(trained(x), y), labels=y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        gaps[beta] = input_gradient_gap(trained, teacher, x, y)
    start = input_gradient_gap(student, teacher, x, y)
    assert gaps[10.0] < start - 0.15  # measured: 1.41 -> 1.15
    assert gaps[10.0] < gaps[0.0] - 0.1  # the task loss alone: 1.37


def test_grad_at_of_layers_of_different_shape_is_a_config_error():
    student, teacher = pair()
    with pytest.raises(kdhooks.ConfigError, match="grad_at compares gradient maps element by element"):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "grad_at", "student": "stage2", "teacher": "stage2"}]},
                          example_inputs=batch(2)[0])
