"""Segmentation terms (plugins/segmentation.py) against hand computations, on torchvision segmentation models.

Each formula is re-stated pixel by pixel (or pair by pair, channel by channel)
and compared with the plugin's function on hand-made maps, then with what the
Distiller returns on real torchvision models (random init, 32x32 inputs, dict
outputs read with ``:out`` / ``:aux``). The adversarial term's critic is
checked to train (its loss moves, its update is the WGAN-GP Adam step written
out here), to be in ``kd.state_dict()`` and resumed from it, and never to be
held, given a gradient or stepped by the user's optimizer.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import kdhooks
from _segmentation import CLASSES, mobile_pair, resnet_teacher, seg_batch
from kdhooks.plugins.segmentation import (MapDiscriminator, TrainedApart, cwd_loss, gradient_penalty, pairwise_loss,
                                          pixel_kd_loss)

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hook_count(model):
    return sum(len(getattr(m, attr)) for m in model.modules() for attr in HOOKS)


# --- the formulas, written out -------------------------------------------------------------


def pixel_kd_by_hand(student, teacher, temperature, labels=None, ignore_index=255):
    """Σ_c p_T (log p_T − log p_S) at each kept pixel, T², mean over kept pixels."""
    total, count = 0.0, 0
    n, c, h, w = teacher.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if labels is not None and int(labels[i, y, x]) == ignore_index:
                    continue
                p_t = [math.exp(float(teacher[i, k, y, x]) / temperature) for k in range(c)]
                p_s = [math.exp(float(student[i, k, y, x]) / temperature) for k in range(c)]
                z_t, z_s = sum(p_t), sum(p_s)
                total += sum(pt / z_t * (math.log(pt / z_t) - math.log(ps / z_s)) for pt, ps in zip(p_t, p_s))
                count += 1
    return total / count * temperature**2


def test_pixel_kd_is_the_per_pixel_kl_averaged_over_kept_pixels():
    student, teacher = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 3, 5))
    labels[0, 1] = 255
    for temperature in (1.0, 3.0):
        assert math.isclose(pixel_kd_loss(student, teacher, temperature).item(),
                            pixel_kd_by_hand(student, teacher, temperature), rel_tol=1e-5)
        assert math.isclose(pixel_kd_loss(student, teacher, temperature, labels).item(),
                            pixel_kd_by_hand(student, teacher, temperature, labels), rel_tol=1e-5)
    assert pixel_kd_loss(teacher, teacher).abs().item() < 1e-6


def test_pixel_kd_resizes_the_students_map_and_the_labels_to_the_teachers():
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)
    labels = torch.randint(0, 3, (2, 16, 16))
    labels[:, :4] = 255  # the top quarter: rows 0-1 of the 8x8 maps
    upsampled = F.interpolate(student, size=(8, 8), mode="bilinear", align_corners=False)
    nearest = labels[:, ::2, ::2]
    assert math.isclose(pixel_kd_loss(student, teacher, 2.0, labels).item(),
                        pixel_kd_by_hand(upsampled, teacher, 2.0, nearest), rel_tol=1e-5)


def test_pixel_kd_refuses_labels_that_are_not_masks():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pixel_kd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), labels=torch.tensor([0, 1]))


def pairwise_by_hand(student, teacher, nodes):
    """SKD: max-pool to the node grid, a_ij = f_i·f_j / (|f_i| |f_j|), mean of (a^S − a^T)² over pairs and samples."""
    def graph(feature):
        pooled = F.adaptive_max_pool2d(feature, (nodes, nodes))  # patches of map/nodes: exact for divisible sizes
        vectors = [pooled[:, :, y, x] for y in range(nodes) for x in range(nodes)]
        return [[F.cosine_similarity(a, b, dim=1, eps=1e-8) for b in vectors] for a in vectors]
    a_s, a_t = graph(student), graph(teacher)
    squares = [(a_s[i][j] - a_t[i][j]).pow(2) for i in range(len(a_s)) for j in range(len(a_s))]
    return float(torch.stack(squares).mean())


def test_pairwise_is_the_squared_difference_of_cosine_affinities_between_nodes():
    student, teacher = torch.randn(2, 5, 8, 8), torch.randn(2, 7, 8, 8)  # widths may differ
    for nodes in (2, 4):
        assert math.isclose(pairwise_loss(student, teacher, nodes).item(), pairwise_by_hand(student, teacher, nodes),
                            rel_tol=1e-5)
    # SKD's patch pooling: patches of half the map (pool_scale 0.5) are the 2x2 grid
    patches = F.max_pool2d(student, kernel_size=4, stride=4, ceil_mode=True)
    assert torch.equal(patches, F.adaptive_max_pool2d(student, (2, 2)))
    assert pairwise_loss(teacher, teacher, 4).item() < 1e-10


def cwd_by_hand(student, teacher, temperature):
    """Shu et al. 2021: per (sample, channel), KL between softmaxes over positions, mean over N·C, times T²."""
    n, c = teacher.shape[:2]
    total = 0.0
    for i in range(n):
        for k in range(c):
            p_t = F.softmax(teacher[i, k].flatten() / temperature, 0)
            p_s = F.softmax(student[i, k].flatten() / temperature, 0)
            total += float((p_t * (p_t.log() - p_s.log())).sum())
    return total / (n * c) * temperature**2


def test_cwd_is_the_channel_wise_kl_over_positions():
    student, teacher = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    for temperature in (1.0, 4.0):
        assert math.isclose(cwd_loss(student, teacher, temperature).item(), cwd_by_hand(student, teacher, temperature),
                            rel_tol=1e-5)
    with pytest.raises(ValueError, match="channel by channel"):
        cwd_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))


def test_gradient_penalty_is_the_squared_distance_of_the_gradient_norm_to_one():
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    torch.manual_seed(5)
    penalty = gradient_penalty(lambda x: critic(x)[:, 0], real, fake)
    # a linear critic: the gradient is its weight everywhere
    expected = (critic[1].weight.norm() - 1).pow(2)
    assert torch.allclose(penalty, expected, rtol=1e-5)


# --- on torchvision models -----------------------------------------------------------------


def hand_outputs(student, teacher, x):
    """The models' outputs as kdhooks sees them: the teacher in eval under no_grad, the student training."""
    with torch.no_grad():
        teacher_out = copy.deepcopy(teacher).eval()(x)
    return teacher_out


