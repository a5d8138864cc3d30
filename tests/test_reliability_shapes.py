"""No silent wrong result (#10): each built-in term checks its taps' shapes, at attach or on the first step."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from _models import TwoHeads, batch
from kdhooks.demo import DigitsCNN
from kdhooks.plugins.features import fitnets_loss
from kdhooks.plugins.logits import logits_l2_loss


def first_error(student, teacher, config, n=8, example=True, **kwargs) -> kdhooks.ConfigError:
    """The ConfigError at attach (example inputs: the dry pass) or on the first step (no example inputs)."""
    x, y = batch(n)
    with pytest.raises(kdhooks.ConfigError) as info:
        with kdhooks.Distiller(student, teacher, config, example_inputs=x if example else None, **kwargs) as kd:
            assert not example, "the dry pass should have refused the config"
            student.train()
            logits = student(x)
            kd(logits.pow(2).mean(), labels=y % logits.shape[-1])
    assert type(info.value) is kdhooks.ConfigError
    return info.value


def cnns(student_classes=10, teacher_classes=10):
    torch.manual_seed(0)
    return DigitsCNN(width=4, classes=student_classes), DigitsCNN(width=8, classes=teacher_classes)


# --- logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("example", [True, False], ids=["attach", "first-step"])
@pytest.mark.parametrize("n", [8, 1])
@pytest.mark.parametrize("kind", ["kd", "dkd", "logits_l2"])
@pytest.mark.parametrize("classes", [(10, 5), (5, 10)])
def test_logits_of_different_class_counts_are_refused(kind, n, example, classes):
    # at batch 1 a (1, 10) teacher reshaped to 5 classes would be two rows, broadcast against one
    error = first_error(*cnns(*classes), {"terms": [{"kind": kind}]}, n=n, example=example)
    assert error.location == "terms[0]"
    assert f"({n}, {classes[0]})" in error.problem and f"({n}, {classes[1]})" in error.problem
    assert "classes" in error.problem and error.fix


@pytest.mark.parametrize("example", [True, False], ids=["attach", "first-step"])
def test_logits_l2_never_broadcasts_one_column(example):
    error = first_error(*cnns(10, 1), {"terms": [{"kind": "logits_l2"}]}, example=example)
    assert error.location == "terms[0]" and "(8, 10)" in error.problem and "(8, 1)" in error.problem
    with pytest.raises(ValueError, match=r"\(8, 10\).*\(8, 1\)"):
        logits_l2_loss(torch.randn(8, 10), torch.randn(8, 1))


@pytest.mark.parametrize("kind", ["kd", "dkd", "logits_l2"])
def test_a_teacher_fed_another_batch_is_refused(kind):
    one_sample = lambda model, args, kwargs: model(args[0][:1])  # noqa: E731
    error = first_error(*cnns(), {"terms": [{"kind": kind}]}, teacher_call=one_sample)
    assert error.location == "terms[0]" and "(8, 10)" in error.problem and "(1, 10)" in error.problem


def kd_by_hand(student_logits, teacher_logits, temperature):
    """T² · mean over samples of Σ_c p_t log(p_t / p_s), p = softmax(z / T), one sample at a time."""
    total = 0.0
    for s, t in zip(student_logits.tolist(), teacher_logits.tolist()):
        p_s = torch.tensor(s, dtype=torch.float64).div(temperature).softmax(0)
        p_t = torch.tensor(t, dtype=torch.float64).div(temperature).softmax(0)
        total += float((p_t * (p_t.log() - p_s.log())).sum())
    return total / len(student_logits) * temperature**2


@pytest.mark.parametrize("n", [8, 1])
def test_a_correct_kd_config_still_gives_the_hand_computed_loss(n):
    student, teacher = cnns()
    x, y = batch(n)
    config = {"task_weight": 0, "terms": [{"kind": "kd", "temperature": 3.0},
                                          {"kind": "logits_l2", "weight": 0.5}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x) as kd:
        student.train()
        logits = student(x)
        total = kd(F.cross_entropy(logits, y), labels=y)
        losses = kd.last_losses
    with torch.no_grad():
        teacher_logits = teacher.eval()(x)
    # float32 KL is Σ p·(log p − log q) over terms of size |log p| ≈ 2: its rounding is ~1e-6 absolute, which at
    # one sample (KL ≈ 0.09) is 1.7e-5 relative; a wrong formula or temperature is off by far more
    assert losses["kd"] == pytest.approx(kd_by_hand(logits, teacher_logits, 3.0), rel=1e-5, abs=5e-6)
    squares = (logits.detach().double() - teacher_logits.double()).pow(2).mean().item()
    assert losses["logits_l2"] == pytest.approx(0.5 * squares, rel=1e-5)
    assert total.item() == pytest.approx(losses["kd"] + losses["logits_l2"], rel=1e-5)


# --- feature terms -------------------------------------------------------------------------


@pytest.mark.parametrize("example", [True, False], ids=["attach", "first-step"])
def test_at_on_vectors_is_refused(example):
    config = {"terms": [{"kind": "at", "student": ["stage2", "fc"], "teacher": ["stage2", "fc"]}]}
    error = first_error(*cnns(), config, example=example)
    assert error.location == "terms[0].student" and "'fc' gives shape (8, 10)" in error.problem
    assert "conv map (N, C, H, W)" in error.problem and "conv map" in error.fix


def test_ab_with_its_conv_connector_on_vectors_is_refused():
    error = first_error(*cnns(), {"terms": [{"kind": "ab", "student": "fc", "teacher": "fc"}]})
    assert error.location == "terms[0].student" and "(8, 16)" in error.problem and "1x1 convolution" in error.problem


def test_fsp_on_vectors_is_refused():
    config = {"terms": [{"kind": "fsp", "student": [["stage3", "fc"]], "teacher": [["stage3", "fc"]]}]}
    error = first_error(*cnns(), config)
    assert error.location == "terms[0].student"
    assert "(8, 16, 2, 2)" in error.problem and "(8, 10)" in error.problem


@pytest.mark.parametrize("kind", ["at", "mmd", "sp", "rkd", "pkt"])
def test_features_of_different_batches_are_refused(kind):
    half = lambda model, args, kwargs: model(args[0][:4])  # noqa: E731
    error = first_error(*cnns(), {"terms": [{"kind": kind, "student": "stage3", "teacher": "stage3"}]},
                        teacher_call=half)
    assert error.location == "terms[0]" and "(8, 16, 2, 2)" in error.problem and "(4, 32, 2, 2)" in error.problem


def test_fitnets_joins_widths_but_not_batches_or_kinds():
    student, teacher = cnns()
    x, y = batch(8)
    with kdhooks.Distiller(student, teacher, {"terms": [{"kind": "fitnets", "student": "stage2",
                                                         "teacher": "stage2"}]}, example_inputs=x) as kd:
        student.train()
        kd(F.cross_entropy(student(x), y))
        hint = kd.connectors["fitnets"](student.stage2(student.stage1(x)))
        with torch.no_grad():
            guided = teacher.eval().stage2(teacher.stage1(x))
        assert kd.last_losses["fitnets"] == pytest.approx((hint - guided).pow(2).mean().item(), rel=1e-5)
    half = lambda model, args, kwargs: model(args[0][:4])  # noqa: E731
    error = first_error(*cnns(), {"terms": [{"kind": "fitnets", "student": "stage2", "teacher": "stage2"}]},
                        teacher_call=half)
    assert error.location == "terms[0]" and "(8, 8, 4, 4)" in error.problem and "(4, 16, 4, 4)" in error.problem
    error = first_error(*cnns(), {"terms": [{"kind": "fitnets", "student": "stage2", "teacher": "fc"}]})
    assert error.location == "terms[0].connector" and "(8, 8, 4, 4)" in str(error) and "(8, 10)" in str(error)
    with pytest.raises(ValueError, match=r"\(8, 10\).*\(1, 10\)"):
        fitnets_loss(torch.randn(8, 10), torch.randn(1, 10))


@pytest.mark.parametrize("kind", ["ld", "det_bounded_reg"])
def test_box_terms_read_per_level_maps(kind):
    error = first_error(*cnns(), {"terms": [{"kind": kind, "student": "fc", "teacher": "fc"}]})
    assert error.location == "terms[0].student" and "(8, 10)" in error.problem and "(B, A·k, H, W)" in error.problem


def test_relations_between_samples_need_a_feature_dimension():
    class Scores(nn.Module):  # one number per sample: (N,)
        def __init__(self):
            super().__init__()
            self.net = DigitsCNN(width=4)

        def forward(self, x):
            return self.net(x).sum(1)

    torch.manual_seed(0)
    error = first_error(Scores(), Scores(), {"terms": [{"kind": "rkd", "student": "", "teacher": ""}]},
                        example=True)
    assert error.location == "terms[0].student" and "(8,)" in error.problem


def test_calls_all_on_a_term_that_reads_one_tensor_is_refused():
    """``calls: all`` gives a list of every call: a built-in term reads one tensor, so it is refused at attach."""
    torch.manual_seed(0)
    student, teacher = TwoHeads(), TwoHeads()
    config = {"terms": [{"kind": "sp", "student": "trunk", "teacher": "trunk", "calls": "all"}]}
    with pytest.raises(kdhooks.ConfigError, match="reads one tensor per tap") as error:
        kdhooks.Distiller(student, teacher, config)
    assert error.value.location == "terms[0].calls" and "calls: first" in error.value.fix
    assert kdhooks.attached(student) is None


def test_checks_pass_over_captures_that_are_not_tensors():
    """A dict, None or a string (a capture that holds no tensor) is left to the term's loss, not a crash."""
    student, teacher = cnns()
    config = {"terms": [{"kind": "kd"}, {"kind": "dkd"}, {"kind": "logits_l2"},
                        {"kind": "at", "student": "stage2", "teacher": "stage2"},
                        {"kind": "ab", "student": "stage1.2", "teacher": "stage1.2"},
                        {"kind": "fsp", "student": [["stage1", "stage2"]], "teacher": [["stage1", "stage2"]]},
                        {"kind": "fitnets", "student": "stage2", "teacher": "stage2"},
                        {"kind": "mmd", "student": "stage2", "teacher": "stage2"},
                        {"kind": "ft", "student": "stage2", "teacher": "stage2"},
                        {"kind": "rkd", "student": "fc", "teacher": "fc"},
                        {"kind": "sp", "student": "stage3", "teacher": "stage3"},
                        {"kind": "pkt", "student": "fc", "teacher": "fc"},
                        {"kind": "det_cls_kd", "student": "fc", "teacher": "fc"}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=batch(2)[0]) as kd:
        for term in kd.terms:
            for odd in (None, {"logits": (2, 10)}, [None, (2, 10)], "text"):
                term.check({name: odd for name in term._taps})


# --- real architectures, in-place activations --------------------------------------------


def test_resnet18_at_on_its_classifier_and_kd_against_another_head():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    student, teacher = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    config = {"terms": [{"kind": "at", "student": ["layer1", "layer2", "fc"], "teacher": ["layer1", "layer2", "fc"]}]}
    with pytest.raises(kdhooks.ConfigError) as error:
        kdhooks.Distiller(student, teacher, config, example_inputs=x)
    assert error.value.location == "terms[0].student" and "'fc' gives shape (2, 10)" in error.value.problem
    wide = torchvision.models.resnet18(num_classes=100)
    with pytest.raises(kdhooks.ConfigError) as error:
        kdhooks.Distiller(student, wide, {"terms": [{"kind": "kd"}]}, example_inputs=x[:1])
    assert error.value.location == "terms[0]" and "(1, 10)" in str(error.value) and "(1, 100)" in str(error.value)


def ab_step(student, teacher, config, x, y):
    torch.manual_seed(5)  # the same connector initialization for both runs
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        student.train()
        total = kd(F.cross_entropy(student(x), y), labels=y)
        total.backward()
        return kd.last_losses["ab"], [p.grad.clone() for p in student.parameters() if p.grad is not None]


def test_ab_with_clone_on_an_in_place_relu_equals_the_out_of_place_one():
    student, teacher = cnns()
    x, y = batch(8)
    config = {"task_weight": 0, "terms": [{"kind": "ab", "student": "stage1.2", "teacher": "stage1.2",
                                           "clone": True}]}
    out_of_place = ab_step(copy.deepcopy(student), copy.deepcopy(teacher), config, x, y)
    student.stage1[2], teacher.stage1[2] = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
    with pytest.raises(kdhooks.ConfigError, match="modified in place") as error:
        kdhooks.Distiller(copy.deepcopy(student), copy.deepcopy(teacher),
                          {"terms": [{"kind": "ab", "student": "stage1.2", "teacher": "stage1.2"}]},
                          example_inputs=x[:2])
    assert "clone: true" in error.value.fix
    in_place = ab_step(student, teacher, config, x, y)
    assert in_place[0] == pytest.approx(out_of_place[0], rel=1e-6) and in_place[0] > 0
    assert len(in_place[1]) == len(out_of_place[1]) > 0
    for a, b in zip(in_place[1], out_of_place[1]):
        torch.testing.assert_close(a, b)


def test_ab_with_clone_on_resnet18s_in_place_relu():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    student, teacher = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    assert student.relu.inplace
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    config = {"task_weight": 0, "terms": [{"kind": "ab", "student": "relu", "teacher": "relu", "clone": True}]}
    in_place = ab_step(copy.deepcopy(student), copy.deepcopy(teacher), config, x, y)
    student.relu.inplace = teacher.relu.inplace = False
    out_of_place = ab_step(student, teacher, config, x, y)
    assert in_place[0] == pytest.approx(out_of_place[0], rel=1e-5) and in_place[0] > 0
