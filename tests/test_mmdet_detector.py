"""DistilledDetector on one batch, outside a Runner: what loss mode returns, what it runs, what it refuses."""
import copy
import warnings

import numpy as np
import pytest
import torch

from _mmdet import EXAMPLES, require_mmdet

require_mmdet()

from mmdet.registry import MODELS  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MessageHub  # noqa: E402

import kdhooks  # noqa: E402
import kdhooks.integrations.mmdet  # noqa: E402,F401
from kdhooks.plugins.detection import feature_imitation_loss, soft_binary_cls_loss  # noqa: E402

register_all_modules()


def distilled_config(kd):
    cfg = Config.fromfile(str(EXAMPLES / "kd_retinanet_shapes.py")).model
    cfg.teacher_ckpt = None
    cfg.kd = kd
    return cfg


def batch(model):
    data = demo_mm_inputs(2, [[3, 64, 64], [3, 64, 48]], num_items=[2, 1], num_classes=2)
    return model.data_preprocessor(data, True)


def test_loss_mode_adds_terms_to_the_students_weighted_losses_and_follows_the_iteration():
    with pytest.warns(UserWarning, match="no teacher_ckpt"):
        model = MODELS.build(distilled_config(dict(task_weight=0.5, terms=[dict(kind="det_cls_kd", weight=2.0)])))
    teacher_calls = []
    model.teacher.backbone.register_forward_hook(lambda *args: teacher_calls.append(1))
    data = batch(model)
    MessageHub.get_current_instance().update_info("iter", 7)
    model.train()
    losses = model(**data, mode="loss")
    assert model.distiller.step == 8 and len(teacher_calls) == 1

    # independently: the student's own losses and the term's formula on both heads' outputs
    student, teacher = model.student, model.teacher
    own = student.loss(data["inputs"], data["data_samples"])
    for name in ("loss_cls", "loss_bbox"):
        torch.testing.assert_close(sum(losses[name]), 0.5 * sum(own[name]))
    with torch.no_grad():
        student_scores = student.bbox_head(student.extract_feat(data["inputs"]))[0]
        teacher_scores = teacher.bbox_head(teacher.extract_feat(data["inputs"]))[0]
    expected = soft_binary_cls_loss(torch.cat([s.flatten() for s in student_scores]),
                                    torch.cat([t.flatten() for t in teacher_scores]))
    torch.testing.assert_close(losses["loss_kd_det_cls_kd"].detach(), 2.0 * expected)
    assert losses["loss_kd_det_cls_kd"].requires_grad
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    # predict and tensor are the student's; the teacher does not run outside training
    model.eval()
    teacher_calls.clear()
    with torch.no_grad():
        mine, plain = model(data["inputs"], mode="tensor"), student(data["inputs"], mode="tensor")
        predictions = model(**data, mode="predict")
    assert all(torch.equal(a, b) for a, b in zip(mine[0] + mine[1], plain[0] + plain[1]))
    assert len(predictions) == 2 and hasattr(predictions[0], "pred_instances") and not teacher_calls


def model_config(name):
    return Config.fromfile(str(EXAMPLES / name)).model


