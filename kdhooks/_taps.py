"""Taps: what a plugin asks to record, and the hooks that record it."""
from __future__ import annotations

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


def clean_path(name: str) -> str:
    """A module path with the segments added by DDP/FSDP/compile wrappers removed."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def module_table(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` by its exact path, and by its unwrapped path (the user's names) where not taken."""
    named = list(model.named_modules(remove_duplicate=False))
    table: dict[str, nn.Module] = dict(named)
    for name, module in named:
        table.setdefault(clean_path(name), module)
    return table


def parameter_table(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter by its exact path, then by its unwrapped path where that is not taken."""
    named = list(model.named_parameters(remove_duplicate=False))
    table: dict[str, nn.Parameter] = dict(named)
    for name, param in named:
        table.setdefault(clean_path(name), param)
    return table


def resolve_module(model: nn.Module, path: str, *, role: str, location: str) -> nn.Module:
    """The module at ``path`` of ``model``; a ConfigError with the closest paths otherwise.

    An exact path wins over one that matches only with wrapper segments removed, so
    ``a.b`` never records ``a.module.b`` and a real submodule named ``module`` is tappable.
    """
    table = module_table(model)
    if path in table:
        return table[path]
    # 'logits' names the output unless the model has a module of that name
    raise ConfigError(location, f"{path!r} is not a module of the {role}", value=path,
                      fix=did_you_mean(path, table) or "run `kdhooks inspect` to list the module paths")


def resolve_parameter(model: nn.Module, path: str, *, role: str, location: str) -> nn.Parameter:
    table = parameter_table(model)
    if path in table:
        return table[path]
    raise ConfigError(location, f"{path!r} is not a parameter of the {role}", value=path,
                      fix=did_you_mean(path, table) or "list them with model.named_parameters()")


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


def use_eager_attention(model: nn.Module, location: str) -> Callable[[], None] | None:
    """Switch a HF model to eager attention, the one that returns probabilities; returns the undo."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager"):
        return None
    cannot = ConfigError(location, f"attention taps need attention probabilities, which {current!r} "
                         f"attention does not return, and this model cannot be switched to 'eager'",
                         value=current, fix="load the model with attn_implementation='eager'")
    if not hasattr(model, "set_attn_implementation"):
        raise cannot
    warnings.warn(f"{location}: attention taps need attention probabilities, which "
                  f"{current!r} attention does not return; switching this model to 'eager' "
                  f"until close()", stacklevel=3)
    model.set_attn_implementation("eager")
    if getattr(model.config, "_attn_implementation", None) != "eager":
        # transformers only logs when a model does not support switching
        raise cannot
    return lambda: model.set_attn_implementation(current)
