"""Network Augmentation (Cai et al., ICLR 2022): a tiny model trained inside weight-shared wider models.

A term, not a wrapper around the model: the Distiller already gives a term what
NetAug needs at each step (the step's inputs by a tap on the model's input, the
labels passed to ``kd(task_loss, labels=y)``, α as ``weight`` with schedules and
``weight: 0`` skipping the augmented forward, trainable parts that
``kd.parameters()`` and ``kd.state_dict()`` hold, and ``close()``), and the
user's loop stays as it is: ``loss = kd(F.cross_entropy(model(x), y), labels=y)``
is L(tiny) + α·L(augmented). A wrapper would have to own the forward and the
step instead.

How the augmented model is built, from the tiny model alone (no teacher):

- ``torch.fx.symbolic_trace`` of the student gives its graph; the graph is run
  by an interpreter that replaces each Conv2d, Linear and BatchNorm2d/1d call
  by the same op on widened parameters. The student's modules are not copied,
  changed or hooked; its other leaf modules (activations, pooling, dropout)
  run through their ``forward``, so hooks on them (other terms' taps) do not fire.
- Which dimensions widen: the channels between layers (the output channels of
  a Conv2d or Linear and every input that reads them, through activations,
  pooling, flatten, BatchNorm and element-wise ops; tensors added or multiplied
  together share one width, as residual blocks need). Never widened: the
  model's input channels, and any tensor that reaches the model's output (the
  classes). A depthwise or grouped Conv2d keeps its group size and gets more
  groups (widths round up to a multiple of it), so the tiny model's groups stay
  the leading ones. A Linear after ``flatten`` of an (N, C, H, W) map widens its
  input by C·H·W → C'·H·W (channel-major, so the tiny model's columns lead).
- Width per step: one multiplier r is drawn from ``widths`` per step (the same
  for every widened tensor), reproducibly from ``seed`` and the Distiller's
  step (a resumed run draws the same sequence); a tensor of C channels has
  max(C, round(C·r)) channels, rounded up to its group size. r = 1.0 is the
  tiny model itself (its loss once more, with the augmented BatchNorm statistics).
- Weight sharing: every widened weight is built at each forward as
  ``torch.cat`` of the tiny model's own parameter (the leading block) and
  extra blocks held by the Distiller (part ``netaug``, sized for the largest
  multiplier; a smaller width uses their leading slice, so the augmented
  models share weights with each other too). Gradients of the augmented loss
  reach the tiny model's parameters through the ``cat``.
- BatchNorm: the augmented BatchNorms normalize by the batch's statistics in
  training mode and keep their own running mean, variance and count in the
  part (buffers, checkpointed), so the tiny model's running statistics are
  never read or updated by the augmented forward. The affine weight and bias
  are shared like the other parameters.

Models that cannot be widened (a control flow that fx cannot trace, a layer
with parameters other than those above on a widened tensor, a concatenation
of widened tensors) get a ConfigError naming the module or the op.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import field
from typing import Annotated, Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import kdhooks

WIDENED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)
# leaf modules without parameters that keep channels where they are (element-wise, pooling, flatten)
CHANNEL_KEEPING_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
                           nn.Sigmoid, nn.Tanh, nn.Mish, nn.ELU, nn.Identity, nn.Dropout, nn.Dropout2d,
                           nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
CHANNEL_KEEPING_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu,
                             torch.sigmoid, torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                             F.adaptive_max_pool2d, torch.flatten, operator.add, operator.mul, operator.sub,
                             operator.truediv, operator.iadd, operator.imul, torch.add, torch.mul, getattr,
                             operator.getitem}
CHANNEL_KEEPING_METHODS = {"relu", "relu_", "sigmoid", "tanh", "flatten", "view", "reshape", "mean", "size",
                           "contiguous", "add", "add_", "mul", "mul_", "clamp", "dim", "squeeze", "unsqueeze"}
ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, operator.iadd, operator.imul,
               torch.add, torch.mul, "add", "add_", "mul", "mul_"}


class _Slot:
    """The channels of one set of tensors that widen together (union-find); ``fixed`` ones never widen."""

    def __init__(self, channels: int, source: _Slot | None = None, group_in: int = 1, group_out: int = 1):
        self.channels, self.parent, self.fixed, self.quantum = channels, self, False, 1
        # a grouped conv's output: as many groups as its input has, of group_out channels
        self.source, self.group_in, self.group_out = source, group_in, group_out

    def root(self) -> _Slot:
        slot = self
        while slot.parent is not slot:
            slot = slot.parent
        return slot

    def width(self, ratio: float) -> int:
        slot = self.root()
        if slot.source is not None:
            return slot.source.width(ratio) // slot.group_in * slot.group_out
        if slot.fixed:
            return slot.channels
        wide = max(slot.channels, round(slot.channels * ratio))
        return -(-wide // slot.quantum) * slot.quantum


def _union(a: _Slot, b: _Slot, where: str) -> None:
    a, b = a.root(), b.root()
    if a is b:
        return
    if a.channels != b.channels or a.source is not None or b.source is not None:
        raise kdhooks.ConfigError("terms.netaug", f"cannot widen the model: {where} combines tensors of "
                                  f"{a.channels} and {b.channels} channels that would widen differently",
                                  fix="NetAug widens Conv2d/Linear/BatchNorm models whose element-wise ops join "
                                  "tensors of one width")
    b.parent, a.fixed, a.quantum = a, a.fixed or b.fixed, math.lcm(a.quantum, b.quantum)


def _slots_in(value: Any, slots: dict[torch.fx.Node, _Slot]) -> list[_Slot]:
    found: list[_Slot] = []
    torch.fx.node.map_arg(value, lambda n: found.append(slots[n]) if n in slots else None)
    return found


class _Layer:
    """One widened Conv2d, Linear or BatchNorm of the student: how to build its parameters at a width."""

    def __init__(self, path: str, module: nn.Module, in_slot: _Slot | None, out_slot: _Slot | None, spatial: int = 1):
        self.path, self.module, self.in_slot, self.out_slot, self.spatial = path, module, in_slot, out_slot, spatial

    def dims(self, ratio: float) -> tuple[int, int]:
        """(in, out) sizes at ``ratio``: channels (conv, BN) or features (Linear)."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            base_in, base_out = m.in_channels, m.out_channels
        elif isinstance(m, nn.Linear):
            base_in, base_out = m.in_features, m.out_features
        else:
            return m.num_features, m.num_features if self.out_slot is None else self.out_slot.width(ratio)
        wide_in = base_in if self.in_slot is None else self.in_slot.width(ratio) * self.spatial
        wide_out = base_out if self.out_slot is None else self.out_slot.width(ratio)
        return wide_in, wide_out

    def make_extras(self, ratio: float) -> nn.Module:
        """The extra blocks for the largest width, initialized as a fresh layer of that size would be."""
        m, (wide_in, wide_out) = self.module, self.dims(ratio)
        extras = nn.Module()
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            extra = wide_out - m.num_features
            if m.affine and extra:
                extras.weight = nn.Parameter(torch.ones(extra, dtype=m.weight.dtype))
                extras.bias = nn.Parameter(torch.zeros(extra, dtype=m.bias.dtype))
            if m.track_running_stats:  # the augmented model's own statistics, all of them
                extras.register_buffer("running_mean", torch.zeros(wide_out))
                extras.register_buffer("running_var", torch.ones(wide_out))
                extras.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
            return extras
        if isinstance(m, nn.Conv2d):
            groups = self.groups(ratio)
            fresh = nn.Conv2d(wide_in, wide_out, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                              m.bias is not None, m.padding_mode)
        else:
            fresh = nn.Linear(wide_in, wide_out, m.bias is not None)
        out, cols = m.weight.shape[:2]
        fresh = fresh.to(m.weight.dtype)
        if fresh.weight.shape[1] > cols:  # ungrouped: the columns right of the tiny block, then the rows below
            extras.right = nn.Parameter(fresh.weight.detach()[:out, cols:].clone())
        if wide_out > out:
            extras.below = nn.Parameter(fresh.weight.detach()[out:].clone())
            if m.bias is not None:
                extras.bias = nn.Parameter(fresh.bias.detach()[out:].clone())
        return extras

    def groups(self, ratio: float) -> int:
        m = self.module
        if m.groups == 1:
            return 1
        return self.dims(ratio)[0] // (m.in_channels // m.groups)

    def weight(self, extras: nn.Module, ratio: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        m, (wide_in, wide_out) = self.module, self.dims(ratio)
        out, cols = m.weight.shape[:2]
        weight, bias = m.weight, m.bias
        wide_cols = wide_in if getattr(m, "groups", 1) == 1 else cols
        if wide_cols > cols:
            weight = torch.cat([weight, extras.right[:, :wide_cols - cols]], 1)
        if wide_out > out:
            weight = torch.cat([weight, extras.below[:wide_out - out, :wide_cols]], 0)
            if bias is not None:
                bias = torch.cat([bias, extras.bias[:wide_out - out]])
        return weight, bias

    def __call__(self, extras: nn.Module, ratio: float, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            width = self.dims(ratio)[1]
            extra = width - m.num_features
            weight, bias = m.weight, m.bias
            if m.affine and extra:
                weight, bias = torch.cat([weight, extras.weight[:extra]]), torch.cat([bias, extras.bias[:extra]])
            mean = var = None
            momentum = 0.0 if m.momentum is None else m.momentum
            if m.track_running_stats:
                mean, var = extras.running_mean[:width], extras.running_var[:width]  # views: updated in place
                if m.training:
                    extras.num_batches_tracked.add_(1)
                    if m.momentum is None:
                        momentum = 1.0 / float(extras.num_batches_tracked)
            batch_stats = m.training or not m.track_running_stats
            return F.batch_norm(x, mean, var, weight, bias, batch_stats, momentum, m.eps)
        weight, bias = self.weight(extras, ratio)
        if isinstance(m, nn.Linear):
            return F.linear(x, weight, bias)
        groups = self.groups(ratio)
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            return F.conv2d(x, weight, bias, m.stride, 0, m.dilation, groups)
        return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, groups)


class WidenedModel:
    """The student's fx graph with its Conv2d/Linear/BatchNorm layers widened (``run(x, ratio)``).

    Holds the student's modules by reference and no parameters of its own: the
    extra blocks are ``parts`` (an ``nn.ModuleDict`` by layer path, ``.`` as
    ``/``), which the term gives to the Distiller.
    """

    def __init__(self, student: nn.Module, max_ratio: float, location: str = "terms.netaug"):
        self.location = location
        try:
            self.graph_module = torch.fx.symbolic_trace(student)
        except Exception as error:  # fx raises many kinds: TraceError, TypeError on a data-dependent branch...
            raise kdhooks.ConfigError(location, f"cannot widen {type(student).__name__}: torch.fx cannot trace "
                                      f"its forward ({type(error).__name__}: {str(error).splitlines()[0]})",
                                      fix="NetAug widens models whose forward has no data-dependent control flow"
                                      ) from error
        self.layers = self._analyse(student)
        self._interpreter: _Interpreter | None = None
        self.parts = nn.ModuleDict({path.replace(".", "/"): layer.make_extras(max_ratio)
                                    for path, layer in self.layers.items()})

    def _refuse(self, node: torch.fx.Node, what: str) -> kdhooks.ConfigError:
        return kdhooks.ConfigError(self.location, f"cannot widen the model at {what} (graph node {node.name!r}): "
                                   f"it reads a widened tensor and is not a Conv2d, Linear, BatchNorm or a "
                                   f"channel-keeping op", value=what, fix="NetAug widens Conv2d (also grouped and "
                                   "depthwise), Linear and BatchNorm1d/2d models joined by activations, pooling, "
                                   "flatten and element-wise ops; drop the term for this model")

    def _analyse(self, student: nn.Module) -> dict[str, _Layer]:
        modules = dict(self.graph_module.named_modules())
        slots: dict[torch.fx.Node, _Slot] = {}
        layers: dict[str, _Layer] = {}
        for node in self.graph_module.graph.nodes:
            inputs = _slots_in((node.args, node.kwargs), slots)
            if node.op == "call_module":
                module = modules[node.target]
                first = slots.get(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
                if isinstance(module, nn.Conv2d):
                    if module.groups == 1 or first is None:
                        slots[node] = _Slot(module.out_channels) if module.groups == 1 else None
                        if slots[node] is None:
                            del slots[node]
                    else:
                        group_in, group_out = module.in_channels // module.groups, module.out_channels // module.groups
                        root = first.root()
                        root.quantum = math.lcm(root.quantum, group_in)
                        slots[node] = first if group_in == group_out else _Slot(module.out_channels, first,
                                                                               group_in, group_out)
                    layers[node.target] = _Layer(node.target, module, first, slots.get(node))
                elif isinstance(module, nn.Linear):
                    spatial = 1
                    if first is not None:
                        if module.in_features % first.channels:
                            raise self._refuse(node, f"{node.target} ({module})")
                        spatial = module.in_features // first.channels
                    slots[node] = _Slot(module.out_features)
                    layers[node.target] = _Layer(node.target, module, first, slots[node], spatial)
                elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                    if first is not None:
                        slots[node] = first
                    layers[node.target] = _Layer(node.target, module, first, first)
                elif isinstance(module, CHANNEL_KEEPING_MODULES):
                    if first is not None:
                        slots[node] = first
                elif inputs:
                    raise self._refuse(node, f"{node.target} ({type(module).__name__})")
            elif node.op in ("call_function", "call_method"):
                target = node.target
                keeps = target in CHANNEL_KEEPING_FUNCTIONS if node.op == "call_function" else \
                    target in CHANNEL_KEEPING_METHODS
                if not inputs:
                    continue
                if not keeps:
                    name = getattr(target, "__name__", str(target))
                    raise self._refuse(node, f"{name}()")
                if target in (getattr, "size", "dim"):
                    continue  # shapes, not tensors
                if target in ELEMENTWISE:
                    for other in inputs[1:]:
                        _union(inputs[0], other, f"{node.name} ({getattr(target, '__name__', target)})")
                slots[node] = inputs[0]
            elif node.op == "output":
                for slot in inputs:  # the model's output (the classes) keeps its size
                    root = slot.root()
                    root.fixed = True
                    if root.source is not None:
                        raise kdhooks.ConfigError(self.location, "cannot widen the model: its output comes from a "
                                                  "grouped convolution of a widened tensor", value=str(node.args))
        # a layer whose output is fixed is not widened on that side; BatchNorms on fixed tensors are not widened
        for layer in layers.values():
            if layer.out_slot is not None and layer.out_slot.root().fixed and layer.out_slot.root().source is None:
                layer.out_slot = None
            if layer.in_slot is not None and layer.in_slot.root().fixed and layer.in_slot.root().source is None:
                layer.in_slot = None
        if not any(layer.dims(2.0) != layer.dims(1.0) for layer in layers.values()):
            raise kdhooks.ConfigError(self.location, f"cannot widen {type(student).__name__}: it has no Conv2d or "
                                      f"Linear whose output feeds another layer", fix="NetAug widens the "
                                      "channels between layers; a model with one layer has none")
        return layers

    def run(self, x: Any, ratio: float) -> Any:
        """The augmented model's output on ``x`` at width ``ratio``; its BatchNorms follow the student's mode."""
        if self._interpreter is None:
            self._interpreter = _Interpreter(self)
        self._interpreter.ratio = ratio
        return self._interpreter.run(x)


class _Interpreter(torch.fx.Interpreter):
    def __init__(self, widened: WidenedModel):
        super().__init__(widened.graph_module, garbage_collect_values=True)
        self.widened, self.ratio = widened, 1.0

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        layer = self.widened.layers.get(target)
        if layer is not None:
            return layer(self.widened.parts[target.replace(".", "/")], self.ratio, *args)
        return self.fetch_attr(target).forward(*args, **kwargs)  # not __call__: the student's hooks stay quiet


def sample_width(widths: list[float], seed: int, step: int) -> float:
    """The width multiplier of ``step``: a draw from ``widths`` that depends on ``seed`` and ``step`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return widths[int(torch.randint(len(widths), (), generator=generator))]


Width = Annotated[float, Field(ge=1.0, allow_inf_nan=False)]


class NetAug(kdhooks.Term):
    """Network Augmentation (Cai et al., ICLR 2022): L(tiny) + α·L(augmented at a width r sampled per step).

    The task loss is L(tiny); the term is ``criterion(augmented(x), labels)``,
    the augmented model sharing the tiny model's parameters as its leading
    slices (module docstring: which dimensions widen, BatchNorm statistics). α is
    ``weight`` (a schedule may take it to 0 for the last epochs: the augmented
    forward is then skipped). ``criterion`` is ``cross_entropy`` or, in Python,
    a callable ``(logits, labels) -> loss``; the labels are those of
    ``kd(task_loss, labels=y)``. Works without a teacher (``Distiller(model,
    None, config)``); a teacher, if attached, is not used.
    """

    widths: Annotated[list[Width], Field(min_length=1)] = field(default_factory=lambda: [1.0, 1.6, 2.2, 2.8])
    seed: kdhooks.NonNegativeInt = 0
    criterion: Literal["cross_entropy"] | Callable[..., Any] = "cross_entropy"

    def configure(self, distiller: kdhooks.Distiller) -> None:
        self.widened = WidenedModel(distiller.student, max(self.widths), self.location)
        self.parts = distiller.add_part(self.name, self.widened.parts)
        self.last_width: float | None = None

        def forget() -> None:  # the student's modules are not referenced once closed
            self.widened = None
        distiller.on_close(forget)

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"inputs": kdhooks.Tap("student", "", kind="input")}

    def loss(self, ctx: kdhooks.LossContext, inputs: Any) -> torch.Tensor:
        if ctx.labels is None:
            raise ValueError(f"term {self.name!r} ({self.kind}) trains the augmented model on the labels: "
                             "call kd(task_loss, labels=y)")
        self.last_width = sample_width(list(self.widths), self.seed, ctx.step)
        logits = kdhooks.logits_of(self.widened.run(inputs, self.last_width))
        ctx.log("width", self.last_width)
        if callable(self.criterion):
            return self.criterion(logits, ctx.labels)
        return F.cross_entropy(logits.float(), ctx.labels)

    def augmented(self, inputs: Any, width: float) -> Any:
        """The augmented model's output at ``width`` (its BatchNorms in the student's mode)."""
        return self.widened.run(inputs, width)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("netaug", NetAug)
