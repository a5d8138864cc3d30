"""Precision: features and the modules that read them meet in one dtype.

Under autocast a student's features come out in bf16 or fp16. A connector
called outside autocast, or a teacher kept in a lower precision than its
inputs, would otherwise fail on the dtype mismatch (``Input type (BFloat16)
and weight type (Float) should be the same``). Loss formulas cast to float32
themselves; these helpers cover the modules in between.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def first_floating_parameter(module: nn.Module) -> torch.Tensor | None:
    """The module's first floating-point parameter (its own first: cheaper than ``parameters()``)."""
    for param in module._parameters.values():
        if param is not None and param.is_floating_point():
            return param
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def floating_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter (None if it has none)."""
    param = first_floating_parameter(module)
    return None if param is None else param.dtype


def cast_floats(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` with every floating-point tensor in it (tuples, lists, dicts) cast to ``dtype``."""
    if dtype is None or not _has_other_floats(value, dtype):
        return value  # the common case: nothing to cast, nothing rebuilt
    return _cast(value, dtype)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, Mapping):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _has_other_floats(value: Any, dtype: torch.dtype) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype != dtype and value.is_floating_point()
    if isinstance(value, (list, tuple)):
        return any(_has_other_floats(v, dtype) for v in value)
    if isinstance(value, Mapping):
        return any(_has_other_floats(v, dtype) for v in value.values())
    return False


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def inputs_in_parameter_dtype(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: outside autocast, a module computes in its parameters' dtype.

    Under autocast the inputs are left alone: autocast itself picks each op's dtype.
    """
    param = first_floating_parameter(module)
    if param is None or _autocast_on(param.device.type):
        return None
    return cast_floats(args, param.dtype), cast_floats(kwargs, param.dtype)
