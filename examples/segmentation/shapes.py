"""Shapes on backgrounds, made on the fly: a segmentation data set with no download.

Each image is blurred colour noise with one to three filled rectangles or
ellipses of random colour; its mask gives each pixel's class: 0 background,
1 rectangle, 2 ellipse (the detection example's data, masks instead of boxes).
A shape's class is told only by its outline, not its colour.
"""
from __future__ import annotations

import numpy as np
import torch

CLASSES = ("background", "rectangle", "ellipse")


def draw(rng: np.random.Generator, size: int, max_objects: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One image (3, size, size) in [0, 1] and its mask (size, size) of class indices."""
    noise = rng.random((3, size // 4 + 1, size // 4 + 1))
    image = np.kron(noise, np.ones((4, 4)))[:, :size, :size]  # blocky noise: a background with structure
    image = 0.5 * image + 0.5 * rng.random((3, size, size))
    mask = np.zeros((size, size), dtype=np.int64)
    yy, xx = np.mgrid[:size, :size]
    low, high = size // 5, size // 2
    for _ in range(rng.integers(1, max_objects + 1)):
        w, h = (int(v) for v in rng.integers(low, high + 1, 2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        label = int(rng.integers(1, len(CLASSES)))
        if label == 1:
            inside = (xx >= x) & (xx < x + w) & (yy >= y) & (yy < y + h)
        else:
            cx, cy = x + (w - 1) / 2, y + (h - 1) / 2
            inside = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
        colour = rng.random(3)
        image[:, inside] = colour[:, None]
        mask[inside] = label
    return image.astype(np.float32), mask


def make(count: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images ``(N, 3, size, size)``, normalized to mean 0 and unit scale, and masks ``(N, size, size)``."""
    rng = np.random.default_rng(seed)
    images, masks = zip(*(draw(rng, size) for _ in range(count)))
    images = (torch.from_numpy(np.stack(images)) - 0.5) / 0.25
    return images, torch.from_numpy(np.stack(masks))


def confusion(prediction: torch.Tensor, mask: torch.Tensor, classes: int = len(CLASSES)) -> torch.Tensor:
    """The classes × classes confusion matrix (rows: truth) of predicted class maps against masks."""
    index = mask.flatten() * classes + prediction.flatten()
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes)


def miou(matrix: torch.Tensor) -> float:
    """Mean intersection over union over the classes, from a confusion matrix."""
    matrix = matrix.double()
    intersection = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - intersection
    return float((intersection / union.clamp(min=1)).mean())


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, batch: int = 64) -> float:
    """mIoU of ``model``'s ``out`` map (eval mode) on the data set."""
    was = model.training
    model.eval()
    matrix = sum(confusion(model(images[i:i + batch])["out"].argmax(1), masks[i:i + batch])
                 for i in range(0, len(images), batch))
    model.train(was)
    return miou(matrix)
