"""Shared by the MMDetection tests: mmdet or a skip (a failure in CI), the shapes data, small configs."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "mmdet"


def require_mmdet() -> None:
    """Skip without mmdet, except where KDHOOKS_REQUIRE_MMDET is set (CI): there its absence fails."""
    if os.environ.get("KDHOOKS_REQUIRE_MMDET"):
        for module in ("mmengine", "mmdet", "mmcv.ops", "kdhooks.integrations.mmdet"):
            importlib.import_module(module)
    else:
        for module in ("mmengine", "mmdet", "mmcv.ops"):
            pytest.importorskip(module, reason="the mmdet extra is not installed (see README: MMDetection)")


def shapes_module():
    """examples/mmdet/shapes.py: the generated COCO-format data set."""
    spec = importlib.util.spec_from_file_location("kdhooks_example_shapes", EXAMPLES / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def small_config(name: str, work_dir: Path, data_root: Path, iters: int, checkpoint_every: int | None = None,
                 batch_size: int = 4, validate: bool = False):
    """An example config cut down for a test: few iterations, constant learning rate, quiet logs."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(EXAMPLES / name))
    shapes_module().use_data_root(cfg, data_root)
    cfg.work_dir = str(work_dir)
    cfg.train_dataloader.batch_size = batch_size
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters)
    if not validate:  # the train loop validates at its last iteration otherwise
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=checkpoint_every or iters, by_epoch=False)
    cfg.default_hooks.logger.interval = 1
    cfg.log_level = "WARNING"
    cfg.randomness = dict(seed=0)
    return cfg


def train(cfg):
    """Runner.from_cfg(cfg).train(); returns the Runner."""
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


def trained_teacher(name: str, work_dir: Path, data_root: Path, iters: int = 6) -> Path:
    """A teacher trained briefly from example config ``name``: the path of its last checkpoint."""
    train(small_config(name, work_dir, data_root, iters))
    return work_dir / f"iter_{iters}.pth"


def kd_config(name: str, teacher_ckpt: Path, work_dir: Path, data_root: Path, iters: int, **options):
    """A distillation example config cut down like ``small_config``, its teacher loaded from ``teacher_ckpt``."""
    cfg = small_config(name, work_dir, data_root, iters, **options)
    cfg.model.teacher_ckpt = str(teacher_ckpt)
    return cfg


def logged(runner, name: str):
    """The values the Runner logged for ``train/<name>``, one per iteration."""
    import numpy as np

    return np.asarray(runner.message_hub.log_scalars[f"train/{name}"].data[0])


def two_process_ddp(cfg, folder: Path) -> list[dict]:
    """``cfg`` trained by _mmdet_ddp_worker.py in two CPU processes (torchrun, gloo); what each rank reported."""
    config = folder / "ddp_config.py"
    cfg.dump(str(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    worker = Path(__file__).with_name("_mmdet_ddp_worker.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           f"--master_port={port}", str(worker), str(config), str(folder)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
