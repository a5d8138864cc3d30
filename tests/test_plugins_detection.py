"""Detection terms (plugins/detection.py) against independent computations; no mmdet needed."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import kdhooks
from _detection import ToyDetector, anchors_for
from kdhooks.plugins.detection import (bounded_regression_loss, box_iou, feature_imitation_loss, imitation_mask,
                                       ld_loss, soft_binary_cls_loss, soft_cls_loss)


def iou_by_hand(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def random_boxes(n, size=32.0):
    xy = torch.rand(n, 2) * size
    return torch.cat([xy, xy + 2 + torch.rand(n, 2) * size / 2], dim=1)


def test_box_iou_matches_the_definition():
    boxes, others = random_boxes(7), random_boxes(5)
    iou = box_iou(boxes, others)
    for i in range(7):
        for j in range(5):
            assert iou[i, j].item() == pytest.approx(iou_by_hand(boxes[i].tolist(), others[j].tolist()), abs=1e-6)


def test_imitation_mask_is_wang_et_al_fine_grained_region():
    shapes = [(8, 8), (16, 8)]
    priors = [anchors_for(8, 4, shapes), anchors_for(4, 8, [(16, 16), (32, 16)])]
    gt = [torch.tensor([[2.0, 3.0, 14.0, 12.0], [18.0, 18.0, 30.0, 31.0]]), torch.zeros(0, 4)]
    masks = imitation_mask(priors, gt, [(8, 8), (4, 4)], ratio=0.5)
    # by hand: for each box, its best IoU over all priors; a location is kept if one of its priors beats half of it
    all_priors = torch.cat(priors).tolist()
    expected = [np.zeros((2, 8, 8)), np.zeros((2, 4, 4))]
    for box in gt[0].tolist():
        ious = [iou_by_hand(p, box) for p in all_priors]
        threshold = 0.5 * max(ious)
        index = 0
        for level, size in enumerate((8, 4)):
            for y in range(size):
                for x in range(size):
                    for _ in range(2):
                        if ious[index] > threshold:
                            expected[level][0, y, x] = 1
                        index += 1
    for level in range(2):
        np.testing.assert_array_equal(masks[level].numpy(), expected[level])
    assert masks[0][0].sum() > 0 and masks[0][1].sum() == 0 and masks[1][1].sum() == 0


def test_feature_imitation_loss_sums_channels_over_twice_the_mask_size():
    student = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    teacher = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    masks = [(torch.rand(2, 4, 4) > 0.5).float(), (torch.rand(2, 2, 2) > 0.5).float()]
    total, count = 0.0, 0.0
    for s, t, m in zip(student, teacher, masks):
        s, t, m = s.numpy(), t.numpy(), m.numpy()
        for b in range(2):
            for i in range(m.shape[1]):
                for j in range(m.shape[2]):
                    total += m[b, i, j] * sum((s[b, c, i, j] - t[b, c, i, j]) ** 2 for c in range(3))
                    count += m[b, i, j]
    assert feature_imitation_loss(student, teacher, masks).item() == pytest.approx(total / (2 * count), rel=1e-5)
    everywhere = sum(((s - t) ** 2).sum().item() for s, t in zip(student, teacher)) / (2 * (2 * 16 + 2 * 4))
    assert feature_imitation_loss(student, teacher).item() == pytest.approx(everywhere, rel=1e-5)


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_soft_cls_loss_is_chen_et_al_weighted_cross_entropy():
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    T, w0 = 2.0, 1.5
    p_s, p_t = softmax(student.numpy() / T), softmax(teacher.numpy() / T)
    weights = np.array([1.0, 1.0, 1.0, w0])  # background is the last class (mmdet's convention)
    expected = np.mean([-(weights * p_t[n] * np.log(p_s[n])).sum() for n in range(6)])
    assert soft_cls_loss(student, teacher, T, w0).item() == pytest.approx(expected, rel=1e-5)


def test_soft_binary_cls_loss_weights_the_background_part():
    student, teacher = torch.randn(3, 5) * 3, torch.randn(3, 5) * 3
    T, w_fg, w_bg = 2.0, 1.0, 1.5
    s = 1 / (1 + np.exp(-student.numpy() / T))
    t = 1 / (1 + np.exp(-teacher.numpy() / T))
    expected = np.mean(-(w_fg * t * np.log(s) + w_bg * (1 - t) * np.log(1 - s)))
    assert soft_binary_cls_loss(student, teacher, T, w_fg, w_bg).item() == pytest.approx(expected, rel=1e-5)


def test_bounded_regression_counts_only_where_the_student_is_not_better_than_the_teacher():
    targets = torch.zeros(4, 4)
    teacher = torch.full((4, 4), 0.5)                           # teacher error 4 · 0.25 = 1.0 on every row
    student = torch.tensor([[1.0] * 4, [0.1] * 4, [0.49] * 4, [0.45] * 4])  # errors 4.0, 0.04, 0.9604, 0.81
    assert bounded_regression_loss(student, teacher, targets).item() == pytest.approx(4.0 / 4)
    # with m = 0.1 the third row (0.9604 + 0.1 > 1) counts as well
    assert bounded_regression_loss(student, teacher, targets, margin=0.1).item() == pytest.approx((4.0 + 0.9604) / 4)
    assert bounded_regression_loss(student[:0], teacher[:0], targets[:0]).item() == 0.0


def test_ld_loss_is_tempered_kl_per_edge():
    student, teacher = torch.randn(8, 9), torch.randn(8, 9)
    T = 10.0
    p_s, p_t = softmax(student.numpy() / T), softmax(teacher.numpy() / T)
    expected = np.mean([(p_t[n] * (np.log(p_t[n]) - np.log(p_s[n]))).sum() for n in range(8)]) * T**2
    assert ld_loss(student, teacher, T).item() == pytest.approx(expected, rel=1e-4)
    assert ld_loss(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-6)


def rows(maps, values):
    return torch.cat([m.permute(0, 2, 3, 1).reshape(-1, values) for m in maps])


def run_term(term, student, teacher, x, **extras):
    with kdhooks.Distiller(student, teacher, {"terms": [term]}, example_inputs=x) as kd:
        student.train()
        out = student(x)
        with torch.no_grad():
            teacher_out = teacher(x)
        return kd(None, **extras), out, teacher_out, kd


def test_det_cls_kd_term_on_per_level_maps_sigmoid_and_softmax():
    x = torch.randn(2, 3, 32, 32)
    student, teacher = ToyDetector(4), ToyDetector(8)
    loss, out, t_out, _ = run_term({"kind": "det_cls_kd", "weight": 2.0, "temperature": 2.0}, student, teacher, x)
    expected = soft_binary_cls_loss(torch.cat([m.flatten() for m in out[0]]),
                                    torch.cat([m.flatten() for m in t_out[0]]), 2.0)
    assert loss.item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    loss, out, t_out, _ = run_term({"kind": "det_cls_kd", "activation": "softmax", "classes": 3}, student, teacher, x)
    assert loss.item() == pytest.approx(soft_cls_loss(rows(out[0], 3), rows(t_out[0], 3)).item(), rel=1e-5)
    with pytest.raises(kdhooks.ConfigError, match="classes"):
        run_term({"kind": "det_cls_kd", "activation": "softmax"}, student, teacher, x)


def test_det_bounded_reg_and_ld_read_positives_from_extras():
    x = torch.randn(2, 3, 32, 32)
    student, teacher = ToyDetector(4), ToyDetector(8)
    sizes = [64, 16]                                     # locations per image: 8·8 at stride 4, 4·4 at stride 8
    targets = [torch.randn(2, n * 2, 4) for n in sizes]
    weights = [(torch.rand(2, n * 2, 1) > 0.7).float().expand(-1, -1, 4) for n in sizes]
    loss, out, t_out, _ = run_term({"kind": "det_bounded_reg", "margin": 0.1}, student, teacher, x,
                                   reg_targets=targets, reg_weights=weights)
    positive = torch.cat([w.reshape(-1, 4) for w in weights]).sum(-1) > 0
    target_rows = torch.cat([t.reshape(-1, 4) for t in targets])
    expected = bounded_regression_loss(rows(out[1], 4)[positive], rows(t_out[1], 4)[positive],
                                       target_rows[positive], 0.1)
    assert positive.any() and loss.item() == pytest.approx(expected.item(), rel=1e-5)

    student, teacher = ToyDetector(4, priors=1, values=4 * 5), ToyDetector(8, priors=1, values=4 * 5)
    positives = [torch.rand(2, n) > 0.6 for n in sizes]
    loss, out, t_out, _ = run_term({"kind": "ld", "temperature": 10.0}, student, teacher, x, positives=positives)
    chosen = torch.cat([p.reshape(-1) for p in positives])
    expected = ld_loss(rows(out[1], 20)[chosen].reshape(-1, 5), rows(t_out[1], 20)[chosen].reshape(-1, 5), 10.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(kdhooks.LossError, match="extras have no .positives."):
        run_term({"kind": "ld"}, student, teacher, x)


def test_det_feature_imitation_adapts_each_level_and_trains_its_connectors():
    x = torch.randn(2, 3, 32, 32)
    student, teacher = ToyDetector(4), ToyDetector(8)
    priors = [anchors_for(8, 4, [(8, 8), (16, 8)]), anchors_for(4, 8, [(16, 16), (32, 16)])]
    gt = [torch.tensor([[4.0, 4.0, 14.0, 16.0]]), torch.tensor([[10.0, 12.0, 30.0, 28.0]])]
    term = {"kind": "det_feature_imitation", "weight": 0.5}
    loss, out, t_out, kd = run_term(term, student, teacher, x, priors=priors, gt_boxes=gt)
    assert len(kd.connectors) == 2 and all(isinstance(c[0], nn.Conv2d) for c in kd.connectors.values())
    adapters = list(kd.connectors.values())
    masks = imitation_mask(priors, gt, [(8, 8), (4, 4)])
    expected = feature_imitation_loss([a(f) for a, f in zip(adapters, student.neck(x))], teacher.neck(x), masks)
    assert loss.item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    loss.backward()
    assert all(c[0].weight.grad.abs().sum() > 0 for c in adapters)
    assert student.neck.convs[0].weight.grad.abs().sum() > 0
    loss, *_ = run_term({"kind": "det_feature_imitation", "region": "all", "levels": [1]}, student, teacher, x)
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_det_feature_imitation_pairs_levels_by_stride_not_by_index():
    # a P2-P4 student (strides 4, 8, 16) and a P3-P5 teacher (8, 16, 32): P3 and P4 are common
    x = torch.randn(2, 3, 64, 64)
    student, teacher = ToyDetector(4, strides=(4, 8, 16)), ToyDetector(8, strides=(8, 16, 32))
    loss, _, _, kd = run_term({"kind": "det_feature_imitation", "region": "all"}, student, teacher, x)
    term = kd.terms[0]
    assert term._pairs == [(1, 0), (2, 1)] and len(kd.connectors) == 2
    adapters = list(kd.connectors.values())
    s_levels, t_levels = student.neck(x), teacher.neck(x)
    expected = feature_imitation_loss([adapters[0](s_levels[1]), adapters[1](s_levels[2])], [t_levels[0], t_levels[1]])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # near objects: the mask of each student level (the student's priors) goes with its teacher level
    priors = [anchors_for(16, 4, [(8, 8)]), anchors_for(8, 8, [(16, 16)]), anchors_for(4, 16, [(32, 32)])]
    gt = [torch.tensor([[4.0, 4.0, 30.0, 36.0]]), torch.tensor([[20.0, 12.0, 60.0, 44.0]])]
    loss, _, _, kd = run_term({"kind": "det_feature_imitation"}, student, teacher, x, priors=priors, gt_boxes=gt)
    masks = imitation_mask(priors, gt, [(16, 16), (8, 8), (4, 4)])
    adapters = list(kd.connectors.values())
    expected = feature_imitation_loss([adapters[0](s_levels[1]), adapters[1](s_levels[2])], [t_levels[0], t_levels[1]],
                                      [masks[1], masks[2]])
    assert masks[1].sum() > 0 and loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # a student level chosen by hand must have a teacher level of its stride; no common stride at all is refused
    with pytest.raises(kdhooks.ConfigError, match="level 0 .* has no teacher level of its stride"):
        run_term({"kind": "det_feature_imitation", "region": "all", "levels": [0]}, student, teacher, x)
    with pytest.raises(kdhooks.ConfigError, match="no student level has the stride of a teacher level"):
        run_term({"kind": "det_feature_imitation", "region": "all"}, ToyDetector(4, strides=(2, 4)), teacher, x)
    # two levels of one grid on the example input: the strides cannot be told apart
    with pytest.raises(kdhooks.ConfigError, match="cannot be told apart"):
        run_term({"kind": "det_feature_imitation", "region": "all"}, ToyDetector(4, strides=(32, 64)),
                 ToyDetector(8, strides=(32, 64)), torch.randn(2, 3, 32, 32))


def test_loss_parts_are_what_kd_sums_by_name_with_their_graphs():
    x = torch.randn(2, 3, 32, 32)
    student, teacher = ToyDetector(4), ToyDetector(8)
    config = {"task_weight": 0.5, "terms": [{"kind": "det_cls_kd", "weight": 2.0},
                                            {"kind": "det_feature_imitation", "region": "all"}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x) as kd:
        student.train()
        task = student(x)[0][0].pow(2).mean()
        parts = kd.loss_parts(task)
        assert set(parts) == {"task", "det_cls_kd", "det_feature_imitation"} and kd.step == 1
        assert all(p.requires_grad for p in parts.values())
        assert parts["task"].item() == pytest.approx(0.5 * task.item())
        assert sum(parts.values()).item() == pytest.approx(kd.last_losses["total"], rel=1e-6)
        total = kd(student(x)[0][0].pow(2).mean())
        assert kd.step == 2 and total.item() == pytest.approx(kd.last_losses["total"], rel=1e-6)


def test_det_feature_imitation_on_the_heads_positives():
    """region: positives: a location counts where the head's assigner made one of its priors positive."""
    x = torch.randn(2, 3, 32, 32)
    student, teacher = ToyDetector(4), ToyDetector(8)
    positives = [torch.rand(2, 8 * 8 * 2) > 0.8, torch.rand(2, 4 * 4 * 2) > 0.8]   # 2 priors per location
    loss, _, _, kd = run_term({"kind": "det_feature_imitation", "region": "positives"}, student, teacher, x,
                              positives=positives)
    masks = [p.reshape(2, size, size, 2).any(-1).float() for p, size in zip(positives, (8, 4))]
    # by hand: the location (y, x) of row i is i // priors in row-major order
    for level, size in enumerate((8, 4)):
        for image in range(2):
            for row in positives[level][image].nonzero().flatten().tolist():
                assert masks[level][image, (row // 2) // size, (row // 2) % size] == 1
    assert masks[0].sum() < masks[0].numel()
    adapters = list(kd.connectors.values())
    expected = feature_imitation_loss([a(f) for a, f in zip(adapters, student.neck(x))], teacher.neck(x), masks)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(kdhooks.LossError, match="extras have no .positives."):
        run_term({"kind": "det_feature_imitation", "region": "positives"}, student, teacher, x)


def test_rois_terms_read_the_teachers_rows_on_the_students_proposals_from_the_extras():
    """rois: true: the student's RoI rows are tapped; the teacher's rows on the same proposals come in the extras."""
    from _detection import ToyTwoStage

    x = torch.randn(2, 3, 32, 32)
    student, teacher = ToyTwoStage(4), ToyTwoStage(8)
    rows_count = 2 * 8 * 8                                 # one RoI per level-0 location of each image
    teacher_cls, teacher_reg = torch.randn(rows_count, 3), torch.randn(rows_count, 8)
    cls_term = {"kind": "det_cls_kd", "rois": True, "student": "roi_head.bbox_head:0",
                "teacher": "roi_head.bbox_head:0", "activation": "softmax", "temperature": 2.0}
    loss, out, _, _ = run_term(cls_term, student, teacher, x,
                               teacher_rois={"roi_head.bbox_head:0": teacher_cls})
    assert loss.item() == pytest.approx(soft_cls_loss(out[1][0], teacher_cls, 2.0).item(), rel=1e-5)

    # regression: targets and weights per head; a RoI row is a proposal's 4 deltas per class (class c: 4c..4c+3)
    labels = torch.randint(0, 2, (rows_count,))
    positive = torch.rand(rows_count) > 0.7
    roi_targets, roi_weights = torch.zeros(rows_count, 2, 4), torch.zeros(rows_count, 2, 4)
    roi_targets[positive, labels[positive]] = torch.randn(int(positive.sum()), 4)
    roi_weights[positive, labels[positive]] = 1.0
    rpn_sizes = [64, 16]
    rpn_targets = [torch.randn(2, n * 3, 4) for n in rpn_sizes]
    rpn_weights = [(torch.rand(2, n * 3, 1) > 0.8).float().expand(-1, -1, 4) for n in rpn_sizes]
    extras = {"reg_targets": {"roi_head.bbox_head": roi_targets.reshape(rows_count, 8), "rpn_head": rpn_targets},
              "reg_weights": {"roi_head.bbox_head": roi_weights.reshape(rows_count, 8), "rpn_head": rpn_weights},
              "teacher_rois": {"roi_head.bbox_head:1": teacher_reg}}
    reg_term = {"kind": "det_bounded_reg", "rois": True, "student": "roi_head.bbox_head:1",
                "teacher": "roi_head.bbox_head:1", "margin": 0.1}
    loss, out, _, _ = run_term(reg_term, student, teacher, x, **extras)
    pick = lambda reg: reg.reshape(rows_count, 2, 4)[positive, labels[positive]]  # noqa: E731
    expected = bounded_regression_loss(pick(out[1][1]), pick(teacher_reg), roi_targets[positive, labels[positive]],
                                       0.1)
    assert positive.sum() > 5 and loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # the RPN's term reads the RPN's entry of the same extras, its maps and the teacher's as taps
    loss, out, t_out, _ = run_term({"kind": "det_bounded_reg", "student": "rpn_head:1", "teacher": "rpn_head:1"},
                                   student, teacher, x, **extras)
    chosen = torch.cat([w.reshape(-1, 4) for w in rpn_weights]).sum(-1) > 0
    expected = bounded_regression_loss(rows(out[0][1], 4)[chosen], rows(t_out[0][1], 4)[chosen],
                                       torch.cat([t.reshape(-1, 4) for t in rpn_targets])[chosen])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_rois_terms_refuse_what_they_cannot_pair():
    from _detection import ToyTwoStage

    x = torch.randn(2, 3, 32, 32)
    student, teacher = ToyTwoStage(4), ToyTwoStage(8)
    term = {"kind": "det_cls_kd", "rois": True, "student": "roi_head.bbox_head:0", "teacher": "roi_head.bbox_head:0",
            "activation": "softmax"}
    with pytest.raises(kdhooks.LossError, match="extras have no .teacher_rois."):
        run_term(term, student, teacher, x)
    with pytest.raises(kdhooks.LossError, match="teacher_rois hold no 'roi_head.bbox_head:0'"):
        run_term(term, student, teacher, x, teacher_rois={"roi_head.bbox_head:1": torch.zeros(128, 8)})
    with pytest.raises(kdhooks.LossError, match="RoI rows \\(128, 3\\) and the teacher's \\(100, 3\\) differ"):
        run_term(term, student, teacher, x, teacher_rois={"roi_head.bbox_head:0": torch.zeros(100, 3)})
    # rois: true on a dense head's maps, and RoI rows of each model's own proposals without it
    with pytest.raises(kdhooks.ConfigError, match="reads the RoI head's rows"):
        run_term({**term, "student": "rpn_head:0"}, student, teacher, x)
    with pytest.raises(kdhooks.ConfigError, match="\\[\\(128, 3\\)\\] and teacher \\[\\(32, 3\\)\\](.|\\n)*set rois: true"):
        run_term({"kind": "det_cls_kd", "student": "roi_head.bbox_head:0", "teacher": "roi_head.bbox_head:0"},
                 student, ToyTwoStage(8, strides=(8, 16)), x)
    # per-head extras without the term's head
    reg = {"kind": "det_bounded_reg", "student": "rpn_head:1", "teacher": "rpn_head:1"}
    with pytest.raises(kdhooks.ConfigError, match="given for the heads \\['roi_head.bbox_head'\\], not for 'rpn_head'"):
        run_term(reg, student, teacher, x, reg_targets={"roi_head.bbox_head": torch.zeros(1)},
                 reg_weights={"roi_head.bbox_head": torch.zeros(1)})