def test_pixel_kd_and_cwd_on_torchvision_models_match_the_formulas_on_out_and_aux():
    student, teacher = mobile_pair()
    x, y = seg_batch()
    config = {"task_weight": 0, "terms": [
        {"kind": "seg_pixel_kd", "name": "pixel", "temperature": 2.0},
        {"kind": "seg_pixel_kd", "name": "pixel_aux", "teacher": ":aux"},
        {"kind": "cwd", "name": "cwd", "temperature": 4.0}]}
    expected_teacher = hand_outputs(student, teacher, x)
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        student.train()
        out = student(x)
        total = kd(F.cross_entropy(out["out"], y, ignore_index=255), labels=y)
        losses = kd.last_losses
        assert set(out) == {"out"} and out["out"].shape == (4, CLASSES, 32, 32)
        s = out["out"].detach()
        assert math.isclose(losses["pixel"], pixel_kd_by_hand(s, expected_teacher["out"], 2.0, y), rel_tol=1e-4)
        assert math.isclose(losses["pixel_aux"], pixel_kd_by_hand(s, expected_teacher["aux"], 1.0, y), rel_tol=1e-4)
        assert math.isclose(losses["cwd"], cwd_by_hand(s, expected_teacher["out"], 4.0), rel_tol=1e-4)
        assert isinstance(kd.connectors["cwd"], torch.nn.Identity)  # same classes: no connector parameters
        total.backward()
        assert student.classifier.high_classifier.weight.grad.abs().sum() > 0


def test_pairwise_and_cwd_on_backbone_features_of_a_resnet50_teacher():
    student, _ = mobile_pair()
    teacher = resnet_teacher()
    x, _ = seg_batch(n=2, size=64)
    config = {"task_weight": 0, "terms": [
        {"kind": "seg_pairwise", "student": "backbone:high", "teacher": "backbone:out", "nodes": 2},
        {"kind": "cwd", "name": "cwd_features", "student": "backbone:high", "teacher": "backbone:out"}]}
    with torch.no_grad():
        teacher_feature = copy.deepcopy(teacher).eval().backbone(x)["out"]
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        connector = kd.connectors["cwd_features"]
        assert isinstance(connector[0], torch.nn.Conv2d) and connector[0].in_channels == 960 \
            and connector[0].out_channels == 2048  # 960 student channels to the teacher's 2048
        student.train()
        features = {}
        handle = student.backbone.register_forward_hook(lambda m, a, o: features.update(o))
        student(x)
        handle.remove()
        kd(None)
        high = features["high"].detach()
        # LR-ASPP's high features are at stride 16, DeepLabV3-ResNet50's at stride 8
        assert high.shape[-2:] == (4, 4) and teacher_feature.shape[-2:] == (8, 8)
        assert math.isclose(kd.last_losses["seg_pairwise"], pairwise_by_hand(high, teacher_feature, 2), rel_tol=1e-4)
        with torch.no_grad():
            joined = connector(F.interpolate(high, size=(8, 8), mode="bilinear", align_corners=False))
        assert math.isclose(kd.last_losses["cwd_features"], cwd_by_hand(joined, teacher_feature, 4.0), rel_tol=1e-4)


