"""No silent wrong result (#10), faults of use: several forwards before one kd(...), selectors on a tensor, paths.

Each case asserts either the exact error class with a message that names the tap and the fix, or the value
against the same loss computed on one forward (or by hand).
"""
import copy
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import kdhooks


class Probe(kdhooks.Term):
    """Mean squared distance of a student and a teacher capture; keeps what it saw."""

    kind: ClassVar[str] = "probe"
    student: str
    teacher: str

    def taps(self):
        return {"s": kdhooks.Tap("student", self.student), "t": kdhooks.Tap("teacher", self.teacher)}

    def loss(self, ctx, s, t):
        self.seen = (s, t)
        return F.mse_loss(s, t)


def images(n, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def train_with_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Training mode with BatchNorm in eval (a detection backbone's frozen BN): a sample's output does not
    depend on the others in its batch, so two micro-batches can equal one concatenated batch exactly."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def resnet_pair():
    torch.manual_seed(0)
    student, teacher = resnet18(weights=None, num_classes=10), resnet18(weights=None, num_classes=10)
    return student, teacher, copy.deepcopy(student)


CONFIG = {"task_weight": 0.5, "terms": [{"kind": "kd", "weight": 0.5, "temperature": 4.0},
                                         {"kind": "fitnets", "student": "layer2", "teacher": "layer2"}]}


def with_probe(probe):
    return {**CONFIG, "terms": [*CONFIG["terms"], probe]}


def one_forward(student, teacher, x, y, probed=False):
    """The reference: the same config (with a probe on layer3 if ``probed``) on one forward of the whole batch."""
    probe = Probe(student="layer3", teacher="layer3")
    with kdhooks.Distiller(student, teacher, with_probe(probe) if probed else CONFIG, example_inputs=x[:2]) as kd:
        train_with_frozen_batchnorm(student)
        out = student(x)
        loss = kd(F.cross_entropy(out, y), labels=y)
        loss.backward()
    seen = probe.seen if probed else None
    return loss.detach(), dict(kd.last_losses), seen, {n: p.grad for n, p in student.named_parameters()}


# --- several student forwards before one kd(...) ---------------------------------------------


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["a-then-b", "b-then-a"])
def test_two_forwards_before_one_kd_equal_one_forward_on_the_concatenated_batch(order):
    student, teacher, reference = resnet_pair()
    (xa, ya), (xb, yb) = images(3, seed=1), images(2, seed=2)
    batches = [(xa, ya), (xb, yb)]
    first, second = batches[order[0]], batches[order[1]]
    probe = Probe(student="layer3", teacher="layer3")
    with kdhooks.Distiller(student, teacher, with_probe(probe), example_inputs=xa[:2]) as kd:
        train_with_frozen_batchnorm(student)
        out1 = student(first[0])   # each forward runs the teacher on its own inputs
        out2 = student(second[0])
        task = F.cross_entropy(torch.cat([out1, out2]), torch.cat([first[1], second[1]]))
        loss = kd(task, labels=torch.cat([first[1], second[1]]))
        loss.backward()
        parts = dict(kd.last_losses)
    x, y = torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])
    ref_loss, ref_parts, ref_seen, ref_grads = one_forward(reference, teacher, x, y, probed=True)
    # the term saw both forwards' captures, concatenated along the batch in the order of the calls
    assert probe.seen[0].shape[0] == 5 and probe.seen[1].shape[0] == 5
    torch.testing.assert_close(probe.seen[0], ref_seen[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probe.seen[1], ref_seen[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert parts == pytest.approx(ref_parts, rel=1e-5)
    assert parts["kd"] > 0 and parts["fitnets"] > 0 and parts["probe"] > 0
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eval_forwards_and_a_users_own_teacher_call_between_them_are_not_recorded():
    student, teacher, reference = resnet_pair()
    (xa, ya), (xb, yb), (xv, _) = images(3, seed=1), images(2, seed=2), images(4, seed=3)
    with kdhooks.Distiller(student, teacher, CONFIG, example_inputs=xa[:2]) as kd:
        train_with_frozen_batchnorm(student)
        out1 = student(xa)
        student.eval()
        with torch.no_grad():
            student(xv)   # an evaluation forward: the student is in eval mode, nothing is recorded
            teacher(xv)   # the user's own teacher call: recorded only when the Distiller runs it
        train_with_frozen_batchnorm(student)
        out2 = student(xb)
        loss = kd(F.cross_entropy(torch.cat([out1, out2]), torch.cat([ya, yb])), labels=torch.cat([ya, yb]))
    ref_loss, _, _, _ = one_forward(reference, teacher, torch.cat([xa, xb]), torch.cat([ya, yb]))
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)


def test_kd_after_each_forward_keeps_the_steps_apart():
    student, teacher, reference = resnet_pair()
    (xa, ya), (xb, yb) = images(3, seed=1), images(2, seed=2)
    with kdhooks.Distiller(student, teacher, CONFIG, example_inputs=xa[:2]) as kd:
        train_with_frozen_batchnorm(student)
        losses = [kd(F.cross_entropy(student(x), y), labels=y).detach() for x, y in ((xa, ya), (xb, yb))]
    for (x, y), loss in zip(((xa, ya), (xb, yb)), losses):
        torch.testing.assert_close(loss, one_forward(copy.deepcopy(reference), teacher, x, y)[0],
                                   rtol=1e-5, atol=1e-6)


def test_forwards_whose_captures_cannot_be_concatenated_are_a_loss_error():
    student, teacher, _ = resnet_pair()
    (xa, ya), (xb, yb) = images(2, size=32, seed=1), images(2, size=64, seed=2)
    with kdhooks.Distiller(student, teacher, CONFIG, example_inputs=xa) as kd:
        train_with_frozen_batchnorm(student)
        out1, out2 = student(xa), student(xb)  # layer2 is (2, 128, 4, 4), then (2, 128, 8, 8)
        with pytest.raises(kdhooks.LossError) as info:
            kd(F.cross_entropy(torch.cat([out1, out2]), torch.cat([ya, yb])), labels=torch.cat([ya, yb]))
        error = info.value
        assert error.term in ("terms[1].student", "terms[1].teacher") and error.step == 0
        assert "'layer2'" in error.problem and "cannot be concatenated along the batch" in error.problem
        assert "(2, 128, 4, 4)" in error.problem and "(2, 128, 8, 8)" in error.problem
        assert "call kd(...) after each forward" in error.fix
        # the failed step dropped its captures: the next one is a clean single forward
        loss = kd(F.cross_entropy(student(xb), yb), labels=yb)
        assert torch.isfinite(loss) and kd.step == 1


@pytest.mark.parametrize("aux_in", ["first", "last"])
def test_a_tap_recorded_in_only_some_forwards_is_a_loss_error(aux_in):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 4)
            self.aux = nn.Linear(4, 4)

        def forward(self, x, use_aux=False):
            h = self.body(x)
            return self.aux(h) if use_aux else h

    torch.manual_seed(0)
    student, teacher = Branchy(), Branchy()
    x = torch.randn(3, 6)
    with kdhooks.Distiller(student, teacher, {"terms": [Probe(student="aux", teacher="aux")]}) as kd:
        student.train()
        student(x, use_aux=aux_in == "first")
        student(x, use_aux=aux_in == "last")
        with pytest.raises(kdhooks.LossError) as info:
            kd(None)
    assert info.value.term in ("terms[0].student", "terms[0].teacher")
    assert "'aux' was recorded in only some of the 2 forwards" in info.value.problem
    assert "call kd(...) after each forward" in info.value.fix


def test_gradient_taps_with_several_forwards_are_a_loss_error():
    student, teacher, _ = resnet_pair()
    (xa, ya), (xb, yb) = images(2, seed=1), images(2, seed=2)
    with kdhooks.Distiller(student, teacher, {"terms": [{"kind": "grad_at"}]}, example_inputs=xa) as kd:
        train_with_frozen_batchnorm(student)
        out = torch.cat([student(xa), student(xb)])
        with pytest.raises(kdhooks.LossError) as info:
            kd(F.cross_entropy(out, torch.cat([ya, yb])), labels=torch.cat([ya, yb]))
    error = info.value
    assert error.term in ("terms[0].student", "terms[0].teacher")
    assert "gradient tap" in error.problem and "one forward per kd(...) call; there were 2" in error.problem
    assert "call kd(task_loss, ...) after each forward" in error.fix


# --- selectors apply to containers, never to a tensor -----------------------------------------


@pytest.mark.parametrize("example", [True, False], ids=["attach", "first-forward"])
def test_a_selector_on_a_model_returning_a_tensor_is_a_config_error(example):
    student, teacher, _ = resnet_pair()
    x, y = images(4)
    config = {"terms": [{"kind": "kd", "student": ":0"}]}
    with pytest.raises(kdhooks.ConfigError) as info:
        with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2] if example else None) as kd:
            assert not example, "the dry pass should have refused the selector"
            student.train()
            kd(F.cross_entropy(student(x), y))
    error = info.value
    assert error.value == ":0"
    assert error.location == ("terms[0].student" if example else "the student's tap ':0'")
    assert "selector '0' applies to a tuple, list, dict or ModelOutput" in str(error)
    assert "meets a tensor of shape" in str(error) and "remove ':0' from the path" in str(error)
    assert kdhooks.attached(student) is None


