"""Guards around the loss: a NaN or infinite term stops training with its name and step."""
from __future__ import annotations

import torch

import kdhooks


@kdhooks.hookimpl(wrapper=True)
def kdhooks_losses(ctx: kdhooks.LossContext):
    results = yield
    values = [(name, value) for result in results if result for name, value in result.items()]
    if not values:
        return results
    # one check and one host sync for all terms; names are looked up only on failure
    finite = torch.isfinite(torch.stack([v.detach().float().sum() for _, v in values])).all()
    if not bool(finite):
        for name, value in values:
            if not torch.isfinite(value.detach()).all():
                raise kdhooks.LossError(name, ctx.step, float(value.detach().float().sum()))
    return results
