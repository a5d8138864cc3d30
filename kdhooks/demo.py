"""The demo: a CNN distilled on scikit-learn's digits (shipped with it, no download).

Its data, models and training loop are public so tests, examples and method
comparisons use the same pair: ``digits_tensors``, ``teacher_cnn``,
``student_cnn``, ``train`` and ``accuracy``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._distiller import Distiller


def digits_tensors(seed: int = 0, test_fraction: float = 0.3) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): 8x8 grey images scaled to [0, 1], a stratified split by ``seed``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError("the digits data comes with scikit-learn: pip install 'kdhooks[demo]'") from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=test_fraction,
                                           random_state=seed, stratify=digits.target)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class DigitsCNN(nn.Module):
    """Three conv stages (8x8, 4x4, 2x2) and a linear classifier; ``width`` sets the channels."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stage1 = _block(1, width)
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), _block(width, 2 * width))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), _block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feature = self.stage3(self.stage2(self.stage1(images)))
        return self.fc(self.pool(feature).flatten(1))


def teacher_cnn() -> DigitsCNN:
    return DigitsCNN(width=32)


def student_cnn() -> DigitsCNN:
    return DigitsCNN(width=4)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).float().mean().item()
    model.train(was_training)
    return correct


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, teacher: nn.Module | None = None,
          config: Any = None, epochs: int = 20, batch_size: int = 64, lr: float = 0.05, seed: int = 0,
          on_epoch: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """A plain PyTorch loop (SGD, momentum, cosine learning rate); with ``config`` a Distiller adds KD to it."""
    generator = torch.Generator().manual_seed(seed)
    kd = Distiller(model, teacher, config, example_inputs=images[:2]) if config is not None else None
    params = [*model.parameters(), *(kd.parameters() if kd is not None else [])]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(labels) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    try:
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels), batch_size):
                batch = order[start:start + batch_size]
                x, y = images[batch], labels[batch]
                task_loss = F.cross_entropy(model(x), y)
                loss = kd(task_loss, labels=y) if kd is not None else task_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            if on_epoch is not None:
                on_epoch(epoch, model)
    finally:
        if kd is not None:
            kd.close()
    return model