def test_a_selector_on_a_dict_output_picks_the_entry():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = resnet18(weights=None, num_classes=10)

        def forward(self, x):
            # 'logits' second: only the key, not a position or the first item, picks it
            return {"hidden": x.mean((2, 3)), "logits": self.net(x)}

    torch.manual_seed(0)
    student, teacher = DictOut(), DictOut()
    x, y = images(4)
    config = {"terms": [{"kind": "kd", "student": ":logits", "teacher": ":logits", "temperature": 2.0}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        student.train()
        s_logits = student(x)["logits"]
        kd(None)
    with torch.no_grad():
        t_logits = teacher.eval()(x)["logits"]
    p_t = torch.softmax(t_logits / 2, 1)
    by_hand = (p_t * (torch.log(p_t) - torch.log_softmax(s_logits / 2, 1))).sum(1).mean() * 4
    assert kd.last_losses["kd"] == pytest.approx(by_hand.item(), rel=1e-5)


# --- module paths: an exact path wins over one matched after removing wrapper segments --------


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(x)


class A(nn.Module):
    """Both ``a.b`` and ``a.module.b``: a submodule really named ``module``."""

    def __init__(self):
        super().__init__()
        self.module = Inner()
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(x) + self.module(x)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = A()

    def forward(self, x):
        return self.a(x)


class DDPLike(nn.Module):
    """A wrapper as DDP makes one: the model is its ``module``, so every path gains a ``module.`` prefix."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("wrap", [None, DDPLike, nn.DataParallel], ids=["plain", "ddp-like", "DataParallel"])
@pytest.mark.parametrize("path", ["a.b", "a.module.b", "a.module"])
def test_a_tap_records_exactly_the_module_it_names(path, wrap):
    torch.manual_seed(0)
    student, teacher = Model(), Model()
    x = torch.randn(3, 4)
    wrapped = wrap(student) if wrap else student
    probe = Probe(student=path, teacher=path)
    with kdhooks.Distiller(wrapped, teacher, {"terms": [probe]}) as kd:
        wrapped.train()
        wrapped(x)
        kd(None)
    with torch.no_grad():
        expected_s, expected_t = student.get_submodule(path)(x), teacher.eval().get_submodule(path)(x)
        # a.module returns a.module.b's output: it is told apart from a.b only
        others = [student.get_submodule(p)(x) for p in ("a.b", "a.module.b") if p != path and p != f"{path}.b"]
    torch.testing.assert_close(probe.seen[0].detach(), expected_s, rtol=0, atol=0)
    torch.testing.assert_close(probe.seen[1], expected_t, rtol=0, atol=0)
    for other in others:  # and not the module whose path only looks the same without 'module'
        assert not torch.allclose(probe.seen[0].detach(), other)


def test_a_ddp_like_wrapped_resnet_resolves_the_unwrapped_names():
    student, teacher, reference = resnet_pair()
    x, y = images(4)
    wrapped = DDPLike(student)  # paths 'module.layer2', ...; the config names 'layer2'
    with kdhooks.Distiller(wrapped, teacher, CONFIG, example_inputs=x[:2]) as kd:
        train_with_frozen_batchnorm(wrapped)
        loss = kd(F.cross_entropy(wrapped(x), y), labels=y)
    torch.testing.assert_close(loss.detach(), one_forward(reference, teacher, x, y)[0], rtol=1e-5, atol=1e-6)


def test_a_name_that_two_wrapped_modules_unwrap_to_is_refused():
    class Twins(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = Inner()
            self._orig_mod = Inner()

        def forward(self, x):
            return self.module(x) + self._orig_mod(x)

    torch.manual_seed(0)
    with pytest.raises(kdhooks.ConfigError) as info:
        kdhooks.Distiller(Twins(), Twins(), {"terms": [Probe(student="b", teacher="b")]})
    error = info.value
    assert error.location == "terms[0].student" and error.value == "b"
    assert "'module.b'" in error.problem and "'_orig_mod.b'" in error.problem
    assert "exact path" in error.fix
