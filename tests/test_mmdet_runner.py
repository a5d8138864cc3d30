"""The mmdet adapter inside a real mmengine Runner on CPU, on generated COCO-format shapes.

A ResNet-18 RetinaNet and a ResNet-18 GFL teacher are trained briefly once for
the module; quarter-width students are distilled through ``Runner.train()``.
"""

import numpy as np
import pytest
import torch

from _mmdet import (EXAMPLES, kd_config, logged, require_mmdet, shapes_module, small_config, train,
                    trained_teacher, two_process_ddp)

require_mmdet()

from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from kdhooks.cli import main as kdhooks_main  # noqa: E402

pytestmark = pytest.mark.slow
RETINANET_TERMS = ("det_cls_kd", "det_bounded_reg", "det_feature_imitation")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_module().make_shapes(tmp_path_factory.mktemp("shapes"), train=32, val=8)


@pytest.fixture(scope="module")
def retinanet_teacher(shapes, tmp_path_factory):
    return trained_teacher("retinanet_r18_shapes.py", tmp_path_factory.mktemp("retinanet_teacher"), shapes)


@pytest.fixture(scope="module")
def gfl_teacher(shapes, tmp_path_factory):
    return trained_teacher("gfl_r18_shapes.py", tmp_path_factory.mktemp("gfl_teacher"), shapes)


@pytest.fixture(scope="module")
def atss_teacher(shapes, tmp_path_factory):
    return trained_teacher("atss_r18_shapes.py", tmp_path_factory.mktemp("atss_teacher"), shapes)


class ResumedState(Hook):
    """Records, once the Runner has resumed, where it resumed: iteration, Distiller step, connectors."""

    def before_train(self, runner):
        distiller = runner.model.distiller
        self.iter, self.step = runner.iter, distiller.step
        self.connectors = {k: v.clone() for k, v in distiller.state_dict().items() if k.startswith("connectors.")}


