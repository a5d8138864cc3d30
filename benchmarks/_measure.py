"""Measuring helpers shared by the benchmarks: interleaved step timing and peak memory of one step."""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def interleaved_times(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each call of each step function, run in alternating order so noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(warmup + repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each step function (see ``interleaved_times``)."""
    return {name: statistics.median(values) for name, values in interleaved_times(steps, repeats, warmup).items()}


def paired_ratio(times: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the ratios of calls made side by side: a slow spell of a shared machine
    hits both calls of a pair, so it cancels in their ratio where it would shift one median."""
    ratios = sorted(t / b for t, b in zip(times, baseline))
    quartiles = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), quartiles[0], quartiles[2]


def peak_bytes(step: Callable[[], None]) -> int:
    """Peak bytes allocated above the starting point while ``step`` runs.

    On CUDA the allocator's own statistics; on CPU the running sum over the
    profiler's memory timeline of allocations and frees (torch keeps no CPU
    allocator statistics).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def write_section(path: Path, marker: str, text: str) -> None:
    """Put ``text`` between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in ``path``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in body and end in body:
        before, rest = body.split(start, 1)
        body = before + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    path.write_text(body)


def saved_or_measured(path: Path, reuse: bool, measure: Callable[[], dict]) -> dict:
    """The measurements saved at ``path`` (``--from-results``: rewrite the docs without re-training),
    or fresh ones from ``measure()``, saved there for the next rewrite."""
    if reuse:
        return json.loads(path.read_text())
    results = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return results

