"""Two-stage detectors in a real mmengine Runner on CPU, on generated COCO-format shapes.

A ResNet-18 Faster R-CNN teacher is trained briefly once for the module; a
quarter-width Faster R-CNN learns from it on both stages (Chen et al. 2017,
Wang et al. 2019), and a quarter-width RetinaNet imitates its FPN.
"""

import numpy as np
import pytest
import torch

from _mmdet import kd_config, logged, require_mmdet, shapes_module, train, trained_teacher, two_process_ddp

require_mmdet()

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from kdhooks.cli import main as kdhooks_main  # noqa: E402

pytestmark = pytest.mark.slow
TERMS = ("rpn_cls_kd", "roi_cls_kd", "rpn_bounded_reg", "roi_bounded_reg", "det_feature_imitation")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_module().make_shapes(tmp_path_factory.mktemp("shapes"), train=32, val=8)


@pytest.fixture(scope="module")
def faster_rcnn_teacher(shapes, tmp_path_factory):
    return trained_teacher("faster_rcnn_r18_shapes.py", tmp_path_factory.mktemp("faster_rcnn_teacher"), shapes)


def test_faster_rcnn_student_distilled_on_both_stages_resumed_exported_and_evaluated(shapes, faster_rcnn_teacher,
                                                                                      tmp_path):
    cfg = kd_config("kd_faster_rcnn_shapes.py", faster_rcnn_teacher, tmp_path / "kd", shapes, iters=4,
                    checkpoint_every=2)
    cfg.custom_hooks = [dict(type="ImitationMaskHook", interval=4, images=1)]
    runner = train(cfg)
    model = runner.model

    # the student's own losses of both stages and each term, every iteration
    for name in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"):
        assert len(logged(runner, name)) == 4, name
    for term in TERMS:
        values = logged(runner, f"loss_kd_{term}")
        assert len(values) == 4 and np.isfinite(values).all() and (values >= 0).all(), term
    for term in ("rpn_cls_kd", "roi_cls_kd", "det_feature_imitation"):
        assert (logged(runner, f"loss_kd_{term}") > 0).all(), term
    # the bounded terms count where the student is worse than the teacher: some such positives in 4 iterations
    assert logged(runner, "loss_kd_rpn_bounded_reg").max() > 0 and logged(runner, "loss_kd_roi_bounded_reg").max() > 0

    # the teacher is its checkpoint, unchanged, in eval mode; its RoI head ran on the student's proposals only
    saved = torch.load(faster_rcnn_teacher, map_location="cpu", weights_only=True)["state_dict"]
    teacher = model.teacher.state_dict()
    assert set(saved) == set(teacher) and all(torch.equal(saved[k], teacher[k]) for k in saved)
    assert not model.teacher.training and model._teacher_call.features is None

    # the checkpoint: student and one 1x1 connector per FPN level, no teacher; the RPN-anchor masks were saved
    state = torch.load(tmp_path / "kd" / "iter_4.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert len([k for k in state if k.startswith("distiller.connectors.")]) == 8
    assert not any(k.startswith("teacher") for k in state) and int(state["distiller._extra_state"]) == 4
    assert len(list((tmp_path / "kd" / "kd_masks").glob("iter_000004_det_feature_imitation_0.png"))) == 1

    # resume for two more iterations
    cfg = kd_config("kd_faster_rcnn_shapes.py", faster_rcnn_teacher, tmp_path / "kd", shapes, iters=6,
                    checkpoint_every=2)
    cfg.resume = True
    resumed = train(cfg)
    assert (resumed.iter, resumed.model.distiller.step) == (6, 6)
    assert len(logged(resumed, "loss_kd_roi_cls_kd")) == 6

    # export: plain mmdet loads the Faster R-CNN student alone and CocoMetric scores it
    kd_file = tmp_path / "kd_config.py"
    cfg.dump(str(kd_file))
    assert kdhooks_main(["mmdet", "export", str(tmp_path / "kd" / "iter_6.pth"), str(tmp_path / "student.pth"),
                         "--config", str(kd_file)]) == 0
    student_cfg = Config.fromfile(str(tmp_path / "student.py"))
    assert student_cfg.model.type == "FasterRCNN" and "teacher" not in (tmp_path / "student.py").read_text()
    student_cfg.work_dir = str(tmp_path / "test")
    student_cfg.model.test_cfg.rcnn.score_thr = 0.0
    tester = Runner.from_cfg(student_cfg)
    metrics = tester.test()
    assert 0.0 <= metrics["coco/bbox_mAP"] <= 1.0
    plain, distilled = tester.model.state_dict(), resumed.model.student.state_dict()
    assert set(plain) == set(distilled) and all(torch.equal(plain[k], distilled[k]) for k in plain)


def test_retinanet_student_imitates_a_faster_rcnn_teacher(shapes, faster_rcnn_teacher, tmp_path):
    runner = train(kd_config("kd_retinanet_from_faster_rcnn_shapes.py", faster_rcnn_teacher, tmp_path / "r", shapes,
                             iters=3))
    imitation = logged(runner, "loss_kd_det_feature_imitation")
    assert len(imitation) == 3 and np.isfinite(imitation).all() and (imitation > 0).all()
    assert {"loss_cls", "loss_bbox"} <= {k.removeprefix("train/") for k in runner.message_hub.log_scalars}
    assert len(runner.model.distiller.connectors) == 4 and runner.model.distiller.step == 3
    assert type(runner.model.teacher).__name__ == "FasterRCNN"


def test_two_process_cpu_ddp_trains_a_faster_rcnn_student_with_connectors_in_sync(shapes, faster_rcnn_teacher,
                                                                                   tmp_path):
    cfg = kd_config("kd_faster_rcnn_shapes.py", faster_rcnn_teacher, tmp_path / "ddp", shapes, iters=3, batch_size=2)
    ranks = two_process_ddp(cfg, tmp_path)
    for rank in ranks:
        assert rank["find_unused_parameters"] is False and (rank["iter"], rank["step"]) == (3, 3)
        assert rank["losses"] == sorted(f"train/loss_kd_{t}" for t in TERMS)
    names = ranks[0]["parameters"]
    assert any(n.startswith("distiller.connectors.") for n in names)
    for name in names:
        assert ranks[1]["parameters"][name] == pytest.approx(names[name], rel=1e-5, abs=1e-6), name
