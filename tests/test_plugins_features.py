"""mmd (neuron selectivity transfer) and ft (factor transfer) against their formulas, and FT's paraphraser phase."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from _models import batch, pair
from kdhooks.plugins.features import factor_transfer_loss, mmd_loss


class TokenNet(nn.Module):
    """Token features (N, L, D): an embedding and one block, mean-pooled into a classifier."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, 3)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens)).mean(1))


def unit(vector):
    vector = vector.detach()
    return vector / max(float(vector.norm()), 1e-12)  # a channel the ReLU switched off stays zero


def mmd_by_hand(student, teacher, kernel):
    """Huang & Wang 2017, eq. (4)-(5): each channel (or token-feature column) is a sample over positions."""
    total = 0.0
    for s, t in zip(student, teacher):
        if s.dim() == 3:  # conv map (C, H, W): channel c's responses over the H·W positions
            s_samples, t_samples = [unit(c.flatten()) for c in s], [unit(c.flatten()) for c in t]
        else:  # tokens (L, D): feature d's responses over the L tokens
            s_samples, t_samples = [unit(s[:, d]) for d in range(s.shape[1])], [unit(t[:, d]) for d in range(t.shape[1])]
        everything = s_samples + t_samples
        sigma2 = sum(float((a - b).pow(2).sum()) for i, a in enumerate(everything)
                     for j, b in enumerate(everything) if i != j) / (len(everything) * (len(everything) - 1))

        def k(a, b):
            if kernel == "linear":
                return float(a @ b)
            if kernel == "polynomial":
                return float(a @ b) ** 2
            return math.exp(-float((a - b).pow(2).sum()) / (2 * sigma2))

        def mean_kernel(first, second):
            return sum(k(a, b) for a in first for b in second) / (len(first) * len(second))

        total += mean_kernel(t_samples, t_samples) + mean_kernel(s_samples, s_samples) - 2 * mean_kernel(s_samples, t_samples)
    return total / len(student)


@pytest.mark.parametrize("kernel", ["linear", "polynomial", "gaussian"])
def test_mmd_equals_the_kernel_sums_by_hand(kernel):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    assert mmd_loss(student, teacher, kernel).item() == pytest.approx(mmd_by_hand(student, teacher, kernel), rel=1e-4)
    # a teacher map twice as large is average-pooled to the student's grid
    large = torch.randn(2, 5, 8, 8, generator=g)
    pooled = large.reshape(2, 5, 4, 2, 4, 2).mean((3, 5))
    assert mmd_loss(student, large, kernel).item() == pytest.approx(mmd_by_hand(student, pooled, kernel), rel=1e-4)
    tokens_s, tokens_t = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 7, generator=g)
    assert mmd_loss(tokens_s, tokens_t, kernel).item() == pytest.approx(mmd_by_hand(tokens_s, tokens_t, kernel), rel=1e-4)


