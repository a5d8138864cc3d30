"""The demo: a CNN distilled on scikit-learn's digits (shipped with it, no download).

Its data, models and training loop are public so tests, examples and method
comparisons use the same pair: ``digits_tensors``, ``teacher_cnn``,
``student_cnn``, ``train`` and ``accuracy``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
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


KD_CONFIG = """
task_weight: 0.5
terms:
  - kind: kd
    weight: 0.5
    temperature: 4
"""

KD_FITNETS_CONFIG = KD_CONFIG + """
  - kind: fitnets
    weight: 1.0
    student: stage2
    teacher: stage2
"""


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def run_demo(seeds: int = 3, epochs: int | None = None, teacher_epochs: int | None = None,
             out: Path | None = Path("runs/demo"), subset: int | None = None) -> dict[str, list[float]]:
    """Teacher, student alone, student + KD, student + KD + FitNets on digits; a table and a PNG.

    Returns the test accuracies by variant (one per seed). ``subset`` trains on
    the first images only (the tests run the demo small).
    """
    from tqdm.auto import tqdm

    epochs = epochs or 15
    teacher_epochs = teacher_epochs or 15
    variants = {"student alone": None, "student + KD": KD_CONFIG, "student + KD + FitNets": KD_FITNETS_CONFIG}
    results: dict[str, list[float]] = {"teacher": [], **{name: [] for name in variants}}
    curves: dict[str, list[list[float]]] = {name: [] for name in variants}
    progress = tqdm(total=seeds * (teacher_epochs + len(variants) * epochs), desc="demo", unit="epoch")
    for seed in range(seeds):
        x_train, y_train, x_test, y_test = digits_tensors(seed)
        if subset:
            x_train, y_train = x_train[:subset], y_train[:subset]
        torch.manual_seed(seed)
        teacher = train(teacher_cnn(), x_train, y_train, epochs=teacher_epochs, seed=seed,
                        on_epoch=lambda epoch, model: progress.update())
        results["teacher"].append(accuracy(teacher, x_test, y_test))
        for name, config in variants.items():
            curve: list[float] = []

            def on_epoch(epoch: int, model: nn.Module, curve: list[float] = curve) -> None:
                curve.append(accuracy(model, x_test, y_test))
                progress.update()

            torch.manual_seed(1000 + seed)  # the same initial student for every variant of a seed
            student = train(student_cnn(), x_train, y_train, teacher=teacher if config else None, config=config,
                            epochs=epochs, seed=seed, on_epoch=on_epoch)
            results[name].append(accuracy(student, x_test, y_test))
            curves[name].append(curve)
    progress.close()

    print(f"\ndigits, {seeds} seeds: test accuracy (%), mean ± std")
    print(f"  teacher (CNN, {sum(p.numel() for p in teacher_cnn().parameters())} parameters)".ljust(44)
          + _mean_std(results["teacher"]))
    for name in variants:
        label = f"  {name} ({sum(p.numel() for p in student_cnn().parameters())} parameters)"
        print(label.ljust(44) + _mean_std(results[name]))
    if out is not None:
        _plot(curves, out)
    return results


def _plot(curves: dict[str, list[list[float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        mean = [sum(values) / len(values) * 100 for values in zip(*runs)]
        axes.plot(range(1, len(mean) + 1), mean, label=name)
    axes.set_xlabel("epoch")
    axes.set_ylabel("test accuracy (%), mean over seeds")
    axes.set_title("digits: student CNN with and without distillation")
    axes.legend()
    figure.tight_layout()
    path = out / "learning_curves.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"learning curves: {path}")
