"""Shared by the MMDetection tests: mmdet or a skip (a failure in CI), the shapes data, small configs."""
from __future__ import annotations

import importlib.util
import os
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