def test_a_student_map_of_another_size_is_resized_to_the_teachers():
    student, teacher = mobile_pair()
    x, y = seg_batch(n=2)
    config = {"task_weight": 0, "terms": [{"kind": "seg_pixel_kd", "student": "classifier"}]}  # LR-ASPP at 1/8
    teacher_out = hand_outputs(student, teacher, x)["out"]
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        student.train()
        captured = {}
        handle = student.classifier.register_forward_hook(lambda m, a, o: captured.update(map=o))
        student(x)
        handle.remove()
        kd(None, labels=y)
        small = captured["map"].detach()
        assert small.shape[-2:] == (4, 4)
        upsampled = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
        assert math.isclose(kd.last_losses["seg_pixel_kd"], pixel_kd_by_hand(upsampled, teacher_out, 1.0, y),
                            rel_tol=1e-4)


def test_options_and_shapes_are_checked_at_attach():
    student, teacher = mobile_pair()
    x, _ = seg_batch(n=2)
    with pytest.raises(kdhooks.ConfigError, match="temperature"):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "seg_pixel_kd", "temperature": 0}]}, example_inputs=x)
    with pytest.raises(kdhooks.ConfigError, match="channels"):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "seg_pixel_kd", "teacher": "backbone:out"}]},
                          example_inputs=x)
    with pytest.raises(kdhooks.ConfigError, match="halves the map 6 times"):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "seg_adversarial", "depth": 6}]}, example_inputs=x)
    with pytest.raises(kdhooks.ConfigError, match="needs the option 'student'"):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "seg_pairwise"}]}, example_inputs=x)
    assert kdhooks.attached(student) is None


# --- the adversarial term: its critic ------------------------------------------------------


def adversarial(student, teacher, x, **options):
    config = {"task_weight": 1, "terms": [{"kind": "seg_adversarial", "depth": 2, "width": 16, **options}]}
    return kdhooks.Distiller(student, teacher, config, example_inputs=x[:2])


def critic_of(kd):
    return kd.parts["seg_adversarial"]


def test_the_critic_update_is_one_wgan_gp_adam_step_and_the_term_is_its_wasserstein_estimate():
    student, teacher = mobile_pair()
    x, y = seg_batch()
    teacher_out = hand_outputs(student, teacher, x)["out"]
    with adversarial(student, teacher, x, discriminator_lr=1e-3) as kd:
        part = critic_of(kd)
        assert isinstance(part, TrainedApart) and isinstance(part.module, MapDiscriminator)
        by_hand = copy.deepcopy(part.module).requires_grad_(True)
        optimizer = torch.optim.Adam(by_hand.parameters(), lr=1e-3, betas=(0.5, 0.9))
        student.train()
        out = student(x)
        torch.manual_seed(11)
        kd(F.cross_entropy(out["out"], y, ignore_index=255))
        # the same step, written out: critic inputs are tanh(map) ⊕ image
        real = torch.cat([torch.tanh(teacher_out), x], 1)
        fake = torch.cat([torch.tanh(out["out"].detach()), x], 1)
        torch.manual_seed(11)
        by_hand.train()  # each call in training mode advances spectral norm's power iteration: the same order
        distance = by_hand(real).mean() - by_hand(fake).mean()
        alpha = torch.rand(4, 1, 1, 1)
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(by_hand(mixed).sum(), mixed, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
        critic_loss = -distance + 10 * penalty
        optimizer.zero_grad()
        critic_loss.backward()
        optimizer.step()
        for (name, p), q in zip(part.module.named_parameters(), by_hand.parameters()):
            assert torch.allclose(p, q, atol=1e-6), name
        assert math.isclose(float(kd.last_metrics["seg_adversarial.discriminator"]), critic_loss.item(), rel_tol=1e-4)
        by_hand.eval()
        with torch.no_grad():
            estimate = by_hand(real).mean() - by_hand(fake).mean()
        assert math.isclose(kd.last_losses["seg_adversarial"], estimate.item(), rel_tol=1e-4, abs_tol=1e-6)


def test_the_critic_trains_and_the_user_optimizer_never_holds_or_steps_it():
    student, teacher = mobile_pair()
    x, y = seg_batch()
    with adversarial(student, teacher, x, discriminator_lr=1e-3) as kd:
        part = critic_of(kd)
        critic_params = list(part.module.parameters())
        assert critic_params and not list(kd.parameters())  # the critic is not among kd.parameters()
        optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.01, momentum=0.9,
                                    weight_decay=1e-4)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert not held & {id(p) for p in critic_params}
        critic_losses = []
        student.train()
        for _ in range(12):
            optimizer.zero_grad()
            out = student(x)
            loss = kd(F.cross_entropy(out["out"], y, ignore_index=255))
            critic_losses.append(float(kd.last_metrics["seg_adversarial.discriminator"]))
            loss.backward()
            assert all(p.grad is None and not p.requires_grad for p in critic_params)  # no gradient from the student
            before = [p.detach().clone() for p in critic_params]
            optimizer.step()
            assert all(torch.equal(b, p) for b, p in zip(before, critic_params))  # the user's step leaves it alone
        # the critic's loss moves down: it learns to tell the teacher's maps from the student's
        assert critic_losses[-1] < critic_losses[0] - 0.5, critic_losses
        assert int(part.optimizer.state[critic_params[0]]["step"]) == 12  # one update per kd(...), by its own Adam


