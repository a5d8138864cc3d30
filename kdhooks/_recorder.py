"""The hooks that record taps, and nothing else.

Recording is switched on per role: for the student only inside a training
forward of its root (so activation checkpointing, which re-runs forwards
during backward, cannot overwrite a capture), for a teacher or peer only while
the Distiller runs it. Every capture remembers its tensors' version counters,
so a capture that an in-place op changed after it was recorded is refused
when it is read instead of silently giving the changed values.
"""
from __future__ import annotations

import functools
import logging
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._errors import ConfigError
from ._taps import Tap, logits_of, select

# forwards of the student kept before one kd(...) call: more means kd(...) is not being called
_MANY_FORWARDS = 8


def detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # a frozen teacher's outputs under no_grad have no graph to cut: skip the op
        return value.detach() if value.requires_grad else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(detached(v) for v in value)
    if isinstance(value, Mapping):
        return {k: detached(v) for k, v in value.items()}
    return value


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_cloned(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _cloned(v) for k, v in value.items()}
    return value


def _versions(value: Any) -> Any:
    """The version counters of the tensors in a capture (a tuple's first level included)."""
    if isinstance(value, torch.Tensor):
        return _version(value)
    if isinstance(value, (list, tuple)):
        return tuple(_version(v) if isinstance(v, torch.Tensor) else None for v in value)
    return None


def _version(tensor: torch.Tensor) -> int | None:
    # tensors made under torch.inference_mode have no version counter (and cannot be changed in place outside it)
    return None if tensor.is_inference() else tensor._version


@dataclass(frozen=True)
class Recorded:
    """A teacher's captures by tap, given by a ``kdhooks_teacher_forward`` plugin (a cache) instead of its output.

    The Distiller records each as if the teacher had run and recorded it.
    """

    captures: Mapping[Tap, Any]


class Calls(list):
    """Every call's capture of a module called several times in one forward (``calls: all``)."""


class TapError(ConfigError, LookupError):
    """A selector that does not fit the recorded output; carries the tap.

    A ConfigError: the dry pass re-raises it at the tap's config location, and without
    a dry pass it leaves the first training forward from a hook, naming the tap and the fix.
    """

    def __init__(self, tap: Tap, reason: str = "", fix: str | None = None):
        self.tap = tap
        super().__init__(f"the {tap.role}'s tap {tap.path!r}",
                         f"cannot select {tap.path!r} from the {tap.role}'s output" + (f": {reason}" if reason else ""),
                         value=tap.path, fix=fix or "selectors after ':' index the tuple, list, dict or ModelOutput "
                         "a module returns; check them against the module's output (`kdhooks inspect`)")


class CaptureError(RuntimeError):
    """A capture that does not hold what its module returned; carries the tap, the problem and the fix."""

    def __init__(self, tap: Tap, problem: str, fix: str, *, in_place: bool = False):
        self.tap = tap
        self.problem = problem
        self.fix = fix
        self.in_place = in_place  # the capture changed after it was recorded: the message names the ops
        super().__init__(f"{problem}\n  fix: {fix}")


