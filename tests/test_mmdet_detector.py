"""DistilledDetector on one batch, outside a Runner: what loss mode returns, what it runs, what it refuses."""
import copy

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
from kdhooks.plugins.detection import soft_binary_cls_loss  # noqa: E402

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


def test_a_teacher_that_normalizes_differently_is_refused():
    cfg = distilled_config(dict(terms=[dict(kind="det_cls_kd")]))
    teacher = Config.fromfile(cfg.teacher).model
    teacher.data_preprocessor.mean = [0.0, 0.0, 0.0]
    cfg.teacher = teacher
    with pytest.warns(UserWarning), pytest.raises(kdhooks.ConfigError, match="mean"):
        MODELS.build(cfg)


def test_object_regions_need_an_anchor_head():
    cfg = distilled_config(dict(terms=[dict(kind="det_feature_imitation", region="objects")]))
    student = copy.deepcopy(cfg.student)
    student.type = "FCOS"
    student.bbox_head = dict(type="FCOSHead", num_classes=2, in_channels=32, stacked_convs=1, feat_channels=32,
                             strides=[4, 8, 16, 32])
    student.train_cfg = None
    cfg.student = student
    with pytest.warns(UserWarning), pytest.raises(kdhooks.ConfigError, match="not an anchor head"):
        MODELS.build(cfg)
    cfg.kd = dict(terms=[dict(kind="det_feature_imitation", region="all")])
    with pytest.warns(UserWarning):
        assert len(MODELS.build(cfg).distiller.connectors) == 4
