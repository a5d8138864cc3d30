"""A generated COCO-format detection data set: rectangles and ellipses on noise.

    python examples/mmdet/shapes.py data/shapes            # train (256 images) and val (64 images)

writes ``data/shapes/{train,val}/*.png`` and ``data/shapes/{train,val}.json``
(COCO: images, annotations with ``bbox`` as x, y, w, h, categories). Every
image is uniform noise with one to three filled shapes of random colour; the
two classes differ only by shape, so a detector has to look at contours.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CLASSES = ("rectangle", "ellipse")


def draw_image(rng: np.random.Generator, size: int, max_objects: int = 3,
               min_side: int = 10, max_side: int = 32) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One noisy BGR image and its objects as (class index, [x, y, w, h])."""
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (3, 3), 0)
    objects = []
    for _ in range(rng.integers(1, max_objects + 1)):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        label = int(rng.integers(0, len(CLASSES)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if label == 0:
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colour, thickness=-1)
        else:
            cv2.ellipse(image, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, colour, thickness=-1)
        objects.append((label, [float(x), float(y), float(w), float(h)]))
    return image, objects


def write_split(root: Path, split: str, count: int, size: int, seed: int) -> Path:
    """``count`` images under ``root/split/`` and their annotations in ``root/split.json``."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        image, objects = draw_image(rng, size)
        file_name = f"{image_id:05d}.png"
        cv2.imwrite(str(root / split / file_name), image)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for label, box in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    path = root / f"{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def make_shapes(root: str | Path, train: int = 256, val: int = 64, size: int = 64, seed: int = 0) -> Path:
    """The whole data set under ``root`` (train and val drawn from different seeds)."""
    root = Path(root)
    write_split(root, "train", train, size, seed)
    write_split(root, "val", val, size, seed + 10_000)
    return root


def use_data_root(cfg: Any, root: str | Path) -> Any:
    """Point the data loaders and the evaluators of ``cfg`` at the shapes data set under ``root``."""
    root = str(root).rstrip("/") + "/"
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if cfg.get(loader):
            cfg[loader].dataset.data_root = root
    for evaluator in ("val_evaluator", "test_evaluator"):
        if cfg.get(evaluator):
            cfg[evaluator].ann_file = root + "val.json"
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="data/shapes")
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = make_shapes(args.root, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} train and {args.val} val images to {root}")


if __name__ == "__main__":
    main()
