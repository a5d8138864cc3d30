"""GAN compression (plugins/gan.py and the existing fitnets) on a pix2pix-style U-Net generator.

The recipe is the user's GAN loop with a Distiller adding ``recon`` (to the
teacher generator's output) and ``fitnets`` with 1x1 conv connectors (the
intermediate feature distillation); each is compared with a hand computation.
The teacher runs in eval mode unless ``teacher_call=as_trained()``, which runs
it as pix2pix does at test time without changing its state.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from kdhooks.plugins.gan import as_trained, recon_loss, running_as_trained

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class UNet(nn.Module):
    """pix2pix's U-Net generator, three levels (16x16 → 2x2): conv-BN-LeakyReLU down, deconv-BN-(dropout)-ReLU up."""

    def __init__(self, width: int, channels: int = 1, dropout: float = 0.5):
        super().__init__()
        w = width
        self.down1 = nn.Sequential(nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(0.2))
        self.down2 = nn.Sequential(nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2))
        self.down3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.ReLU())
        self.up3 = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.Dropout(dropout),
                                 nn.ReLU())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(4 * w, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU())
        self.up1 = nn.Sequential(nn.ConvTranspose2d(2 * w, channels, 4, 2, 1), nn.Tanh())

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(d1)
        u3 = self.up3(self.down3(d2))
        u2 = self.up2(torch.cat([u3, d2], 1))
        return self.up1(torch.cat([u2, d1], 1))


def generators():
    torch.manual_seed(0)
    teacher, student = UNet(16), UNet(4)  # the student has a quarter of the channels
    teacher.train(False)
    return student, teacher


def edges(n=4):
    g = torch.Generator().manual_seed(2)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1


def hook_count(model):
    return sum(len(getattr(m, attr)) for m in model.modules() for attr in HOOKS)


RECIPE = {"terms": [{"kind": "recon", "weight": 10},
                    {"kind": "fitnets", "name": "down2", "student": "down2", "teacher": "down2",
                     "connector": "conv1x1"},
                    {"kind": "fitnets", "name": "up2", "student": "up2", "teacher": "up2", "connector": "conv1x1"}]}


def test_recon_loss_is_the_mean_distance_over_every_element():
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    pairs = list(zip(student.flatten().tolist(), teacher.flatten().tolist()))
    l1 = sum(abs(s - t) for s, t in pairs) / len(pairs)
    l2 = sum((s - t) ** 2 for s, t in pairs) / len(pairs)
    huber = sum(0.5 * (s - t) ** 2 if abs(s - t) < 1 else abs(s - t) - 0.5 for s, t in pairs) / len(pairs)
    assert math.isclose(recon_loss(student, teacher).item(), l1, rel_tol=1e-5)
    assert math.isclose(recon_loss(student, teacher, "l2").item(), l2, rel_tol=1e-5)
    assert math.isclose(recon_loss(student, teacher, "smooth_l1").item(), huber, rel_tol=1e-5)
    with pytest.raises(ValueError, match="element by element"):
        recon_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8))


def test_recon_and_fitnets_on_unet_generators_match_the_hand_computation():
    student, teacher = generators()
    x = edges()
    with torch.no_grad():
        reference = copy.deepcopy(teacher).eval()
        teacher_image = reference(x)
        teacher_down2 = reference.down2(reference.down1(x))
    with kdhooks.Distiller(student, teacher, {**RECIPE, "task_weight": 0}, example_inputs=x[:2]) as kd:
        for name, (c_in, c_out) in {"down2": (8, 32), "up2": (4, 16)}.items():
            (connector,) = kd.connectors[name]  # a Sequential of one 1x1 conv (no resize: same grids)
            assert isinstance(connector, nn.Conv2d) and connector.kernel_size == (1, 1)
            assert (connector.in_channels, connector.out_channels) == (c_in, c_out)
        student.train()
        captured = {}
        handle = student.down2.register_forward_hook(lambda m, a, o: captured.update(down2=o))
        image = student(x)
        handle.remove()
        total = kd(None)
        l1 = (image.detach() - teacher_image).abs().mean().item()
        assert math.isclose(kd.last_losses["recon"], 10 * l1, rel_tol=1e-5)
        with torch.no_grad():
            regressed = kd.connectors["down2"](captured["down2"])
        assert math.isclose(kd.last_losses["down2"], ((regressed - teacher_down2) ** 2).mean().item(), rel_tol=1e-5)
        total.backward()
        assert all(p.grad is not None for p in kd.parameters())  # the 1x1 convs train with the student
        assert student.down1[0].weight.grad.abs().sum() > 0


