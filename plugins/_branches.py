"""A model's head run as several branches side by side, by hooks on the model (ONE's multi-branch student).

After the ``split`` module the trunk's output is repeated once per branch along
the batch; every head module runs its own slice (branch 0 on the module
itself, branch b on its b-th copy) and the slices are joined again, so the
model's own code between the head modules runs once on all branches; the
model's output is cut back to branch 0. That code must treat samples
independently (pooling, flattening and reshapes do).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

import kdhooks

Finish = Callable[[torch.Tensor, torch.Tensor, bool], "torch.Tensor | None"]


def _map(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor in a (nested) tuple, list, dict or ModelOutput."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, Mapping):
        mapped = copy.copy(value)
        for key, item in value.items():
            mapped[key] = _map(item, fn)
        return mapped
    return value


def _cat(outputs: list[Any]) -> Any:
    """The branches' outputs joined along the batch, structure kept."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)):
        joined = [_cat([o[i] for o in outputs]) for i in range(len(first))]
        return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)
    if isinstance(first, Mapping):
        mapped = copy.copy(first)
        for key in first:
            mapped[key] = _cat([o[key] for o in outputs])
        return mapped
    return first


def _per_sample(tensor: torch.Tensor, batch: int) -> bool:
    return tensor.dim() > 0 and tensor.shape[0] == batch


def reinitialized(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every parameter drawn again (the same architecture, a new initialization)."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return clone


class BranchedHead:
    """``branches`` copies of the head modules of ``root`` after ``split``; ``attach`` hooks them in.

    Made before the Distiller installs its own hooks, so the copies carry none.
    ``copies[b - 1][i]`` is branch b's copy of ``heads[i]``, re-initialized.
    """

    def __init__(self, root: nn.Module, split: str, heads: list[str], branches: int, location: str):
        table = kdhooks.module_table(root)
        self.root, self.split, self.heads, self.branches, self.location = root, split, heads, branches, location
        self.split_module = self._resolve(table, split, "split")
        self.head_modules = [self._resolve(table, path, "heads") for path in heads]
        self.copies = nn.ModuleList(nn.ModuleList(reinitialized(m) for m in self.head_modules)
                                    for _ in range(branches - 1))
        self.active, self.batch, self.trunk, self.pending = False, None, None, {}

    def _resolve(self, table: dict[str, nn.Module], path: str, option: str) -> nn.Module:
        where = f"{self.location}.{option}"
        if path not in table:
            raise kdhooks.ConfigError(where, f"{path!r} is not a module of the student", value=path,
                                      fix=kdhooks.did_you_mean(path, table)
                                      or "run `kdhooks inspect` to list the module paths")
        if option == "split":
            return table[path]
        for other in [self.split, *self.heads]:
            if path == "" or (other != path and (other.startswith(path + ".") or path.startswith(other + "."))):
                raise kdhooks.ConfigError(where, f"{path!r} and {other!r} contain one another", value=path,
                                          fix="name modules after the split, none inside another, not the root")
        return table[path]

    def attach(self, active: Callable[[nn.Module], bool], finish: Finish) -> Callable[[], None]:
        """Hook the root, the split and the heads; returns the function that removes every hook.

        ``active(root)`` says whether a forward branches; at its end
        ``finish(trunk, branch_logits (m, N, K), training)`` may return logits
        to answer with instead of branch 0's.
        """
        self._active_when, self._finish = active, finish
        handles = [self.root.register_forward_pre_hook(kdhooks.model_hook(self._starts)),
                   self.root.register_forward_hook(kdhooks.model_hook(self._ends), prepend=True),
                   self.split_module.register_forward_hook(kdhooks.model_hook(self._fork))]
        for index, module in enumerate(self.head_modules):
            # prepended, so that taps of other terms on a head see branch 0 only
            handles.append(module.register_forward_pre_hook(kdhooks.model_hook(self._head_input(index)),
                                                            with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(kdhooks.model_hook(self._head_output(index))))
        return lambda: [handle.remove() for handle in handles]

    # the hooks, in the order they fire
    def _starts(self, module: nn.Module, args: tuple) -> None:
        self.active, self.batch, self.trunk = self._active_when(module), None, None
        self.copies.train(module.training)  # the copies follow the model into eval mode and back
        self.pending = {index: [] for index in range(len(self.heads))}

    def _fork(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self.active or self.batch is not None:
            return None
        self.trunk = kdhooks.logits_of(output)  # the tensor itself, or the first item of a tuple
        self.batch = self.trunk.shape[0]
        return _map(output, lambda t: torch.cat([t] * self.branches) if _per_sample(t, self.batch) else t)

    def _slice(self, value: Any, branch: int) -> Any:
        n = self.batch
        return _map(value, lambda t: t[branch * n:(branch + 1) * n] if _per_sample(t, n * self.branches) else t)

    def _head_input(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if not self.active:
                return None
            if self.batch is None:
                raise kdhooks.ConfigError(f"{self.location}.heads", f"the head module {self.heads[index]!r} ran "
                                          f"before the split {self.split!r}", value=self.heads[index],
                                          fix="name modules that run after the split as heads")
            self.pending[index].append([self._slice((args, kwargs), b) for b in range(1, self.branches)])
            return self._slice((args, kwargs), 0)
        return hook

    def _head_output(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self.active:
                return None
            inputs = self.pending[index].pop()
            copies = [branch[index] for branch in self.copies]
            return _cat([output, *(c(*a, **kw) for c, (a, kw) in zip(copies, inputs))])
        return hook

    def _ends(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self.active:
            return None
        self.active, n = False, self.batch
        if n is None:
            raise kdhooks.ConfigError(f"{self.location}.split", f"the split module {self.split!r} did not run in "
                                      f"the student's forward", value=self.split,
                                      fix="split at a module the forward calls")
        logits = kdhooks.logits_of(output)
        answer = self._finish(self.trunk, torch.stack(logits.split(n)), module.training)
        answer = logits[:n] if answer is None else answer
        self.trunk = None
        return _map(output, lambda t: answer if t is logits else t[:n] if _per_sample(t, n * self.branches) else t)
