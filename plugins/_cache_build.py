"""``kdhooks cache build``: fill the teacher cache ahead of training, in one pass over a data set."""
from __future__ import annotations

import importlib
from typing import Any

import torch

import kdhooks


def build_cache(config: Any, student: torch.nn.Module, teacher: Any, batches: Any) -> dict[str, float]:
    """Run ``teacher`` once over ``batches`` (inputs, or tuples whose first item is the inputs), filling the cache.

    The student runs too (its taps' shapes are part of the config) but learns nothing.
    Returns the cache's metrics after the last batch.
    """
    distiller = None
    metrics: dict[str, float] = {}
    try:
        for index, batch in enumerate(batches):
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            if distiller is None:
                distiller = kdhooks.Distiller(student, teacher, config, example_inputs=inputs[:2])
                caches = [t for t in distiller.terms if t.kind == "teacher_cache"]
                if not caches:
                    raise kdhooks.ConfigError("terms", "the config has no teacher_cache term to fill",
                                              fix="add `{kind: teacher_cache, path: runs/teacher_cache}` to terms")
            student.train()
            with torch.no_grad():
                student(inputs)
                distiller(None)
            metrics = {k: float(v) for k, v in distiller.last_metrics.items() if "teacher_cache" in k}
            if index == 0:
                for cache in caches:
                    cache.flush()  # the first shard gives the bytes a sample takes
                    per_sample = cache._stored_bytes / max(cache._stored_samples, 1)
                    length = len(batches.dataset) if hasattr(batches, "dataset") else None
                    if per_sample and length:
                        print(f"{cache.name}: about {per_sample:.0f} bytes a sample, "
                              f"{per_sample * length / 2**20:.1f} MiB for {length} samples")
    finally:
        if distiller is not None:
            distiller.close()
    return metrics


def _build(args: Any) -> int:
    from kdhooks.cli import load_factory

    module_name, _, factory_name = args.data.rpartition(":")
    batches = getattr(importlib.import_module(module_name), factory_name)()
    student = load_factory(args.student, "--student")
    teacher = load_factory(args.teacher, "--teacher")
    metrics = build_cache(args.config, student, teacher, batches)
    print(", ".join(f"{name} {value:g}" for name, value in sorted(metrics.items())))
    return 0


def register_cli(commands: Any) -> None:
    """``kdhooks cache build CONFIG --student S --teacher T --data MODULE:FACTORY``."""
    cache = commands.add_parser("cache", help="teacher-capture cache: fill it ahead of training")
    actions = cache.add_subparsers(dest="cache_command", required=True)
    build = actions.add_parser("build", help="run the teacher once over a data set, storing what the terms read")
    build.add_argument("config", help="a config with a teacher_cache term (the cache's path and dtype)")
    build.add_argument("--student", required=True, help="MODULE:FACTORY")
    build.add_argument("--teacher", required=True, help="MODULE:FACTORY")
    build.add_argument("--data", required=True, help="MODULE:FACTORY returning an iterable of batches "
                       "(a DataLoader: inputs, or (inputs, labels) tuples), in the order training sees them or not")
    build.set_defaults(run=_build)