def test_retinanet_student_distilled_resumed_exported_and_evaluated(shapes, retinanet_teacher, tmp_path):
    cfg = kd_config("kd_retinanet_shapes.py", retinanet_teacher, tmp_path / "kd", shapes, iters=4,
                    checkpoint_every=2)
    runner = train(cfg)
    model = runner.model

    # every term is logged as loss_kd_<name> next to the student's own losses, every iteration
    for name in ("loss_cls", "loss_bbox", *(f"loss_kd_{term}" for term in RETINANET_TERMS)):
        values = logged(runner, name)
        assert len(values) == 4 and np.isfinite(values).all() and (values > 0).all(), name

    # the teacher is exactly the checkpoint it was loaded from, in eval mode
    saved = torch.load(retinanet_teacher, map_location="cpu", weights_only=True)["state_dict"]
    teacher = model.teacher.state_dict()
    assert set(saved) == set(teacher)
    assert all(torch.equal(saved[k], teacher[k]) for k in saved)
    assert not model.teacher.training

    # the checkpoint holds the student, the connectors (one 1x1 conv per FPN level) and the step, no teacher
    state = torch.load(tmp_path / "kd" / "iter_4.pth", map_location="cpu", weights_only=True)["state_dict"]
    connectors = sorted(k for k in state if k.startswith("distiller.connectors."))
    assert len(connectors) == 8 and any(k.startswith("student.bbox_head.") for k in state)
    assert not any(k.startswith("teacher") for k in state)
    assert int(state["distiller._extra_state"]) == 4
    initial = torch.load(tmp_path / "kd" / "iter_2.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert not all(torch.equal(initial[k], state[k]) for k in connectors)      # the connectors train

    # resume: same iteration, same Distiller step (schedules), same connectors; then two more iterations
    cfg = kd_config("kd_retinanet_shapes.py", retinanet_teacher, tmp_path / "kd", shapes, iters=6,
                    checkpoint_every=2)
    cfg.resume = True
    resumed = Runner.from_cfg(cfg)
    where = ResumedState()
    resumed.register_hook(where)
    resumed.train()
    assert (where.iter, where.step) == (4, 4)
    assert all(torch.equal(value, state[f"distiller.{key}"]) for key, value in where.connectors.items())
    assert (resumed.iter, resumed.model.distiller.step) == (6, 6)
    assert len(logged(resumed, "loss_kd_det_cls_kd")) == 6

    # export the student alone; plain mmdet (no kdhooks import in its config) loads it and CocoMetric scores it
    kd_file = tmp_path / "kd_config.py"
    cfg.dump(str(kd_file))
    out = tmp_path / "student.pth"
    assert kdhooks_main(["mmdet", "export", str(tmp_path / "kd" / "iter_6.pth"), str(out),
                         "--config", str(kd_file)]) == 0
    written = (tmp_path / "student.py").read_text()
    assert str(EXAMPLES) not in written and "teacher" not in written       # no path of this machine's teacher
    student_cfg = Config.fromfile(str(tmp_path / "student.py"))
    assert student_cfg.model.type == "RetinaNet" and "custom_imports" not in student_cfg
    student_cfg.work_dir = str(tmp_path / "test")
    student_cfg.model.test_cfg.score_thr = 0.0            # a six-iteration student scores low: keep its boxes
    tester = Runner.from_cfg(student_cfg)
    metrics = tester.test()
    assert 0.0 <= metrics["coco/bbox_mAP"] <= 1.0 and 0.0 <= metrics["coco/bbox_mAP_50"] <= 1.0
    plain, distilled = tester.model.state_dict(), resumed.model.student.state_dict()
    assert set(plain) == set(distilled) and all(torch.equal(plain[k], distilled[k]) for k in plain)

    # the distillation checkpoint itself, tested with its own config where the teacher's checkpoint is not
    cfg.load_from, cfg.resume, cfg.work_dir = str(tmp_path / "kd" / "iter_6.pth"), False, str(tmp_path / "kd_test")
    cfg.model.teacher_ckpt = str(tmp_path / "elsewhere" / "teacher.pth")
    cfg.test_dataloader, cfg.test_evaluator = student_cfg.test_dataloader, student_cfg.test_evaluator
    cfg.test_cfg = dict(type="TestLoop")
    cfg.model.student.test_cfg.score_thr = 0.0
    with pytest.warns(UserWarning, match="is not here; the teacher is loaded from it when training starts"):
        kd_tester = Runner.from_cfg(cfg)
    assert kd_tester.test() == pytest.approx(metrics)


def test_ld_on_a_gfl_pair(shapes, gfl_teacher, tmp_path):
    runner = train(kd_config("kd_gfl_shapes.py", gfl_teacher, tmp_path / "ld", shapes, iters=3))
    ld = logged(runner, "loss_kd_ld")
    assert len(ld) == 3 and np.isfinite(ld).all() and (ld > 0).all()
    assert {"loss_cls", "loss_bbox", "loss_dfl"} <= {k.removeprefix("train/") for k in runner.message_hub.log_scalars}
    assert runner.model.distiller.step == 3


def test_two_process_cpu_ddp_trains_with_connectors_in_sync(shapes, retinanet_teacher, tmp_path):
    cfg = kd_config("kd_retinanet_shapes.py", retinanet_teacher, tmp_path / "ddp", shapes, iters=3, batch_size=2)
    ranks = two_process_ddp(cfg, tmp_path)
    for rank in ranks:
        assert rank["wrapper"] == "MMDistributedDataParallel" and rank["find_unused_parameters"] is False
        assert (rank["iter"], rank["step"]) == (3, 3)
        assert rank["losses"] == sorted(f"train/loss_kd_{t}" for t in RETINANET_TERMS)
    # DDP averaged every gradient, connectors included: both processes hold the same weights
    names = ranks[0]["parameters"]
    assert any(n.startswith("distiller.connectors.") for n in names)
    for name in names:
        assert ranks[1]["parameters"][name] == pytest.approx(names[name], rel=1e-5, abs=1e-6), name


def test_atss_student_learns_box_deltas_against_encoded_targets(shapes, atss_teacher, tmp_path):
    """ATSS (GIoU on decoded boxes): det_bounded_reg is of the order of the head's own losses, not of pixels²."""
    runner = train(kd_config("kd_atss_shapes.py", atss_teacher, tmp_path / "atss", shapes, iters=3))
    weight = runner.model.distiller.terms[1].weight
    bounded = logged(runner, "loss_kd_det_bounded_reg") / weight
    for name in ("loss_bbox", "loss_centerness", "loss_kd_det_cls_kd", "loss_kd_det_feature_imitation"):
        values = logged(runner, name)
        assert len(values) == 3 and np.isfinite(values).all(), name
    assert len(bounded) == 3 and np.isfinite(bounded).all() and (bounded > 0).all()
    # targets in pixels made it ≈ 1000 (squared pixel errors); encoded as the head's deltas it stays small
    assert bounded.max() < 50, bounded


class EMAWatch(Hook):
    """After EMAHook (priority NORMAL): the model's parameters after each iteration, and during validation."""

    priority = "LOW"

    def __init__(self):
        self.after_iters, self.in_val, self.after_validation = [], None, None

    @staticmethod
    def floats(runner):
        return {k: v.detach().clone() for k, v in runner.model.state_dict().items() if v.dtype.is_floating_point}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.after_iters.append(self.floats(runner))

    def before_val_epoch(self, runner):
        self.in_val = self.floats(runner)

    def after_val_epoch(self, runner, metrics=None):
        self.after_validation = self.floats(runner)


def test_ema_hook_averages_the_student_and_connectors_and_validates_with_the_average(shapes, retinanet_teacher,
                                                                                    tmp_path):
    momentum = 0.5
    cfg = kd_config("kd_retinanet_shapes.py", retinanet_teacher, tmp_path / "ema", shapes, iters=3, validate=True)
    cfg.custom_hooks = [dict(type="EMAHook", ema_type="ExponentialMovingAverage", momentum=momentum,
                             update_buffers=True)]
    cfg.model.student.test_cfg.score_thr = 0.0
    runner = Runner.from_cfg(cfg)
    watch = EMAWatch()
    runner.register_hook(watch)
    runner.train()
    ema_hook = next(h for h in runner.hooks if type(h).__name__ == "EMAHook")
    average = ema_hook.ema_model.module
    assert type(average).__name__ == "DistilledStudent" and not hasattr(average, "teacher")

    # by hand: the first iteration copied, then avg ← avg + m (model − avg), for every float parameter and buffer
    expected = dict(watch.after_iters[0])
    for state in watch.after_iters[1:]:
        expected = {k: v + momentum * (state[k] - v) for k, v in expected.items()}
    keys = set(expected) - {"distiller._extra_state"}
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("distiller.connectors.") for k in keys)
    # validation ran on the average (EMAHook swaps it into the model), then the trained weights came back
    for key in keys:
        torch.testing.assert_close(watch.in_val[key], expected[key], rtol=1e-5, atol=1e-6)
        assert torch.equal(watch.after_validation[key], watch.after_iters[-1][key]), key
    assert any(not torch.equal(expected[k], watch.after_iters[-1][k]) for k in keys)

    # the checkpoint: the average as the model's weights (what export and test read), the trained ones as the EMA's
    checkpoint = torch.load(tmp_path / "ema" / "iter_3.pth", map_location="cpu", weights_only=True)
    assert not any("teacher" in k for k in checkpoint["state_dict"]) and "ema_state_dict" in checkpoint
    for key in keys:
        torch.testing.assert_close(checkpoint["state_dict"][key], expected[key], rtol=1e-5, atol=1e-6)
        assert torch.equal(checkpoint["ema_state_dict"][f"module.{key}"], watch.after_iters[-1][key])

    # resume: the EMA state comes back and training goes on
    cfg = kd_config("kd_retinanet_shapes.py", retinanet_teacher, tmp_path / "ema", shapes, iters=4)
    cfg.custom_hooks = [dict(type="EMAHook", momentum=momentum, update_buffers=True)]
    cfg.resume = True
    resumed = train(cfg)
    assert resumed.iter == 4 and resumed.model.distiller.step == 4


