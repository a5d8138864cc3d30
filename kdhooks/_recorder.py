"""The hooks that record taps, and nothing else.

Recording is switched on per role: for the student only inside a training
forward of its root (so activation checkpointing, which re-runs forwards
during backward, cannot overwrite a capture), for a teacher or peer only while
the Distiller runs it.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._taps import Tap, logits_of, select


def detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # a frozen teacher's outputs under no_grad have no graph to cut: skip the op
        return value.detach() if value.requires_grad else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(detached(v) for v in value)
    if isinstance(value, Mapping):
        return {k: detached(v) for k, v in value.items()}
    return value


class TapError(LookupError):
    """A selector that does not fit the recorded output; carries the tap."""

    def __init__(self, tap: Tap, reason: str = ""):
        self.tap = tap
        super().__init__(f"cannot select {tap.path!r} from the {tap.role}'s output" + (f": {reason}" if reason else ""))


class model_hook:  # noqa: N801 (used like a function: ``module.register_forward_hook(model_hook(fn))``)
    """A hook for the user's model that stays behind in copies of it, doing nothing.

    ``copy.deepcopy(model)`` (an EMA or SWA average, a born-again teacher) and
    ``torch.save(model)`` copy a module's hooks; the copy is not the model being
    distilled, so there the hook becomes one that returns None, which changes nothing.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _inert

    def __reduce__(self) -> tuple:
        return _inert_hook, ()


def _inert(*args: Any, **kwargs: Any) -> None:
    return None


def _inert_hook() -> Callable[..., None]:
    return _inert


class Recorder:
    """Installs forward hooks for taps and keeps one step's captures."""

    def __init__(self) -> None:
        self.captures: dict[Tap, Any] = {}
        self.recording: dict[str, bool] = defaultdict(bool)
        self.handles: list[RemovableHandle] = []
        # captures of a detached role kept in the graph: a frozen teacher's output for its dL/dx
        self.keep_graph: set[Tap] = set()

    def store(self, tap: Tap, value: Any, detach: bool) -> None:
        if detach:
            value = detached(value)
        if tap.policy == "all":
            self.captures.setdefault(tap, []).append(value)
        else:
            self.captures[tap] = value

    def install(self, role: str, modules: dict[Tap, nn.Module], *, detach: bool,
                input_requires_grad: bool = False) -> None:
        """Hook every module that a tap of ``role`` names, one hook per module."""
        outputs: dict[nn.Module, list[Tap]] = defaultdict(list)
        inputs: dict[nn.Module, list[Tap]] = defaultdict(list)
        for tap, module in modules.items():
            if tap.kind == "input" or (tap.kind == "grad" and tap.module_path == ""):
                inputs[module].append(tap)
            elif tap.kind in ("output", "grad", "attention"):
                outputs[module].append(tap)
        for module, taps in inputs.items():
            self.handles.append(module.register_forward_pre_hook(
                model_hook(self._input_hook(role, taps, detach)), with_kwargs=True))
        for module, taps in outputs.items():
            if any(t.kind == "attention" for t in taps) and isinstance(module, nn.MultiheadAttention):
                self.handles.append(module.register_forward_pre_hook(
                    model_hook(self._need_weights_hook(role)), with_kwargs=True))
            # prepend: on the model's root, recording must happen before the Distiller switches it off
            self.handles.append(module.register_forward_hook(
                model_hook(self._output_hook(role, taps, detach)), prepend=True))

    def _input_hook(self, role: str, taps: list[Tap], detach: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if not self.recording[role]:
                return None
            changed = None
            for tap in taps:
                if tap.kind == "grad":
                    # dL/dx needs x in the graph: a leaf copy of the input that requires grad
                    x = args[0]
                    if not x.requires_grad:
                        x = x.detach().requires_grad_(True)
                        changed = ((x, *args[1:]), kwargs)
                        args = changed[0]
                    self.store(tap, x, detach=False)
                    continue
                if not tap.selectors:
                    value = args[0] if args else next(iter(kwargs.values()))
                else:
                    head, rest = tap.selectors[0], tap.selectors[1:]
                    try:
                        value = args[int(head)] if head.lstrip("-").isdigit() else kwargs[head]
                        value = select(value, rest)
                    except (LookupError, AttributeError, TypeError) as error:
                        raise TapError(tap) from error
                self.store(tap, value, detach)
            return changed
        return hook

    def _output_hook(self, role: str, taps: list[Tap], detach: bool):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self.recording[role]:
                return None
            replaced = None
            for tap in taps:
                if (tap.kind == "grad" and not tap.selectors and isinstance(output, torch.Tensor)
                        and not output.requires_grad and torch.is_grad_enabled()):
                    # a frozen model has no graph up to here: dL/d(output) needs the output as a leaf
                    output = replaced = output.detach().requires_grad_(True)
                try:
                    value = select(output, tap.selectors)
                except (LookupError, AttributeError, TypeError) as error:
                    raise TapError(tap) from error
                if tap.wants_logits:
                    value = logits_of(value)
                    if value is None or hasattr(value, "keys"):
                        raise TapError(tap, f"this {type(output).__name__} holds no logits (a fused LM head, as in "
                                       f"TRL's SFTTrainer, never builds them); lm_kd can form them from the "
                                       f"hidden states: set student_head and student_hidden")
                if tap.kind == "attention" and not tap.selectors and isinstance(value, (tuple, list)):
                    # attention modules return (output, probabilities, ...)
                    value = value[1] if len(value) > 1 else None
                self.store(tap, value, detach=detach and tap.kind != "grad" and tap not in self.keep_graph)
            return replaced
        return hook

    def _need_weights_hook(self, role: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if not self.recording[role]:
                return None
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}
        return hook

    def clear(self) -> None:
        self.captures.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.captures.clear()
