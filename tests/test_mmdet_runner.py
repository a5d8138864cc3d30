"""The mmdet adapter inside a real mmengine Runner on CPU, on generated COCO-format shapes.

A ResNet-18 RetinaNet and a ResNet-18 GFL teacher are trained briefly once for
the module; quarter-width students are distilled through ``Runner.train()``.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _mmdet import require_mmdet, shapes_module, small_config, train

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
    work = tmp_path_factory.mktemp("retinanet_teacher")
    train(small_config("retinanet_r18_shapes.py", work, shapes, iters=6))
    return work / "iter_6.pth"


@pytest.fixture(scope="module")
def gfl_teacher(shapes, tmp_path_factory):
    work = tmp_path_factory.mktemp("gfl_teacher")
    train(small_config("gfl_r18_shapes.py", work, shapes, iters=6))
    return work / "iter_6.pth"


def kd_config(name, teacher_ckpt, work_dir, shapes, iters, **options):
    cfg = small_config(name, work_dir, shapes, iters, **options)
    cfg.model.teacher_ckpt = str(teacher_ckpt)
    return cfg


def logged(runner, name):
    return np.asarray(runner.message_hub.log_scalars[f"train/{name}"].data[0])


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
    student_cfg = Config.fromfile(str(tmp_path / "student.py"))
    assert student_cfg.model.type == "RetinaNet" and "custom_imports" not in student_cfg
    student_cfg.work_dir = str(tmp_path / "test")
    student_cfg.model.test_cfg.score_thr = 0.0            # a six-iteration student scores low: keep its boxes
    tester = Runner.from_cfg(student_cfg)
    metrics = tester.test()
    assert 0.0 <= metrics["coco/bbox_mAP"] <= 1.0 and 0.0 <= metrics["coco/bbox_mAP_50"] <= 1.0
    plain, distilled = tester.model.state_dict(), resumed.model.student.state_dict()
    assert set(plain) == set(distilled) and all(torch.equal(plain[k], distilled[k]) for k in plain)


def test_ld_on_a_gfl_pair(shapes, gfl_teacher, tmp_path):
    runner = train(kd_config("kd_gfl_shapes.py", gfl_teacher, tmp_path / "ld", shapes, iters=3))
    ld = logged(runner, "loss_kd_ld")
    assert len(ld) == 3 and np.isfinite(ld).all() and (ld > 0).all()
    assert {"loss_cls", "loss_bbox", "loss_dfl"} <= {k.removeprefix("train/") for k in runner.message_hub.log_scalars}
    assert runner.model.distiller.step == 3


def test_two_process_cpu_ddp_trains_with_connectors_in_sync(shapes, retinanet_teacher, tmp_path):
    cfg = kd_config("kd_retinanet_shapes.py", retinanet_teacher, tmp_path / "ddp", shapes, iters=3, batch_size=2)
    config = tmp_path / "ddp_config.py"
    cfg.dump(str(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    worker = Path(__file__).with_name("_mmdet_ddp_worker.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           f"--master_port={port}", str(worker), str(config), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["wrapper"] == "MMDistributedDataParallel" and rank["find_unused_parameters"] is False
        assert (rank["iter"], rank["step"]) == (3, 3)
        assert rank["losses"] == sorted(f"train/loss_kd_{t}" for t in RETINANET_TERMS)
    # DDP averaged every gradient, connectors included: both processes hold the same weights
    names = ranks[0]["parameters"]
    assert any(n.startswith("distiller.connectors.") for n in names)
    for name in names:
        assert ranks[1]["parameters"][name] == pytest.approx(names[name], rel=1e-5, abs=1e-6), name