class model_hook:  # noqa: N801 (used like a function: ``module.register_forward_hook(model_hook(fn))``)
    """A hook for the user's model that stays behind in copies of it, doing nothing.

    ``copy.deepcopy(model)`` (an EMA or SWA average, a born-again teacher) and
    ``torch.save(model)`` copy a module's hooks; the copy is not the model being
    distilled, so there the hook becomes one that returns None, which changes
    nothing. Pickled, it is made of the standard library only, so a model saved
    while attached loads where kdhooks is not installed. ``weak=True`` holds a
    bound method weakly: hooks then do not keep a Distiller alive.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any], weak: bool = False) -> None:
        self.fn = _weak(weakref.WeakMethod(fn)) if weak else fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _inert

    def __reduce__(self) -> tuple:
        # Logger.log at level 0 never emits: logging.disable's default level 0 is >= 0
        return functools.partial, (logging.getLogger("kdhooks.inert").log, 0)


def _weak(method: weakref.WeakMethod) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        fn = method()
        return None if fn is None else fn(*args, **kwargs)
    return call


def _inert(*args: Any, **kwargs: Any) -> None:
    return None


class Recorder:
    """Installs forward hooks for taps and keeps the captures of the forwards before one step."""

    def __init__(self) -> None:
        self.captures: dict[Tap, Any] = {}
        self.versions: dict[Tap, Any] = {}
        self.recording: dict[str, bool] = defaultdict(bool)
        self.with_grad: dict[str, bool] = defaultdict(bool)
        self.handles: list[RemovableHandle] = []
        self.root_outputs: dict[str, Callable[[nn.Module, tuple, Any], Any]] = {}
        # captures of a detached role kept in the graph: a frozen teacher's output for its dL/dx
        self.keep_graph: set[Tap] = set()
        # student captures recorded under no_grad inside a forward that had grad (reentrant checkpointing)
        self.no_graph: set[Tap] = set()
        # earlier forwards of this step: (captures, versions, no_graph) each; forwards that recorded nothing
        # are only counted (a tap recorded in some forwards but not in these is refused at the step)
        self.earlier: list[tuple[dict, dict, set]] = []
        self.empty_forwards = 0
        self.started = False
        # the dry pass counts every call of a tapped module and keeps each call's capture
        self.counting = False
        self.calls: dict[Tap, list[Any]] = defaultdict(list)
        self._warned_many = False

    def store(self, tap: Tap, value: Any, detach: bool, role: str) -> None:
        if detach:
            value = detached(value)
        if self.counting:
            self.calls[tap].append(value)
        if not detach and self.with_grad[role] and not torch.is_grad_enabled():
            # a forward with grad whose segment runs under no_grad: reentrant activation checkpointing
            self.no_graph.add(tap)
        if tap.clone:
            value = _cloned(value)
        if tap.policy == "all":
            self.captures.setdefault(tap, Calls()).append(value)
            self.versions.setdefault(tap, []).append(_versions(value))
        elif tap.policy == "first" and tap in self.captures:
            return
        else:
            self.captures[tap] = value
            self.versions[tap] = _versions(value)

    def begin_forward(self) -> None:
        """A new student forward: the captures of an earlier one (no kd(...) since) are kept, to be concatenated."""
        if not self.started:
            self.started = True
            return
        if not self.captures:
            self.empty_forwards += 1
            return
        self.earlier.append((self.captures, self.versions, self.no_graph))
        self.captures, self.versions, self.no_graph = {}, {}, set()
        if len(self.earlier) >= _MANY_FORWARDS and not self._warned_many:
            self._warned_many = True
            warnings.warn(f"{len(self.earlier) + 1} training forwards of the student without a kd(...) call: "
                          f"their captures are all kept, to be concatenated along the batch at the next kd(...); "
                          f"call kd(...) after each forward you train on, or put the student in eval mode for "
                          f"the others", RuntimeWarning, stacklevel=4)

    def verify(self, tap: Tap, value: Any, versions: Any, no_graph: set[Tap]) -> None:
        """A CaptureError if ``value`` changed in place since it was recorded, or was recorded without its graph."""
        if tap in no_graph:
            raise CaptureError(tap, f"the {tap.role}'s {tap.path!r} was recorded under no_grad inside a forward "
                               f"with grad: it is inside reentrant activation checkpointing "
                               f"(torch.utils.checkpoint with use_reentrant=True), so a loss on it trains nothing",
                               "checkpoint with use_reentrant=False (HF: gradient_checkpointing_kwargs="
                               "{'use_reentrant': False}), or tap a module outside the checkpointed segment")
        now = [_versions(v) for v in value] if isinstance(value, Calls) else _versions(value)
        if now != versions:
            raise CaptureError(tap, f"the {tap.role}'s {tap.path or '(output)'!r} was modified in place after it "
                               f"was recorded (an in-place op later in the forward, such as `out += identity` or "
                               f"ReLU(inplace=True), changed the tensor), so the loss would see other values than "
                               f"the module returned", "set `clone: true` on the term (one copy of the tensor per "
                               "step), or tap the module whose output is not changed in place", in_place=True)

    def merged(self) -> None:
        """Check every forward's captures, then concatenate those of several forwards along the batch."""
        forwards = [*self.earlier, (self.captures, self.versions, self.no_graph)]
        for captures, versions, no_graph in forwards:
            for tap, value in captures.items():
                self.verify(tap, value, versions[tap], no_graph)
        if not self.earlier and not self.empty_forwards:
            return
        merged: dict[Tap, Any] = {}
        count = len(forwards) + self.empty_forwards
        # every tap of every forward: one recorded in an earlier forward only must not vanish silently
        for tap in dict.fromkeys(tap for captures, _, _ in forwards for tap in captures):
            values = [captures.get(tap, _MISSING) for captures, _, _ in forwards]
            if self.empty_forwards or any(v is _MISSING for v in values):
                raise CaptureError(tap, f"the {tap.role}'s {tap.path!r} was recorded in only some of the "
                                   f"{count} forwards before this kd(...)",
                                   "call kd(...) after each forward, or run the same model path in each")
            if tap.kind == "grad":
                raise CaptureError(tap, f"a gradient tap on the {tap.role} needs one forward per kd(...) call; "
                                   f"there were {count}", "call kd(task_loss, ...) after each forward")
            try:
                merged[tap] = _concatenated(values)
            except ValueError as error:
                raise CaptureError(tap, f"the {count} forwards before this kd(...) gave captures of the "
                                   f"{tap.role}'s {tap.path or '(output)'!r} that cannot be concatenated along "
                                   f"the batch: {error}", "call kd(...) after each forward") from None
        self.captures, self.versions = merged, {tap: _version_list(v) for tap, v in merged.items()}
        self.no_graph, self.earlier, self.empty_forwards = set(), [], 0

    def install(self, role: str, modules: dict[Tap, nn.Module], *, detach: bool, root: nn.Module | None = None) -> None:
        """Hook every module that a tap of ``role`` names, one hook per module.

        The output hook of ``root`` (the model itself) is also kept, so that an
        output a plugin returns instead of running the model is recorded as the model's.
        """
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
            hook = self._output_hook(role, taps, detach)
            if module is root:
                self.root_outputs[role] = hook
            # prepend: on the model's root, recording must happen before the Distiller switches it off
            self.handles.append(module.register_forward_hook(model_hook(hook), prepend=True))

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
                    self.store(tap, x, detach=False, role=role)
                    continue
                if not tap.selectors:
                    value = args[0] if args else next(iter(kwargs.values()))
                else:
                    head, rest = tap.selectors[0], tap.selectors[1:]
                    try:
                        value = args[int(head)] if head.lstrip("-").isdigit() else kwargs[head]
                        value = select(value, rest)
                    except (LookupError, AttributeError, TypeError) as error:
                        raise TapError(tap, str(error)) from error
                self.store(tap, value, detach, role)
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
                    raise TapError(tap, str(error)) from error
                if tap.wants_logits:
                    value = logits_of(value)
                    if value is None or hasattr(value, "keys"):
                        raise TapError(tap, f"this {type(output).__name__} holds no logits (a fused LM head, as in "
                                       f"TRL's SFTTrainer, never builds them); lm_kd can form them from the "
                                       f"hidden states: set student_head and student_hidden",
                                       fix="for lm_kd set student_head: lm_head and student_hidden (its backbone)")
                if tap.kind == "attention" and not tap.selectors and isinstance(value, (tuple, list)):
                    # attention modules return (output, probabilities, ...)
                    value = value[1] if len(value) > 1 else None
                self.store(tap, value, detach and tap.kind != "grad" and tap not in self.keep_graph, role)
            return replaced
        return hook

    def _need_weights_hook(self, role: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if not self.recording[role]:
                return None
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}
        return hook

    def set_aside(self) -> tuple:
        """Take out the captures of the forwards so far (a training step not yet given to kd(...)), and start
        empty; ``put_back`` restores them. Evaluation records its own batches in between."""
        state = (self.captures, self.versions, self.no_graph, self.earlier, self.empty_forwards, self.started,
                 dict(self.recording), dict(self.with_grad))
        self.captures, self.versions, self.no_graph, self.earlier = {}, {}, set(), []
        self.empty_forwards, self.started = 0, False
        return state

    def put_back(self, state: tuple) -> None:
        (self.captures, self.versions, self.no_graph, self.earlier, self.empty_forwards, self.started,
         recording, with_grad) = state
        for flags, saved in ((self.recording, recording), (self.with_grad, with_grad)):
            flags.clear()
            flags.update(saved)

    def clear(self) -> None:
        self.captures.clear()
        self.versions.clear()
        self.no_graph.clear()
        self.earlier.clear()
        self.empty_forwards, self.started = 0, False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.root_outputs.clear()
        self.clear()