def build(student, teacher, terms, **options):
    """A DistilledDetector from example configs (or modules), without a teacher checkpoint."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*no teacher_ckpt")
        options.setdefault("example_size", (64, 64))
        return MODELS.build(dict(type="DistilledDetector", student=student, teacher=teacher,
                                 kd=dict(terms=terms), **options))


def raw_batch():
    """Two images of different widths (the second is padded), with boxes, before any preprocessing."""
    return demo_mm_inputs(2, [[3, 64, 64], [3, 64, 48]], num_items=[3, 2], num_classes=2)


def test_a_teacher_that_normalizes_differently_sees_its_own_preprocessing():
    # a caffe-style teacher (BGR, mean only) and a pytorch-style student (RGB, mean and std)
    teacher_cfg = model_config("retinanet_r18_shapes.py")
    teacher_cfg.data_preprocessor.update(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0], bgr_to_rgb=False)
    model = build(model_config("retinanet_tiny_shapes.py"), teacher_cfg, [dict(kind="det_cls_kd")])
    teacher = model.teacher
    assert model.teacher_renormalize is not None and model.teacher_renormalize.flip

    seen = {}
    teacher.backbone.register_forward_pre_hook(lambda module, args: seen.setdefault("inputs", args[0].clone()))
    teacher.bbox_head.register_forward_hook(lambda module, args, out: seen.setdefault("head", out))
    data = model.data_preprocessor(raw_batch(), True)
    model.train()
    model(**data, mode="loss")

    # the teacher on its own preprocessing of the same images: the same inputs, padding included, and outputs
    own = teacher.data_preprocessor(raw_batch(), True)["inputs"]
    assert own.shape == seen["inputs"].shape == data["inputs"].shape
    assert not torch.allclose(data["inputs"], own, atol=1.0)            # the student's inputs are not the teacher's
    torch.testing.assert_close(seen["inputs"], own, rtol=0, atol=1e-4)
    assert (seen["inputs"][1, :, :, 48:] == 0).all()                    # the padding: the teacher's pad value
    with torch.no_grad():
        expected = teacher.bbox_head(teacher.extract_feat(own))
    for got, want in zip(seen["head"][0] + seen["head"][1], expected[0] + expected[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # a teacher that preprocesses as the student does gets the student's inputs unchanged
    assert build(model_config("retinanet_tiny_shapes.py"), model_config("retinanet_r18_shapes.py"),
                 [dict(kind="det_cls_kd")]).teacher_renormalize is None


def test_a_teacher_given_as_a_module_keeps_its_weights():
    teacher = MODELS.build(model_config("retinanet_r18_shapes.py"))
    with torch.no_grad():
        teacher.bbox_head.retina_cls.bias.fill_(3.0)                    # init_weights would set -4.595
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # no "no teacher_ckpt" warning either
        model = MODELS.build(dict(type="DistilledDetector", student=model_config("retinanet_tiny_shapes.py"),
                                  teacher=teacher, kd=dict(terms=[dict(kind="det_cls_kd")]), example_size=(64, 64)))
    model.init_weights()                                               # what the Runner does before training
    assert model.teacher is teacher
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def encode_by_hand(anchors, boxes, stds):
    """DeltaXYWH deltas of ``boxes`` from ``anchors`` (means 0), written out."""
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    px, py = anchors[:, 0] + 0.5 * pw, anchors[:, 1] + 0.5 * ph
    gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gx, gy = boxes[:, 0] + 0.5 * gw, boxes[:, 1] + 0.5 * gh
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)
    return deltas / torch.tensor(stds)


def test_bounded_regression_on_a_decoded_box_head_compares_deltas_with_encoded_targets():
    """ATSS regresses deltas but assigns gt boxes in pixels (reg_decoded_bbox=True): the targets are encoded."""
    model = build(model_config("atss_tiny_shapes.py"), model_config("atss_r18_shapes.py"),
                  [dict(kind="det_bounded_reg", weight=1.0, margin=0.0)])
    student, teacher = model.student, model.teacher
    assert student.bbox_head.reg_decoded_bbox
    data = model.data_preprocessor(raw_batch(), True)
    model.train()
    losses = model(**data, mode="loss")

    # by hand: both heads' deltas, the head's own assignment (pixel boxes at positives), encoded as written above
    inputs, samples = data["inputs"], data["data_samples"]
    with torch.no_grad():
        student_reg = student.bbox_head(student.extract_feat(inputs))[1]
        teacher_reg = teacher.bbox_head(teacher.extract_feat(inputs))[1]
    head = student.bbox_head
    sizes = [r.shape[-2:] for r in student_reg]
    metas = [s.metainfo for s in samples]
    anchors, valid = head.get_anchors(sizes, metas, device=inputs.device)
    _, labels, _, boxes, weights, _ = head.get_targets(anchors, valid, [s.gt_instances for s in samples], metas)
    rows = lambda maps: torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, 4) for m in maps], dim=1)  # noqa
    all_anchors = torch.cat([torch.cat(image) if isinstance(image, list) else image for image in anchors])
    all_anchors = all_anchors.reshape(len(samples), -1, 4)
    boxes, weights = torch.cat(boxes, dim=1), torch.cat(weights, dim=1)
    positive = weights.sum(-1) > 0
    assert positive.sum() > 5
    pixels = boxes[positive]
    targets = encode_by_hand(all_anchors[positive], pixels, [0.1, 0.1, 0.2, 0.2])
    s, t = rows(student_reg)[positive], rows(teacher_reg)[positive]
    student_error, teacher_error = ((s - targets) ** 2).sum(-1), ((t - targets) ** 2).sum(-1)
    expected = torch.where(student_error > teacher_error, student_error, torch.zeros_like(student_error)).mean()
    got = losses["loss_kd_det_bounded_reg"].detach()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # like with like: the encoded targets decode (the head's own way) to the pixel boxes it compares with
    torch.testing.assert_close(head.bbox_coder.decode(all_anchors[positive], targets), pixels, rtol=0, atol=1e-3)
    # and the loss is of the order of the outputs' own errors, not of pixels (mean |pixel target| is tens)
    assert pixels.abs().mean() > 10 and targets.abs().mean() < 10 and got < 100


def test_box_terms_refuse_heads_whose_outputs_they_cannot_compare_at_build():
    terms = [dict(kind="det_bounded_reg")]
    # GFL outputs distributions over box edges: the check names ld (this was an IndexError mid-training)
    with pytest.raises(kdhooks.ConfigError, match="distribution over 9 bins.*\\n.*use `ld`"):
        build(model_config("gfl_tiny_shapes.py"), model_config("gfl_r18_shapes.py"), terms)
    # ATSS (1 anchor per location) from RetinaNet (6): the rows are different priors
    with pytest.raises(kdhooks.ConfigError, match="box outputs differ"):
        build(model_config("atss_tiny_shapes.py"), model_config("retinanet_r18_shapes.py"), terms)
    # the same layout but other deltas (RetinaNet's stds 1 against ATSS's 0.1, 0.2): not comparable either
    retina_like = model_config("atss_r18_shapes.py")
    retina_like.bbox_head.bbox_coder.target_stds = [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(kdhooks.ConfigError, match="encode boxes differently.*box coder settings"):
        build(model_config("atss_tiny_shapes.py"), retina_like, terms)
    # no hooks are left behind by a refused build: the student can be distilled again
    student = MODELS.build(model_config("atss_tiny_shapes.py"))
    with pytest.raises(kdhooks.ConfigError):
        build(student, retina_like, terms)
    assert kdhooks.attached(student) is None


def test_a_deep_copy_is_the_student_and_the_connectors_without_the_teacher():
    model = build(model_config("retinanet_tiny_shapes.py"), model_config("retinanet_r18_shapes.py"),
                  [dict(kind="det_feature_imitation", region="all")])
    copied = copy.deepcopy(model)
    assert type(copied).__name__ == "DistilledStudent" and not hasattr(copied, "teacher")
    # the same parameters and buffers under the same names in the same order (EMAHook zips them)
    assert [n for n, _ in copied.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in copied.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert any(n.startswith("distiller.connectors.") for n, _ in copied.named_parameters())
    assert set(copied.state_dict()) == set(model.state_dict()) - {"distiller._extra_state"}
    assert all(torch.equal(a, b) for a, b in zip(copied.parameters(), model.parameters()))
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(copied.parameters(), model.parameters()))
    # the copy runs as the student; the model still distills
    data = model.data_preprocessor(raw_batch(), True)
    model.eval(), copied.eval()
    with torch.no_grad():
        mine, theirs = model(data["inputs"], mode="tensor"), copied(data["inputs"], mode="tensor")
    assert all(torch.equal(a, b) for a, b in zip(mine[0] + mine[1], theirs[0] + theirs[1]))
    model.train()
    assert "loss_kd_det_feature_imitation" in model(**data, mode="loss")
    assert set(copied.train()(**data, mode="loss")) == {"loss_cls", "loss_bbox"}


def test_ld_in_mmdet_form_is_ldheads_loss():
    from mmdet.models.dense_heads import LDHead

    student_cfg = model_config("gfl_tiny_shapes.py")
    model = build(student_cfg, model_config("gfl_r18_shapes.py"),
                  [dict(kind="ld", form="mmdet", weight=0.25, temperature=10.0)])
    data = model.data_preprocessor(raw_batch(), True)
    model.train()
    losses = model(**data, mode="loss")

    # mmdet's own LDHead with the student head's weights, given the teacher's box distributions
    head_cfg = student_cfg.bbox_head.copy()
    head_cfg.update(type="LDHead", train_cfg=student_cfg.train_cfg, test_cfg=student_cfg.test_cfg,
                    loss_ld=dict(type="KnowledgeDistillationKLDivLoss", loss_weight=0.25, T=10))
    ld_head = MODELS.build(head_cfg)
    assert isinstance(ld_head, LDHead)
    ld_head.load_state_dict(model.student.bbox_head.state_dict())
    inputs, samples = data["inputs"], data["data_samples"]
    with torch.no_grad():
        student_out = ld_head(model.student.extract_feat(inputs))
        teacher_out = model.teacher.bbox_head(model.teacher.extract_feat(inputs))
        reference = ld_head.loss_by_feat(*student_out, [s.gt_instances for s in samples],
                                         [s.metainfo for s in samples], teacher_out[1])["loss_ld"]
    expected = sum(reference)
    assert expected > 0
    torch.testing.assert_close(losses["loss_kd_ld"].detach(), expected, rtol=1e-5, atol=1e-7)

    with pytest.raises(kdhooks.ConfigError, match="positive priors only"):
        build(student_cfg, model_config("gfl_r18_shapes.py"), [dict(kind="ld", form="mmdet", region="all")])


def test_feature_imitation_pairs_fpn_levels_by_stride():
    """A P2-P5 student (strides 4-32) learns P3-P5 from a P3-P6 teacher (8-64)."""
    teacher_cfg = model_config("retinanet_r18_shapes.py")
    teacher_cfg.neck.update(start_level=1, add_extra_convs="on_output", num_outs=4)
    teacher_cfg.bbox_head.anchor_generator.strides = [8, 16, 32, 64]
    model = build(model_config("retinanet_tiny_shapes.py"), teacher_cfg,
                  [dict(kind="det_feature_imitation", region="objects")])
    term = model.distiller.terms[0]
    assert term._pairs == [(1, 0), (2, 1), (3, 2)] and len(model.distiller.connectors) == 3
    data = model.data_preprocessor(raw_batch(), True)
    model.train()
    value = model(**data, mode="loss")["loss_kd_det_feature_imitation"]
    assert torch.isfinite(value) and value > 0 and value.requires_grad

    # no common stride (a P2-P3 student, the P3-P6 teacher shifted to P4-P7): a clear error at build
    student_cfg = model_config("retinanet_tiny_shapes.py")
    student_cfg.neck.update(end_level=1, num_outs=2)
    student_cfg.bbox_head.anchor_generator.strides = [4, 8]
    teacher_cfg.neck.update(start_level=2, num_outs=4)
    teacher_cfg.bbox_head.anchor_generator.strides = [16, 32, 64, 128]
    with pytest.raises(kdhooks.ConfigError, match="no student level has the stride of a teacher level"):
        build(student_cfg, teacher_cfg, [dict(kind="det_feature_imitation")], example_size=(256, 256))


def test_an_anchor_free_student_imitates_where_its_assigner_puts_positives():
    """FCOS has no anchors for Wang et al.'s mask; region: positives is the points its assigner makes positive."""
    student_cfg, teacher_cfg = model_config("fcos_tiny_shapes.py"), model_config("retinanet_r18_shapes.py")
    with pytest.raises(kdhooks.ConfigError, match="FCOSHead is not an anchor head(.|\\n)*region: positives"):
        build(student_cfg, teacher_cfg, [dict(kind="det_feature_imitation", region="objects")])
    with pytest.raises(kdhooks.ConfigError, match="det_bounded_reg.*FCOSHead is not an anchor head"):
        build(student_cfg, model_config("fcos_tiny_shapes.py"), [dict(kind="det_bounded_reg")])
    assert len(build(student_cfg, teacher_cfg, [dict(kind="det_feature_imitation", region="all")])
               .distiller.connectors) == 4

    model = build(student_cfg, teacher_cfg, [dict(kind="det_feature_imitation", region="positives")])
    data = model.data_preprocessor(raw_batch(), True)
    model.train()
    loss = model(**data, mode="loss")["loss_kd_det_feature_imitation"]

    # by hand: the points FCOS's own targets make positive, as (B, H, W) masks; each lies inside one of the boxes
    student, teacher, inputs, samples = model.student, model.teacher, data["inputs"], data["data_samples"]
    head = student.bbox_head
    with torch.no_grad():
        s_levels, t_levels = student.extract_feat(inputs), teacher.extract_feat(inputs)
    sizes = [f.shape[-2:] for f in s_levels]
    points = head.prior_generator.grid_priors(sizes, dtype=torch.float32, device=inputs.device)
    labels, _ = head.get_targets(points, [s.gt_instances for s in samples])
    masks = [((lab >= 0) & (lab < 2)).reshape(2, *size).float() for lab, size in zip(labels, sizes)]
    assert sum(m.sum() for m in masks) > 0
    for level, (mask, level_points) in enumerate(zip(masks, points)):
        for image in range(2):
            boxes = samples[image].gt_instances.bboxes
            for x, y in level_points[mask[image].flatten() > 0]:
                inside = (boxes[:, 0] < x) & (x < boxes[:, 2]) & (boxes[:, 1] < y) & (y < boxes[:, 3])
                assert inside.any(), (level, image, x, y)
    adapters = list(model.distiller.connectors.values())
    expected = feature_imitation_loss([a(f) for a, f in zip(adapters, s_levels)], list(t_levels), masks)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)