def test_the_teacher_runs_in_eval_mode_by_default():
    student, teacher = generators()
    teacher.train()  # the user's mode: kdhooks still runs it in eval, and gives the mode back at close()
    x = edges()
    with torch.no_grad():
        expected = copy.deepcopy(teacher).eval()(x)  # no dropout, BatchNorm on its running estimates
    with kdhooks.Distiller(student, teacher, {**RECIPE, "task_weight": 0}, example_inputs=x[:2]) as kd:
        student.train()
        for _ in range(2):  # the same teacher output at each step: dropout off
            image = student(x).detach()
            kd(None)
            assert math.isclose(kd.last_losses["recon"], 10 * (image - expected).abs().mean().item(), rel_tol=1e-5)
            assert not teacher.training
    assert teacher.training and teacher.up3[2].training


def test_as_trained_runs_dropout_and_batch_statistics_and_leaves_the_teacher_as_it_was():
    _, teacher = generators()
    x = edges()
    state = copy.deepcopy(teacher.state_dict())
    with torch.no_grad():
        eval_output = teacher(x)
        with running_as_trained(teacher, dropout=False):
            batch_stats = teacher(x)
        with running_as_trained(teacher):
            first, second = teacher(x), teacher(x)
    assert not torch.allclose(first, second)  # dropout on
    # BatchNorm on the batch's statistics: what a BN in training mode computes, without updating its estimates
    trained = copy.deepcopy(teacher).train()
    trained.up3[2].p = 0.0
    with torch.no_grad():
        assert torch.allclose(trained(x), batch_stats, atol=1e-6)
    assert not torch.allclose(eval_output, batch_stats)
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())
    assert not any(m.training for m in teacher.modules())
    assert teacher.down2[1].running_mean is not None


def test_a_teacher_call_as_trained_under_the_distiller():
    student, teacher = generators()
    x = edges()
    state = copy.deepcopy(teacher.state_dict())
    with kdhooks.Distiller(student, teacher, {**RECIPE, "task_weight": 0}, example_inputs=x[:2],
                           teacher_call=as_trained()) as kd:
        student.train()
        values = []
        for _ in range(2):
            with torch.no_grad():
                student(x)
            kd(None)
            values.append(kd.last_losses["recon"])
        assert values[0] != values[1]  # the teacher's dropout draws another mask each step; the student is not updated
        assert not any(m.training for m in teacher.modules())
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())


class PatchCritic(nn.Module):
    """The user's conditional discriminator (input ⊕ image → a patch of scores)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(2, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 4, 2, 1))

    def forward(self, x, y):
        return self.layers(torch.cat([x, y], 1))


def test_the_users_gan_loop_keeps_its_discriminator_and_loss():
    student, teacher = generators()
    critic = PatchCritic()
    x = edges()
    real = torch.tanh(edges() * 3)
    teacher_state = copy.deepcopy(teacher.state_dict())
    before = hook_count(student), hook_count(teacher)
    kd = kdhooks.Distiller(student, teacher, RECIPE, example_inputs=x[:2])
    g_optimizer = torch.optim.Adam([*student.parameters(), *kd.parameters()], lr=2e-4, betas=(0.5, 0.999))
    d_optimizer = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.999))
    student.train()
    for _ in range(3):
        fake = student(x)
        d_optimizer.zero_grad()
        d_real, d_fake = critic(x, real), critic(x, fake.detach())
        d_loss = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))) / 2
        d_loss.backward()
        d_optimizer.step()
        g_optimizer.zero_grad()
        d_fake = critic(x, fake)
        gan_loss = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))  # the task loss
        loss = kd(gan_loss)
        loss.backward()
        g_optimizer.step()
        assert set(kd.last_losses) == {"task", "recon", "down2", "up2", "total"}
        assert math.isclose(kd.last_losses["task"], gan_loss.item(), rel_tol=1e-6)
    assert not {id(p) for p in critic.parameters()} & {id(p) for p in kd.parameters()}
    kd.close()
    assert (hook_count(student), hook_count(teacher)) == before
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