def test_the_critic_and_its_adam_state_are_saved_and_resumed():
    student, teacher = mobile_pair()
    x, y = seg_batch()
    with adversarial(student, teacher, x) as kd:
        student.train()
        for _ in range(3):
            kd(F.cross_entropy(student(x)["out"], y, ignore_index=255)).backward()
            student.zero_grad()
        state = kd.state_dict()
        critic_keys = [k for k in state if k.startswith("parts.seg_adversarial.")]
        assert "parts.seg_adversarial.module.layers.0.parametrizations.weight.original" in critic_keys
        assert "parts.seg_adversarial.module.layers.0.parametrizations.weight.0._u" in critic_keys
        assert "parts.seg_adversarial.optimizer.layers.0.parametrizations.weight.original.exp_avg" in critic_keys
        saved = copy.deepcopy(state)
        student_state = copy.deepcopy(student.state_dict())
    fresh_student, fresh_teacher = mobile_pair()
    fresh_student.load_state_dict(student_state)
    with adversarial(fresh_student, fresh_teacher, x) as fresh:
        assert list(fresh.state_dict()) == list(saved)
        fresh.load_state_dict(saved)  # strict
        assert fresh.step == 3
        loaded = fresh.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in saved.items())
        part = critic_of(fresh)
        assert int(part.optimizer.state[next(part.module.parameters())]["step"]) == 3
        bad = dict(saved)
        bad["parts.seg_adversarial.module.unknown"] = torch.zeros(1)
        with pytest.raises(RuntimeError, match="Unexpected key"):
            fresh.load_state_dict(bad)
        del bad["parts.seg_adversarial.module.unknown"], bad["parts.seg_adversarial.module.layers.0.bias"]
        with pytest.raises(RuntimeError, match="Missing key"):
            fresh.load_state_dict(bad)


def test_the_critic_moves_with_the_distiller():
    part = TrainedApart(MapDiscriminator(5, 4, 1), lr=1e-3, betas=(0.5, 0.9))
    part.to(torch.float64)
    p = next(part.module.parameters())
    assert p.dtype == torch.float64 and part.optimizer.state[p]["exp_avg"].dtype == torch.float64
    assert part.module(torch.randn(2, 5, 4, 4, dtype=torch.float64)).shape == (2,)


def test_close_leaves_no_hooks_and_gives_the_models_back():
    student, teacher = mobile_pair()
    x, y = seg_batch(n=2)
    before = hook_count(student), hook_count(teacher)
    config = {"terms": [{"kind": "seg_pixel_kd"}, {"kind": "cwd"}, {"kind": "seg_adversarial", "depth": 2},
                        {"kind": "seg_pairwise", "student": "backbone:high", "teacher": "backbone:out"}]}
    kd = kdhooks.Distiller(student, teacher, config, example_inputs=x)
    assert hook_count(student) > before[0] and hook_count(teacher) > before[1]
    student.train()
    kd(F.cross_entropy(student(x)["out"], y, ignore_index=255), labels=y).backward()
    kd.close()
    assert (hook_count(student), hook_count(teacher)) == before
    assert all(p.requires_grad for p in teacher.parameters())
