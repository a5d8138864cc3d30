"""Guards around the loss: a NaN or infinite term stops training with its name and step."""
from __future__ import annotations

import math

import torch

import kdhooks


@kdhooks.hookimpl(wrapper=True)
def kdhooks_step_end(distiller: kdhooks.Distiller, losses: dict[str, torch.Tensor]):
    # A wrapper around the step's end: it checks before any other plugin's step_end sees the values,
    # and before backward. A non-finite part makes the total non-finite (NaN or ±inf spread through
    # the sum), so one check and one host sync cover every term; the parts are read only on failure.
    total = losses.get("total")
    if total is None or (math.isfinite(total.item()) if total.numel() == 1 else bool(torch.isfinite(total).all())):
        return (yield)
    terms_first = [name for name in losses if name not in ("task", "total")] + ["task"]
    for name in terms_first:
        if name in losses and not bool(torch.isfinite(losses[name]).all()):
            raise kdhooks.LossError(name, distiller.step, float(losses[name].float().sum()))
    # finite parts whose sum overflows
    raise kdhooks.LossError("total", distiller.step, float(total.float().sum()))
