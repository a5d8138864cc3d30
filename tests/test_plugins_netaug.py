"""Network Augmentation: weight-shared wider models built from the tiny model (plugins/netaug.py)."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from kdhooks.demo import DigitsCNN, student_cnn
from kdhooks.plugins.netaug import NetAug, WidenedModel, sample_width
from _models import batch

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hook_count(model: nn.Module) -> int:
    return sum(len(getattr(m, attr)) for m in model.modules() for attr in HOOKS)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return student_cnn()


class InvertedResidual(nn.Module):
    """A MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, and the residual."""

    def __init__(self, channels: int, expand: int):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class TinyMobile(nn.Module):
    """A stem, two inverted residuals, a grouped conv (2 groups), a grouped conv doubling its channels, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(InvertedResidual(4, 3), InvertedResidual(4, 2))
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.doubling = nn.Conv2d(4, 8, 1, groups=4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Linear(16, 10))

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.max_pool2d(self.doubling(torch.relu(self.grouped(x))), 2)
        return self.head(x)


def attach(model, **options):
    x, _ = batch(16)
    return kdhooks.Distiller(model, None, {"terms": [{"kind": "netaug", **options}]}, example_inputs=x[:2])


def weighted_parts(kd, task_loss, labels):
    ctx = kdhooks.LossContext(kd, task_loss, {"labels": labels})
    return {k: v for term in kd.terms for k, v in term.kdhooks_losses(ctx=ctx).items()}


