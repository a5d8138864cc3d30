"""The loss meter integrations log from: running means of a Distiller's parts over the steps since a reset."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ._distiller import Distiller


class LossMeter:
    """Means of each loss part (``task``, every term, ``total``) and scalar metric over the steps added.

    ``means()`` gives the parts as they are added into the loss (weighted);
    ``raw_means()`` each term's value before its weight (``last_raw_losses``).

    An integration adds every step and reads the means where its loop logs:
    at the end of an update (its micro-batches averaged) or every N steps.
    Reading ``last_losses`` moves values to the host, so add only where the
    means are logged (the main process).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.raw_sums: dict[str, float] = {}
        self.raw_steps: dict[str, int] = {}  # a term with weight 0 is not computed: counted where it was
        self.steps = 0

    def add(self, distiller: Distiller) -> None:
        """Count ``distiller``'s last step."""
        for name, value in {**distiller.last_losses, **scalars(distiller.last_metrics)}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        for name, value in distiller.last_raw_losses.items():
            self.raw_sums[name] = self.raw_sums.get(name, 0.0) + value
            self.raw_steps[name] = self.raw_steps.get(name, 0) + 1
        self.steps += 1

    def means(self) -> dict[str, float]:
        """Each part's mean over the steps added since the last reset (empty if none)."""
        return {name: total / self.steps for name, total in self.sums.items()} if self.steps else {}

    def raw_means(self) -> dict[str, float]:
        """Each term's unweighted mean over the steps added since the last reset (a term with weight 0 at a step
        is not computed there, so its raw mean is over the steps where it was)."""
        return {name: total / self.raw_steps[name] for name, total in self.raw_sums.items()}

    def reset(self) -> None:
        self.sums, self.raw_sums, self.raw_steps, self.steps = {}, {}, {}, 0


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that are one number each, as floats."""
    return {name: float(value) for name, value in metrics.items()
            if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)}