def test_a_teacher_given_as_a_module_is_not_reinitialised_by_the_runner(shapes, retinanet_teacher, tmp_path):
    from mmdet.registry import MODELS
    from mmengine.runner import load_checkpoint

    cfg = small_config("kd_retinanet_shapes.py", tmp_path / "module", shapes, iters=2)
    teacher = MODELS.build(Config.fromfile(str(EXAMPLES / "retinanet_r18_shapes.py")).model)
    load_checkpoint(teacher, str(retinanet_teacher), map_location="cpu")
    saved = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = MODELS.build(dict(type="DistilledDetector", student=cfg.model.student, teacher=teacher,
                              kd=cfg.model.kd, example_size=(64, 64)))
    runner = Runner(model=model, work_dir=str(tmp_path / "module"), train_dataloader=cfg.train_dataloader,
                    optim_wrapper=cfg.optim_wrapper, train_cfg=cfg.train_cfg, default_hooks=cfg.default_hooks,
                    default_scope="mmdet", env_cfg=cfg.env_cfg, log_level="WARNING", randomness=dict(seed=0))
    runner.train()                               # calls model.init_weights() first
    assert runner.model.teacher is teacher
    assert all(torch.equal(saved[k], v) for k, v in teacher.state_dict().items())
    assert np.isfinite(logged(runner, "loss_kd_det_cls_kd")).all()


