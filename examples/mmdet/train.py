"""Train (or test) an mmdet config with mmengine's Runner: the teacher, the student alone, or the distilled student.

    python examples/mmdet/shapes.py data/shapes
    python examples/mmdet/train.py examples/mmdet/retinanet_r18_shapes.py --work-dir runs/mmdet/teacher
    python examples/mmdet/train.py examples/mmdet/kd_retinanet_shapes.py --work-dir runs/mmdet/kd
    kdhooks mmdet export runs/mmdet/kd/iter_400.pth runs/mmdet/student.pth \
        --config examples/mmdet/kd_retinanet_shapes.py
    python examples/mmdet/train.py runs/mmdet/student.py --test runs/mmdet/student.pth

This is mmdet's tools/train.py reduced to what the example needs.
"""
from __future__ import annotations

import argparse

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from shapes import use_data_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--test", metavar="CHECKPOINT", default=None,
                        help="evaluate this checkpoint instead of training")
    parser.add_argument("--data-root", default=None, help="the shapes data set (default: the config's data/shapes/)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    parser.add_argument("--launcher", default="none", choices=["none", "pytorch"])
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    if args.data_root:
        use_data_root(cfg, args.data_root)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or f"runs/mmdet/{args.config.rsplit('/', 1)[-1].removesuffix('.py')}"
    if args.test:
        cfg.load_from = args.test
        Runner.from_cfg(cfg).test()
    else:
        Runner.from_cfg(cfg).train()


if __name__ == "__main__":
    main()
