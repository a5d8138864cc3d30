"""What a loss hook sees: this step's captures, the step's extras, the step."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ._recorder import detached
from ._taps import Tap, logits_of

if TYPE_CHECKING:
    from ._distiller import Distiller


def default_teacher_loss(teacher_output: Any, extras: dict[str, Any]) -> torch.Tensor:
    """Cross-entropy of the teacher's logits on ``labels``: the loss of its dL/dx."""
    return F.cross_entropy(logits_of(teacher_output), extras["labels"])


class LossContext:
    """Captures by tap, plus ``task_loss``, ``extras`` (e.g. ``labels``) and ``step``.

    ``evaluating`` is True inside ``Distiller.evaluating()``: the values are
    reported, not trained on, and a term keeps no state from them.
    """

    def __init__(self, distiller: Distiller, task_loss: torch.Tensor | None, extras: dict[str, Any],
                 evaluating: bool = False):
        self.distiller = distiller
        self.task_loss = task_loss
        self.extras = extras
        self.step = distiller.step
        self.evaluating = evaluating
        self._grads: dict[Tap, torch.Tensor] = {}
        # each term's value before its weight, by part name (the core's Term fills it)
        self._raw: dict[str, torch.Tensor] = {}

    @property
    def labels(self) -> Any:
        return self.extras.get("labels")

    def __getitem__(self, tap: Tap) -> Any:
        if tap.kind == "param":
            return self.distiller.parameter_of(tap)
        captures = self.distiller.captures
        if tap not in captures:
            raise KeyError(f"nothing was recorded for {tap}: was the {tap.role} run in training "
                           f"mode on this step's inputs before the loss was asked for?")
        if tap.kind == "grad":
            return self._gradient(tap, captures[tap])
        if tap.kind == "attention" and captures[tap] is None:
            # SDPA/flash attention return None with at most a warning: never train on nothing
            raise ValueError(f"the {tap.role}'s {tap.module_path!r} returned no attention probabilities: "
                             f"its attention implementation computes none; use attn_implementation='eager'")
        if tap in self.distiller._recorder.keep_graph:
            return detached(captures[tap])  # kept in the graph for a gradient only
        return captures[tap]

    def _gradient(self, tap: Tap, tensor: torch.Tensor) -> torch.Tensor:
        """dL/dx for a grad tap; the student's keeps its graph (double backprop)."""
        if tap in self._grads:
            return self._grads[tap]
        if self.distiller.is_trainable(tap.role):
            if self.task_loss is None:
                raise ValueError(f"a grad tap on the {tap.role} needs the task loss: call kd(task_loss, ...)")
            (grad,) = torch.autograd.grad(self.task_loss, tensor, create_graph=True, retain_graph=True)
        else:
            output = self.distiller.captures[Tap(tap.role, "", "output")]
            loss = self.distiller.teacher_loss(output, self.extras)
            # retained: another grad tap of this model may still need the graph this step
            (grad,) = torch.autograd.grad(loss, tensor, retain_graph=True)
            grad = grad.detach()
        self._grads[tap] = grad
        return grad

    def log(self, name: str, value: float | torch.Tensor) -> None:
        """Report a metric (not a loss) for this step, e.g. a disagreement rate."""
        self.distiller.last_metrics[name] = value.detach() if isinstance(value, torch.Tensor) else value
