"""DistilledSegmentor (integrations/mmseg.py) with a real mmengine Runner on CPU: tiny EncoderDecoders, PNG shapes.

Losses logged as ``loss_kd_<term>``, each equal to the term on the models' own
outputs; the teacher unchanged and out of the checkpoint; the adversarial
critic (and the connectors) in it; resume; validation with mmseg's IoUMetric.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmseg", reason="MMSegmentation 1.x is not installed (see README: Segmentation)")
pytest.importorskip("mmdet", reason="the adapter reuses the mmdet integration's checkpoint machinery")
import kdhooks.integrations.mmseg  # noqa: E402,F401  (registers DistilledSegmentor; a config file uses custom_imports)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "segmentation"))
from shapes import draw  # noqa: E402

CLASSES = ("background", "rectangle", "ellipse")


def segmentor(width: int) -> dict:
    """A tiny EncoderDecoder: ResNetV1c-18 at ``width`` base channels (output stride 8), an FCN head."""
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[127.5] * 3, std=[64.0] * 3, bgr_to_rgb=True,
                               pad_val=0, seg_pad_val=255, size=(64, 64)),
        backbone=dict(type="ResNetV1c", depth=18, stem_channels=width, base_channels=width, num_stages=4,
                      out_indices=(3,), strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), norm_cfg=dict(type="BN")),
        decode_head=dict(type="FCNHead", in_channels=8 * width, in_index=0, channels=2 * width, num_convs=1,
                         num_classes=3, norm_cfg=dict(type="BN"), align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode="whole"))


KD = dict(terms=[
    dict(kind="seg_pixel_kd", name="pixel", student="decode_head.conv_seg", teacher="decode_head.conv_seg",
         weight=10),
    dict(kind="cwd", student="backbone", teacher="backbone", weight=1, temperature=4),  # a ResNet's tuple: :0
    dict(kind="seg_adversarial", student="decode_head.conv_seg", teacher="decode_head.conv_seg", weight=0.1,
         depth=2, width=8),
])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    import cv2

    root = tmp_path_factory.mktemp("shapes_seg")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 4)):
        (root / "img" / split).mkdir(parents=True)
        (root / "ann" / split).mkdir(parents=True)
        for i in range(count):
            image, mask = draw(rng, 64)
            cv2.imwrite(str(root / "img" / split / f"{i:03d}.png"), (image.transpose(1, 2, 0) * 255).astype(np.uint8))
            cv2.imwrite(str(root / "ann" / split / f"{i:03d}.png"), mask.astype(np.uint8))
    return root


def config(work_dir: Path, data_root: Path, teacher_ckpt: Path, iters: int, resume: bool = False):
    from mmengine.config import Config

    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]

    def loader(split, batch, shuffle):
        return dict(batch_size=batch, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=shuffle),
                    dataset=dict(type="BaseSegDataset", data_root=str(data_root), metainfo=dict(classes=CLASSES),
                                 data_prefix=dict(img_path=f"img/{split}", seg_map_path=f"ann/{split}"),
                                 img_suffix=".png", seg_map_suffix=".png", pipeline=pipeline))
    return Config(dict(
        default_scope="mmseg",
        model=dict(type="DistilledSegmentor", student=segmentor(8), teacher=segmentor(16),
                   teacher_ckpt=str(teacher_ckpt), kd=KD),
        work_dir=str(work_dir),
        train_dataloader=loader("train", 4, True),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters),
        val_dataloader=loader("val", 2, False), val_cfg=dict(type="ValLoop"),
        val_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.01, momentum=0.9)),
        param_scheduler=[],
        default_hooks=dict(logger=dict(type="LoggerHook", interval=1), timer=dict(type="IterTimerHook"),
                           checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False),
                           param_scheduler=dict(type="ParamSchedulerHook")),
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")),
        log_level="WARNING", randomness=dict(seed=0), resume=resume,
        visualizer=dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")])))


@pytest.fixture(scope="module")
def teacher():
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    torch.manual_seed(1)
    model = MODELS.build(segmentor(16))
    model.init_weights()
    return model


def test_a_runner_trains_logs_each_term_checkpoints_the_critic_and_resumes(tmp_path, data_root, teacher):
    from mmengine.runner import Runner

    teacher_ckpt = tmp_path / "teacher.pth"
    torch.save({"state_dict": teacher.state_dict()}, teacher_ckpt)
    runner = Runner.from_cfg(config(tmp_path, data_root, teacher_ckpt, iters=4))
    model = runner.model
    teacher = model.teacher
    teacher_state = copy.deepcopy(teacher.state_dict())
    critic = model.distiller.parts["seg_adversarial"].module
    runner.train()
    logged = runner.message_hub.log_scalars
    for name in ("loss_kd_pixel", "loss_kd_cwd", "loss_kd_seg_adversarial", "kd_seg_adversarial_discriminator",
                 "decode.loss_ce"):
        assert f"train/{name}" in logged, sorted(logged)
    assert math.isfinite(logged["train/loss_kd_pixel"].current())
    # the optimizer holds the student and the connector, never the critic or the teacher
    held = {id(p) for group in runner.optim_wrapper.optimizer.param_groups for p in group["params"]}
    assert not held & ({id(p) for p in critic.parameters()} | {id(p) for p in teacher.parameters()})
    assert {id(p) for p in model.distiller.connectors.parameters()} <= held
    assert int(model.distiller.parts["seg_adversarial"].optimizer.state[next(critic.parameters())]["step"]) == 4
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert "val/mIoU" in logged  # validated on the student

    checkpoint = torch.load(tmp_path / "iter_4.pth", map_location="cpu", weights_only=False)
    keys = list(checkpoint["state_dict"])
    assert any(k.startswith("distiller.parts.seg_adversarial.module.") for k in keys)
    assert any(k.startswith("distiller.parts.seg_adversarial.optimizer.") for k in keys)
    assert not any(k.startswith("teacher.") for k in keys)
    saved_critic = {k: v.clone() for k, v in critic.state_dict().items()}
    model.distiller.close()

    resumed = Runner.from_cfg(config(tmp_path, data_root, teacher_ckpt, iters=6, resume=True))
    resumed.train()  # loads iter_4, trains iterations 5 and 6
    part = resumed.model.distiller.parts["seg_adversarial"]
    assert int(part.optimizer.state[next(part.module.parameters())]["step"]) == 6
    assert resumed.iter == 6
    assert any(not torch.equal(v, saved_critic[k]) for k, v in part.module.state_dict().items())
    resumed.model.distiller.close()


def test_the_pixel_term_is_the_formula_on_the_decode_heads_maps(data_root, teacher):
    from mmseg.registry import MODELS

    from kdhooks.plugins.segmentation import pixel_kd_loss

    torch.manual_seed(0)
    model = MODELS.build(dict(type="DistilledSegmentor", student=segmentor(8), teacher=teacher,
                              kd=dict(terms=[KD["terms"][0]])))
    try:
        from mmseg.structures import SegDataSample
        from mmengine.structures import PixelData

        images = torch.randn(2, 3, 64, 64)
        masks = torch.randint(0, 3, (2, 1, 64, 64))
        samples = []
        for m in masks:
            sample = SegDataSample(metainfo=dict(img_shape=(64, 64), pad_shape=(64, 64)))
            sample.gt_sem_seg = PixelData(data=m)
            samples.append(sample)
        model.train()
        captured = {}
        handle = model.student.decode_head.conv_seg.register_forward_hook(lambda m, a, o: captured.update(s=o))
        losses = model(images, samples, mode="loss")
        handle.remove()
        with torch.no_grad():
            teacher_map = copy.deepcopy(teacher).eval()(images, mode="tensor")
        expected = 10 * pixel_kd_loss(captured["s"].detach(), teacher_map, 1.0, masks[:, 0])
        assert math.isclose(losses["loss_kd_pixel"].item(), expected.item(), rel_tol=1e-5)
        assert "decode.loss_ce" in losses
    finally:
        model.distiller.close()