_MISSING = object()


def _version_list(value: Any) -> Any:
    return [_versions(v) for v in value] if isinstance(value, Calls) else _versions(value)


def _concatenated(values: list[Any]) -> Any:
    """Captures of several forwards as one: tensors concatenated along the batch, containers element by element."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) and v.dim() == first.dim() for v in values):
            raise ValueError("tensors of different ranks")
        if first.dim() == 0:
            return torch.stack(values)
        if any(v.shape[1:] != first.shape[1:] for v in values):
            raise ValueError(f"shapes {[tuple(v.shape) for v in values]} differ beyond the batch dimension")
        return torch.cat(values)
    if first is None:
        if any(v is not None for v in values):
            raise ValueError("some forwards gave None, others a value")
        return None
    if isinstance(first, (list, tuple)):
        if any(type(v) is not type(first) or len(v) != len(first) for v in values):
            raise ValueError("outputs of different structure")
        parts = [_concatenated(list(column)) for column in zip(*values)]
        return Calls(parts) if isinstance(first, Calls) else type(first)(*parts) if hasattr(first, "_fields") \
            else type(first)(parts)
    if isinstance(first, Mapping):
        if any(not isinstance(v, Mapping) or list(v.keys()) != list(first.keys()) for v in values):
            raise ValueError("outputs with different keys")
        parts = {key: _concatenated([v[key] for v in values]) for key in first.keys()}
        try:
            return type(first)(**parts)
        except TypeError:
            return parts
    raise ValueError(f"a {type(first).__name__} is not a tensor or a container of tensors")
