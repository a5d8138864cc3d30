"""Taps: what a plugin asks to record, and the hooks that record it."""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ._errors import ConfigError, did_you_mean

TAP_KINDS = ("output", "input", "param", "grad", "attention")
POLICIES = ("first", "last", "all")

# segments that DDP, FSDP, torch.compile and activation checkpointing insert into paths
_WRAPPER_SEGMENTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# the prefix a PEFT model (PeftModel → LoraModel → the user's model) puts before the user's paths: one
# two-segment wrapper, at the start only (after any of the segments above), since `model` alone is a real name
_PREFIX_WRAPPERS = (("base_model", "model"),)


@dataclass(frozen=True)
class Tap:
    """One thing to record: a model role, a module path and a kind.

    ``path`` is a module path as ``named_modules()`` prints it, optionally
    followed by ``:``-separated selectors into the output (a tuple index or a
    dict/ModelOutput key): ``layer3``, ``encoder.layer.3:0``, ``:logits``.
    The empty path is the model's own output; ``logits`` is the model's output
    with the logits picked out of a tuple, dict or ModelOutput. For ``grad``
    taps the empty path is the model's input. ``policy`` says what a module
    called several times in one forward leaves: its ``first`` or ``last`` call,
    or ``all`` calls as a list. ``clone`` records a copy, which an in-place op
    later in the forward cannot change (one copy of the tensor per step).
    """

    role: str
    path: str = ""
    kind: str = "output"
    policy: str = "last"
    option: str | None = field(default=None, compare=False)
    clone: bool = False

    def __hash__(self) -> int:
        # taps key the captures: hashed several times a step, so once per tap
        try:
            return self.__dict__["_hash"]
        except KeyError:
            value = self.__dict__["_hash"] = hash((self.role, self.path, self.kind, self.policy, self.clone))
            return value

    def __getstate__(self) -> dict[str, Any]:
        # string hashes differ between processes: a pickled tap recomputes its own
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def __post_init__(self) -> None:
        if self.kind not in TAP_KINDS:
            raise ConfigError("tap", f"unknown tap kind {self.kind!r}", value=self.kind,
                              fix=did_you_mean(self.kind, TAP_KINDS) or f"use one of {TAP_KINDS}")
        if self.policy not in POLICIES:
            raise ConfigError("tap", f"unknown capture policy {self.policy!r}", value=self.policy,
                              fix=f"use one of {POLICIES}")

    # cached: the recording hooks read these on every call (a frozen dataclass still has a __dict__)
    @cached_property
    def module_path(self) -> str:
        path = self.path.split(":", 1)[0]
        return "" if path == "logits" else path

    @cached_property
    def selectors(self) -> tuple[str, ...]:
        parts = self.path.split(":")
        return tuple(p for p in parts[1:] if p)

    @cached_property
    def wants_logits(self) -> bool:
        return self.path.split(":", 1)[0] == "logits"


def _wrapper_units(parts: list[str]) -> list[tuple[int, ...]]:
    """The positions of the wrapper segments in a path, each wrapper a unit: ``module`` one, PEFT's prefix two."""
    units = [(i,) for i, p in enumerate(parts) if p in _WRAPPER_SEGMENTS]
    start = 0
    while start < len(parts) and parts[start] in _WRAPPER_SEGMENTS:
        start += 1
    for prefix in _PREFIX_WRAPPERS:
        if tuple(parts[start:start + len(prefix)]) == prefix:
            units.append(tuple(range(start, start + len(prefix))))
    return units


def clean_path(name: str) -> str:
    """A module path with the segments added by DDP/FSDP/compile/PEFT wrappers removed."""
    parts = name.split(".")
    removed = {i for unit in _wrapper_units(parts) for i in unit}
    return ".".join(p for i, p in enumerate(parts) if i not in removed)


def _unwrappings(name: str) -> list[tuple[str, int]]:
    """Each path that ``name`` gives with some of its wrappers removed, with how many were removed.

    Some, not only all: in a DDP-wrapped model the user's own ``a.module.b`` is ``module.a.module.b``.
    A wrapper is a segment (``module``) or PEFT's ``base_model.model`` prefix, which counts as one.
    """
    parts = name.split(".")
    units = _wrapper_units(parts)
    # a path with many wrapper segments (nested FSDP units) is offered with all of them removed only
    subsets = ([tuple(units)] if len(units) > 4 else
               [c for r in range(1, len(units) + 1) for c in itertools.combinations(units, r)])
    return [(".".join(p for i, p in enumerate(parts) if not any(i in unit for unit in removed)), len(removed))
            for removed in subsets]