def test_fcos_student_imitates_a_retinanet_teacher_at_its_positive_points(shapes, retinanet_teacher, tmp_path):
    runner = train(kd_config("kd_fcos_shapes.py", retinanet_teacher, tmp_path / "fcos", shapes, iters=3))
    imitation = logged(runner, "loss_kd_det_feature_imitation")
    assert len(imitation) == 3 and np.isfinite(imitation).all() and (imitation > 0).all()
    assert {"loss_cls", "loss_bbox", "loss_centerness"} <= {k.removeprefix("train/")
                                                            for k in runner.message_hub.log_scalars}
    assert len(runner.model.distiller.connectors) == 4


class LastBatch(Hook):
    """After ImitationMaskHook (LOW): the raw batch and the imitation term's masks of the last iteration."""

    priority = "VERY_LOW"

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.batch = data_batch
        self.masks = [m.clone() for m in runner.model.distiller.terms[2].last_masks]


def test_imitation_masks_are_saved_over_the_images(shapes, retinanet_teacher, tmp_path):
    import cv2

    from kdhooks.integrations.mmdet import mask_overlay

    cfg = kd_config("kd_retinanet_shapes.py", retinanet_teacher, tmp_path / "masks", shapes, iters=2, batch_size=2)
    cfg.custom_hooks = [dict(type="ImitationMaskHook", interval=1, images=2)]
    runner = Runner.from_cfg(cfg)
    last = LastBatch()
    runner.register_hook(last)
    runner.train()
    written = sorted((tmp_path / "masks" / "kd_masks").glob("*.png"))
    assert [p.name for p in written] == [f"iter_00000{i}_det_feature_imitation_{k}.png" for i in (1, 2) for k in (0, 1)]
    for index in (0, 1):
        saved = cv2.imread(str(written[2 + index]))
        image = last.batch["inputs"][index].permute(1, 2, 0).numpy()
        boxes = last.batch["data_samples"][index].gt_instances.bboxes.tensor.numpy()
        assert saved.shape == (64, 64 * 4, 3)                            # four FPN levels side by side
        np.testing.assert_array_equal(saved, mask_overlay(image, [m[index] for m in last.masks], (64, 64), boxes))
        # the objects region is on the objects: its cells touch a gt box on every level that has one
        for level, mask in enumerate(last.masks):
            stride = 64 // mask.shape[-1]
            for y, x in mask[index].nonzero().tolist():
                cell = np.array([x * stride, y * stride, (x + 1) * stride, (y + 1) * stride])
                touches = (np.minimum(cell[2], boxes[:, 2]) > np.maximum(cell[0], boxes[:, 0])) & \
                          (np.minimum(cell[3], boxes[:, 3]) > np.maximum(cell[1], boxes[:, 1]))
                assert touches.any(), (level, y, x)