def test_a_missing_teacher_checkpoint_is_needed_only_to_train(tmp_path):
    cfg = distilled_config(dict(terms=[dict(kind="det_cls_kd")]))
    cfg.teacher_ckpt = str(tmp_path / "teacher.pth")
    with pytest.warns(UserWarning, match="is not here; the teacher is loaded from it when training starts"):
        model = MODELS.build(cfg)
    data = batch(model)
    model.eval()
    with torch.no_grad():
        assert len(model(**data, mode="predict")) == 2                 # testing runs the student alone
    model.train()
    with pytest.raises(kdhooks.ConfigError, match="teacher_ckpt.*does not exist; training needs it"):
        model(**data, mode="loss")

    # once the file is there, the first training step loads it (strictly) before the teacher runs
    weights = {k: torch.full_like(v, 0.01) if v.dtype.is_floating_point else v
               for k, v in model.teacher.state_dict().items()}
    torch.save({"state_dict": weights}, tmp_path / "teacher.pth")
    losses = model(**data, mode="loss")
    assert torch.isfinite(losses["loss_kd_det_cls_kd"])
    assert all(torch.equal(weights[k], v) for k, v in model.teacher.state_dict().items())


def test_mask_overlay_tints_the_masked_cells_of_the_image():
    from kdhooks.integrations.mmdet import mask_overlay

    image = np.full((64, 48, 3), 100, dtype=np.uint8)                  # padded to a 64 x 64 batch
    fine, coarse = torch.zeros(8, 8), torch.zeros(4, 4)                # strides 8 and 16
    fine[2, 3] = 1                                                     # rows 16-23, columns 24-31
    coarse[1, 2] = 1                                                   # rows 16-31, columns 32-47
    coarse[0, 3] = 1                                                   # columns 48-63: the padding, not drawn
    panel = mask_overlay(image, [fine, coarse], (64, 64))
    assert panel.shape == (64, 96, 3) and panel.dtype == np.uint8
    expected = np.full((64, 96, 3), 100, dtype=np.uint8)
    expected[16:24, 24:32] = [50, 50, 178]
    expected[16:32, 48 + 32:48 + 48] = [50, 50, 178]
    np.testing.assert_array_equal(panel, expected)
    boxed = mask_overlay(image, [fine], (64, 64), boxes=np.array([[4.0, 6.0, 20.0, 30.0]]))
    assert (boxed[6, 4] == [0, 255, 0]).all() and (boxed[29, 19] == [0, 255, 0]).all()
    assert (boxed[10, 10] == 100).all()