def _unwrapped(named: list[tuple[str, Any]]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Each exact path, then each unwrapped path (wrapper segments removed) that no exact path takes.

    Among paths that unwrap to the same name, the one with the fewest removed segments wins:
    in a DDP-wrapped model with both ``a.b`` and ``a.module.b``, ``a.b`` is ``module.a.b``
    (one segment removed), not ``module.a.module.b`` (two). Different objects tied at the same
    count are ambiguous: returned apart with their exact paths, so that resolving such a name is an error.
    """
    table: dict[str, Any] = dict(named)
    removed: dict[str, int] = dict.fromkeys(table, 0)
    origins: dict[str, list[str]] = {}
    ambiguous: dict[str, list[str]] = {}
    for name, obj in named:
        for clean, count in _unwrappings(name):
            if clean not in removed or count < removed[clean]:
                table[clean], removed[clean], origins[clean] = obj, count, [name]
                ambiguous.pop(clean, None)
            elif count == removed[clean] and table[clean] is not obj and clean in origins:
                origins[clean].append(name)
                ambiguous[clean] = origins[clean]
    return table, ambiguous


def module_table(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` by its exact path, and by its unwrapped path (the user's names) where not taken."""
    return _unwrapped(list(model.named_modules(remove_duplicate=False)))[0]


def parameter_table(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter by its exact path, then by its unwrapped path where that is not taken."""
    return _unwrapped(list(model.named_parameters(remove_duplicate=False)))[0]


def _resolve(named: list[tuple[str, Any]], path: str, kind: str, role: str, location: str, fix: str) -> Any:
    table, ambiguous = _unwrapped(named)
    if path in ambiguous:
        raise ConfigError(location, f"{path!r} names several {kind}s of the {role} once wrapper segments are "
                          f"removed: {', '.join(repr(n) for n in ambiguous[path])}", value=path,
                          fix="write the exact path, as named_modules() prints it")
    if path in table:
        return table[path]
    raise ConfigError(location, f"{path!r} is not a {kind} of the {role}", value=path,
                      fix=did_you_mean(path, table) or fix)


def resolve_module(model: nn.Module, path: str, *, role: str, location: str) -> nn.Module:
    """The module at ``path`` of ``model``; a ConfigError with the closest paths otherwise.

    An exact path wins over one that matches only with wrapper segments removed, so
    ``a.b`` never records ``a.module.b`` and a real submodule named ``module`` is tappable.
    """
    return _resolve(list(model.named_modules(remove_duplicate=False)), path, "module", role, location,
                    "run `kdhooks inspect` to list the module paths")


def resolve_parameter(model: nn.Module, path: str, *, role: str, location: str) -> nn.Parameter:
    return _resolve(list(model.named_parameters(remove_duplicate=False)), path, "parameter", role, location,
                    "list them with model.named_parameters()")


def select(value: Any, selectors: tuple[str, ...]) -> Any:
    """Follow tuple indices and dict/ModelOutput keys into a module's output.

    Selectors index containers only: on a tensor ``:0`` would pick sample 0, so it is an error.
    """
    for selector in selectors:
        if isinstance(value, torch.Tensor):
            raise TypeError(f"selector {selector!r} applies to a tuple, list, dict or ModelOutput; here it meets "
                            f"a tensor of shape {tuple(value.shape)} (indexing it would pick a sample, not an "
                            f"output): remove ':{selector}' from the path")
        if selector.lstrip("-").isdigit():
            if isinstance(value, Mapping) and not isinstance(value, (tuple, list)) and not hasattr(value, "to_tuple"):
                value = list(value.values())[int(selector)]
            else:
                value = value[int(selector)]
        elif isinstance(value, Mapping) or hasattr(value, "keys"):
            value = value[selector]
        else:
            value = getattr(value, selector)
    return value


def logits_of(output: Any) -> Any:
    """The logits in a model's output: the tensor itself, its ``logits`` entry or its first item."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        if "logits" in output.keys():
            return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


def shape_of(value: Any) -> tuple[int, ...] | list | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [shape_of(v) for v in value]
    return None


def to_dtype_shape_str(shape: Any) -> str:
    if isinstance(shape, tuple):
        return "(" + ", ".join(str(s) for s in shape) + ")"
    return str(shape)


def use_eager_attention(model: nn.Module, location: str, role: str = "student") -> Callable[[], None] | None:
    """Switch a HF model to eager attention, the one that returns probabilities; returns the undo.

    The warning names the model by its role: with a teacher and a student of one
    family, "this model" would not say which of the two changed."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager"):
        return None
    cannot = ConfigError(location, f"attention taps need attention probabilities, which {current!r} "
                         f"attention does not return, and the {role} cannot be switched to 'eager'",
                         value=current, fix="load the model with attn_implementation='eager'")
    if not hasattr(model, "set_attn_implementation"):
        raise cannot
    who = "the student" if role == "student" else "the teacher" if role == "teacher" else f"the model {role!r}"
    warnings.warn(f"{location}: attention taps need attention probabilities, which {current!r} attention does "
                  f"not return; switching {who} ({type(model).__name__}) to 'eager' attention until close() "
                  f"(load it with attn_implementation='eager' to silence this)", stacklevel=3)
    model.set_attn_implementation("eager")
    if getattr(model.config, "_attn_implementation", None) != "eager":
        # transformers only logs when a model does not support switching
        raise cannot
    return lambda: model.set_attn_implementation(current)