@pytest.mark.parametrize("make", [tiny, TinyMobile])
def test_the_tiny_parameters_are_the_leading_slices_of_every_augmented_parameter(make):
    model = make()
    with attach(model) as kd:
        term = kd.terms[0]
        optimizer = torch.optim.SGD([*model.parameters(), *kd.parameters()], lr=0.1)
        x, y = batch(16)
        for _ in range(2):  # before and after an update of both
            for path, layer in term.widened.layers.items():
                extras = term.widened.parts[path.replace(".", "/")]
                for ratio in term.widths:
                    if isinstance(layer.module, nn.BatchNorm2d | nn.BatchNorm1d):
                        continue
                    weight, bias = layer.weight(extras, ratio)
                    o, i = layer.module.weight.shape[:2]
                    assert weight.shape[:2] == (layer.dims(ratio)[1], weight.shape[1])
                    assert torch.equal(weight[:o, :i], layer.module.weight), (path, ratio)
                    if bias is not None:
                        assert torch.equal(bias[:o], layer.module.bias)
            model.train()
            loss = kd(F.cross_entropy(model(x), y), labels=y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_which_dimensions_widen_hidden_channels_but_never_input_channels_or_classes():
    with attach(tiny()) as kd:
        layers = kd.terms[0].widened.layers
        assert {path: layer.dims(2.2) for path, layer in layers.items() if "fc" in path or "0" in path} == {
            "stage1.0": (1, 9), "stage2.1.0": (9, 18), "stage3.1.0": (18, 35), "fc": (35, 10)}
    with attach(TinyMobile()) as kd:
        layers = kd.terms[0].widened.layers
        # the residual stream widens as one: 4 · 2.2 → 9, rounded up to the 2-group conv's group size of 2 → 10;
        # depthwise keeps groups = channels; the doubling conv (4 groups of 1 → 2) gets 2 outputs per group
        assert layers["stem.0"].dims(2.2) == (1, 10)
        assert layers["blocks.0.project.0"].dims(2.2) == (26, 10)
        assert layers["blocks.1.project.0"].dims(2.2) == (18, 10)
        dw = layers["blocks.0.depthwise.0"]
        assert dw.dims(2.2) == (26, 26) and dw.groups(2.2) == 26
        assert layers["grouped"].dims(2.2) == (10, 10) and layers["grouped"].groups(2.2) == 5
        assert layers["stem.0"].dims(2.2)[1] == layers["blocks.1.project.0"].dims(2.2)[1]
        assert layers["doubling"].dims(2.2) == (10, 20) and layers["doubling"].groups(2.2) == 10
        assert layers["head.1"].dims(2.2) == (20 * 16, 35)  # channel-major flatten: C'·H·W inputs
        assert layers["head.4"].dims(2.2) == (35, 10)


@pytest.mark.parametrize("make", [tiny, TinyMobile])
def test_at_width_one_the_augmented_model_is_the_tiny_model(make):
    model = make()
    x, _ = batch(16)
    with attach(model) as kd:
        model.train()
        torch.testing.assert_close(kd.terms[0].augmented(x, 1.0), model(x))


def test_at_width_two_the_augmented_cnn_is_the_demo_cnn_of_twice_the_width_with_the_shared_weights():
    model = tiny()
    x, _ = batch(16)
    with attach(model, widths=[2.0]) as kd:
        term = kd.terms[0]
        wide = DigitsCNN(width=8)
        with torch.no_grad():
            for path, module in wide.named_modules():
                layer = term.widened.layers.get(path)
                if layer is None:
                    continue
                extras = term.widened.parts[path.replace(".", "/")]
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.copy_(torch.cat([layer.module.weight, extras.weight]))
                    module.bias.copy_(torch.cat([layer.module.bias, extras.bias]))
                else:
                    weight, bias = layer.weight(extras, 2.0)
                    module.weight.copy_(weight)
                    if bias is not None:
                        module.bias.copy_(bias)
        model.train()
        wide.train()
        torch.testing.assert_close(term.augmented(x, 2.0), wide(x))


def test_the_augmented_loss_sends_gradients_to_the_tiny_parameters_and_the_extra_blocks():
    model = tiny()
    x, y = batch(16)
    with attach(model, widths=[2.8]) as kd:
        model.train()
        task = F.cross_entropy(model(x), y)
        parts = weighted_parts(kd, task, y)
        tiny_params = list(model.parameters())
        grads = torch.autograd.grad(parts["netaug"], tiny_params + list(kd.parameters()))
        assert all(g.abs().sum() > 0 for g in grads[:len(tiny_params)])
        assert all(g.abs().sum() > 0 for g in grads[len(tiny_params):])
        logits = kd.terms[0].augmented(x, 2.8)
        assert parts["netaug"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        total = kd(task, labels=y)
        assert total.item() == pytest.approx(task.item() + parts["netaug"].item(), rel=1e-5)


def test_attaching_leaves_the_tiny_models_outputs_and_batchnorm_statistics_alone():
    model = tiny()
    x, _ = batch(16)
    state = copy.deepcopy(model.state_dict())
    before_train = model.train()(x)  # this forward updates the tiny model's running statistics
    before_eval = model.eval()(x)
    model.load_state_dict(state)
    with attach(model) as kd:
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the dry pass too
        torch.testing.assert_close(model.train()(x), before_train, rtol=0, atol=0)
        torch.testing.assert_close(model.eval()(x), before_eval, rtol=0, atol=0)
        model.load_state_dict(state)
        model.train()
        statistics = kd.terms[0].widened.parts["stage1/1"].running_mean.clone()
        kd.terms[0].augmented(x, 2.2)
        # the augmented forward updates its own statistics, never the tiny model's
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert not torch.equal(kd.terms[0].widened.parts["stage1/1"].running_mean, statistics)


def test_widths_are_drawn_per_step_reproducibly_and_differ_from_step_to_step():
    model = tiny()
    x, y = batch(16)
    seen = []
    with attach(model) as kd:
        model.train()
        for _ in range(10):
            kd(F.cross_entropy(model(x), y), labels=y).backward()
            seen.append(kd.terms[0].last_width)
    assert seen == [sample_width([1.0, 1.6, 2.2, 2.8], 0, step) for step in range(10)]
    assert len(set(seen)) >= 3 and any(a != b for a, b in itertools.pairwise(seen))
    assert [sample_width([1.0, 1.6, 2.2, 2.8], 1, s) for s in range(10)] != seen


def test_state_dict_round_trip_resumes_the_same_widths_losses_and_statistics():
    x, y = batch(16)

    def steps(model, kd, optimizer, n):
        values = []
        for _ in range(n):
            loss = kd(F.cross_entropy(model(x), y), labels=y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            values.append((kd.terms[0].last_width, kd.last_losses["netaug"]))
        return values

    model = tiny()
    model.train()
    kd = attach(model)
    optimizer = torch.optim.SGD([*model.parameters(), *kd.parameters()], lr=0.1)
    steps(model, kd, optimizer, 3)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(kd.state_dict()), copy.deepcopy(optimizer.state_dict()))
    assert any(k.endswith("running_mean") for k in saved[1]) and not any(k in saved[0] for k in saved[1])
    expected = steps(model, kd, optimizer, 3)
    kd.close()

    resumed = tiny()
    resumed.train()
    kd2 = attach(resumed)
    resumed.load_state_dict(saved[0])
    kd2.load_state_dict(saved[1])
    assert kd2.step == 3
    optimizer2 = torch.optim.SGD([*resumed.parameters(), *kd2.parameters()], lr=0.1)
    optimizer2.load_state_dict(saved[2])
    got = steps(resumed, kd2, optimizer2, 3)
    assert [w for w, _ in got] == [w for w, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)
    kd2.close()


def test_close_leaves_the_tiny_model_with_its_class_keys_and_no_hooks():
    model = tiny()
    keys, hooks = list(model.state_dict()), hook_count(model)
    names = [n for n, _ in model.named_parameters()]
    kd = attach(model)
    x, y = batch(16)
    model.train()
    kd(F.cross_entropy(model(x), y), labels=y).backward()
    kd.close()
    assert type(model) is DigitsCNN and list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == names and hook_count(model) == hooks
    assert kd.terms[0].widened is None


def test_weight_zero_skips_the_augmented_forward_and_a_callable_criterion_is_used():
    model = tiny()
    x, y = batch(16)
    schedule = {"schedule": "step", "milestones": [2], "values": [1.0, 0.0]}
    with attach(model, weight=schedule) as kd:
        model.train()
        for _ in range(2):  # steps 0 and 1: α = 1
            kd(F.cross_entropy(model(x), y), labels=y)
            assert kd.terms[0].last_width is not None and kd.last_losses["netaug"] > 0
        kd.terms[0].last_width = None
        for _ in range(2):  # steps 2 and 3: α = 0
            kd(F.cross_entropy(model(x), y), labels=y)
        assert kd.last_losses["netaug"] == 0.0 and kd.terms[0].last_width is None
    calls = []

    def criterion(logits, labels):
        calls.append(logits.shape)
        return F.cross_entropy(logits, labels)

    with kdhooks.Distiller(tiny(), None, {"terms": [NetAug(criterion=criterion, widths=[1.6])]}) as kd:
        student = kd.student
        student.train()
        kd(F.cross_entropy(student(x), y), labels=y)
    assert calls == [(16, 10)]


def test_the_term_needs_labels_and_valid_widths():
    model = tiny()
    x, y = batch(16)
    with attach(model) as kd, pytest.raises(ValueError, match="labels=y"):
        kd(F.cross_entropy(model(x), y))
    assert NetAug().widths == [1.0, 1.6, 2.2, 2.8]  # the paper's multipliers
    for widths in ([0.5, 2.0], [], [float("nan")]):
        with pytest.raises(kdhooks.ConfigError, match="widths"):
            attach(tiny(), widths=widths)


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x.flatten(1))))


class WithConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.fc2(self.fc1(x.flatten(1)))


@pytest.mark.parametrize("model, named", [(WithLayerNorm, "norm (LayerNorm)"), (WithConcat, "cat()"),
                                          (Branching, "Branching")])
def test_models_that_cannot_be_widened_are_refused_naming_the_module(model, named):
    with pytest.raises(kdhooks.ConfigError, match="cannot widen") as error:
        WidenedModel(model(), 2.8)
    assert named in str(error.value)