def test_mmd_term_sums_layer_pairs_and_trains_the_student_only():
    student, teacher = pair()
    x, y = batch()
    config = {"task_weight": 0, "terms": [{"kind": "mmd", "weight": 3.0, "student": ["stage1", "stage3"],
                                           "teacher": ["stage1", "stage3"], "kernel": "gaussian"}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        student.train()
        total = kd(F.cross_entropy(student(x), y), labels=y)
    with torch.no_grad():  # the same features by hand: the student in training mode, the teacher in eval mode
        s1 = student.stage1(x)
        s3 = student.stage3(student.stage2(s1))
        teacher.eval()
        t1 = teacher.stage1(x)
        t3 = teacher.stage3(teacher.stage2(t1))
    expected = 3.0 * (mmd_by_hand(s1, t1, "gaussian") + mmd_by_hand(s3, t3, "gaussian"))
    assert total.item() == pytest.approx(expected, rel=1e-4)
    total.backward()
    assert student.stage1[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_factor_transfer_loss_is_l1_between_normalized_factors():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    expected = sum(float((unit(s.flatten()) - unit(t.flatten())).abs().sum()) for s, t in zip(student, teacher))
    assert factor_transfer_loss(student, teacher).item() == pytest.approx(expected / student.numel(), rel=1e-5)
    expected_p2 = sum(float((unit(s.flatten()) - unit(t.flatten())).pow(2).sum()) for s, t in zip(student, teacher))
    assert factor_transfer_loss(student, teacher, p=2).item() == pytest.approx(expected_p2 / student.numel(), rel=1e-5)


def parameters_of(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize("joint", [False, True])
def test_ft_trains_the_paraphraser_first_then_transfers_factors(joint):
    student, teacher = pair()
    x, y = batch(16)
    config = {"task_weight": 0, "terms": [{"kind": "ft", "student": "stage2", "teacher": "stage3",
                                           "paraphraser_steps": 6, "paraphraser_lr": 0.01, "joint": joint}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        paraphraser, translator = kd.parts.values()
        assert paraphraser.factor_channels == 16  # k = 0.5 of the teacher's 32 channels
        optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.01)
        reconstruction = []
        student.train()
        for step in range(8):
            before = parameters_of(paraphraser)
            total = kd(F.cross_entropy(student(x), y), labels=y)
            optimizer.zero_grad()
            total.backward()
            if step < 6:  # the paraphraser's own phase: nothing to transfer yet, translator kept in the graph
                assert total.item() == 0 and all(p.grad is not None for p in translator.parameters())
                reconstruction.append(float(kd.last_metrics["ft.reconstruction"]))
                assert changed(before, paraphraser)
            else:
                assert changed(before, paraphraser) == joint
                assert ("ft.reconstruction" in kd.last_metrics) == joint
                assert translator.layers[0].weight.grad.abs().sum() > 0
                assert student.stage2[1][0].weight.grad.abs().sum() > 0
            assert all(p.grad is None for p in paraphraser.parameters())  # never the user's optimizer's business
            optimizer.step()
        assert reconstruction[-1] < reconstruction[0]
        if joint:
            return  # a joint paraphraser takes a step before each factor: the check below is for a frozen one
        # the value after the phase: β · L1 between normalized factors, the teacher's from the frozen encoder
        student_feature = student.stage2(student.stage1(x))
        with torch.no_grad():
            teacher_feature = teacher.stage3(teacher.stage2(teacher.stage1(x)))
            teacher_factor = paraphraser.eval().encoder(teacher_feature)
        student_factor = translator(student_feature)
        assert student_factor.shape == teacher_factor.shape == (16, 16, 2, 2)
        expected = 500 * sum(float((unit(s.flatten()) - unit(t.flatten())).abs().sum())
                             for s, t in zip(student_factor, teacher_factor)) / student_factor.numel()
        student.train()  # the same batch statistics as above, in the student and in the translator
        total = kd(F.cross_entropy(student(x), y), labels=y)
        assert total.item() == pytest.approx(expected, rel=1e-3)


def test_ft_and_mmd_work_on_token_features():
    torch.manual_seed(0)
    student, teacher = TokenNet(6), TokenNet(12)
    tokens = torch.randn(5, 7, 4)
    labels = torch.randint(0, 3, (5,))
    config = {"terms": [{"kind": "ft", "student": "block", "teacher": "block", "paraphraser_steps": 1},
                        {"kind": "mmd", "student": "block", "teacher": "block"}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=tokens[:2]) as kd:
        student.train()
        for _ in range(2):
            total = kd(F.cross_entropy(student(tokens), labels), labels=labels)
        total.backward()
        assert kd.last_losses["ft"] > 0 and kd.last_losses["mmd"] > 0
        assert all(p.grad is not None for p in kd.parts.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["mmd", "ft", "at"])
def test_feature_pairs_that_cannot_be_compared_are_config_errors(kind):
    student, teacher = pair()
    with pytest.raises(kdhooks.ConfigError, match=r"needs conv map \(N, C, H, W\) or tokens") as error:
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": kind, "student": "stage3", "teacher": "fc"}]},
                          example_inputs=batch(2)[0])
    assert error.value.location == "terms[0].teacher"
    # token features of different lengths: no position-by-position comparison
    torch.manual_seed(0)
    student, teacher = TokenNet(6), TokenNet(12)
    with pytest.raises(kdhooks.ConfigError, match="7 tokens and the teacher's 'block' 4"):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": kind, "student": "block", "teacher": "block"}]},
                          example_inputs=torch.randn(2, 7, 4), teacher_call=lambda model, args, kwargs: model(args[0][:, ::2]))
