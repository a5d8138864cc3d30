"""Transformer and language-model distillation: hidden states, attention maps, token-level divergences.

Models are duck-typed: a layer stack is the longest ``nn.ModuleList`` of blocks
of one type (``bert.encoder.layer``, ``model.layers``, ``transformer.h``), its
attention module the first submodule of a block whose name says ``attn`` or
``attention``. Hidden states are numbered as HF's ``output_hidden_states``:
0 is the embeddings' output (the first block's input), ``i`` the output of
block ``i``. Masks come from the step's extras (``attention_mask``, ``labels``),
which the HF integration passes on. No transformers import here. Constants
against TinyBERT, TextBrewer and TRL, and how to port their weights:
docs/conventions.md.
"""
from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import kdhooks

from ._layers import known
from ._token_divergence import LinearHead, lm_kd_loss, lm_token_mask, token_divergence, top_k_log_probs

__all__ = ["LinearHead", "attention_maps_loss", "hidden_states_loss", "lm_kd_loss", "lm_token_mask",
           "token_divergence", "top_k_log_probs", "layer_stack", "layer_pairs"]

LayerMap = Literal["uniform", "last"] | list[tuple[int, int]]


# --- the math --------------------------------------------------------------------------


def hidden_states_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                       mask: torch.Tensor | None = None, distance: str = "mse") -> torch.Tensor:
    """MSE (TinyBERT) or 1 − cosine (DistilBERT) between token features (B, L, D), over real tokens."""
    student_hidden, teacher_hidden = student_hidden.float(), teacher_hidden.float()
    if distance == "cosine":
        per_token = 1 - F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)
    else:
        per_token = (student_hidden - teacher_hidden).pow(2).mean(-1)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def attention_maps_loss(student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                        mask: torch.Tensor | None = None, distance: str = "mse",
                        heads: str = "averaged") -> torch.Tensor:
    """Distance between attention probabilities (B, H, L, L): MSE per entry or KL(teacher‖student) per query row.

    ``heads='averaged'`` compares the head-averaged maps (any head counts),
    ``'matched'`` head i with head i. ``mask`` (B, L) marks real tokens: padded
    queries and keys take no part.
    """
    student_attention, teacher_attention = student_attention.float(), teacher_attention.float()
    if heads == "averaged":
        student_attention = student_attention.mean(1, keepdim=True)
        teacher_attention = teacher_attention.mean(1, keepdim=True)
    batch, _, length, _ = teacher_attention.shape
    if mask is None:
        mask = torch.ones(batch, length, device=teacher_attention.device)
    mask = mask.to(teacher_attention.dtype)
    queries, keys = mask[:, None, :, None], mask[:, None, None, :]
    n_heads = teacher_attention.shape[1]
    if distance == "kl":
        # zero probabilities contribute nothing (x log x → 0); the floor only keeps log finite
        log_ratio = teacher_attention.clamp_min(1e-30).log() - student_attention.clamp_min(1e-30).log()
        per_row = (teacher_attention * log_ratio * keys).sum(-1, keepdim=True)
        return (per_row * queries).sum() / (queries.sum() * n_heads).clamp_min(1)
    squared = (student_attention - teacher_attention).pow(2) * queries * keys
    return squared.sum() / ((queries * keys).sum() * n_heads).clamp_min(1)


# --- finding layers in a model ------------------------------------------------------------


def layer_stack(model: nn.Module) -> str:
    """The path of the model's stack of blocks: its longest ModuleList of one block type."""
    best, size = "", 0
    for path, module in kdhooks.module_table(model).items():
        if isinstance(module, nn.ModuleList) and len(module) > size and len({type(m) for m in module}) == 1:
            best, size = path, len(module)
    return best


def attention_module(block: nn.Module) -> str:
    """The first submodule of a block named like an attention module (``attention``, ``self_attn``, ``attn``)."""
    for path, _ in block.named_modules():
        name = path.rsplit(".", 1)[-1].lower()
        if "attn" in name or "attention" in name:
            return path
    return ""


def layer_pairs(layer_map: LayerMap, student_layers: int, teacher_layers: int, *, first: int = 1,
                location: str = "layer_map") -> list[tuple[int, int]]:
    """(student, teacher) layer numbers: ``uniform`` maps student layer m to teacher layer ⌊m·L_T/L_S⌋
    (TinyBERT's g(m) = m·k), ``last`` pairs the last layers, a list is taken as written."""
    if layer_map == "uniform":
        return [(m, m * teacher_layers // student_layers) for m in range(1, student_layers + 1)]
    if layer_map == "last":
        return [(student_layers, teacher_layers)]
    pairs = [tuple(int(i) for i in pair) for pair in layer_map]
    for student, teacher in pairs:
        if not (first <= student <= student_layers and first <= teacher <= teacher_layers):
            raise kdhooks.ConfigError(location, f"layer pair ({student}, {teacher}) is out of range: the student "
                                      f"has layers {first}..{student_layers}, the teacher {first}..{teacher_layers}",
                                      value=[student, teacher], fix="number layers as HF hidden_states do "
                                      "(0 = embeddings, i = block i)" if first == 0 else "number blocks from 1")
    if not pairs:
        raise kdhooks.ConfigError(location, "an empty layer map distills nothing", value=[],
                                  fix="write `layer_map: uniform` or list pairs like [[1, 2], [2, 4]]")
    return pairs


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _hidden_tensor(value: Any) -> torch.Tensor:
    """Hidden states from a capture: the tensor, a backbone's ``last_hidden_state`` or its first item."""
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "keys"):
        return value["last_hidden_state"] if "last_hidden_state" in value.keys() else next(iter(value.values()))
    return value[0]


def _check_tokens(term: kdhooks.Term, shapes: dict[str, Any], student: str, teacher: str, what: str) -> None:
    """Token features (B, L, D) of both models over the same tokens; the widths may differ (a connector joins)."""
    if not known(shapes, student, teacher):
        return
    first, second = (kdhooks.expect_rank(term, name, shapes, (3,), f"{what} are compared token by token")
                     for name in (student, teacher))
    if first[:2] != second[:2]:
        raise kdhooks.ConfigError(term.location, f"{term.kind} compares {what} token by token, but the student's "
                                  f"{student} has shape {first} and the teacher's {teacher} {second}",
                                  value=[first, second], fix="feed both models the same tokens (one tokenizer)")


class _LayerTerm(kdhooks.Term):
    """Shared by the two layer-wise terms: finds the layer stacks before the taps are declared."""

    student_layers: str = "auto"
    teacher_layers: str = "auto"

    def _stack(self, distiller: kdhooks.Distiller, role: str) -> tuple[str, int]:
        model, option = distiller.model(self.role(role)), f"{role}_layers"
        path = getattr(self, option)
        if path == "auto":
            path = layer_stack(model)
        table = kdhooks.module_table(model)
        if not path or not isinstance(table.get(path), nn.ModuleList):
            raise kdhooks.ConfigError(f"{self.location}.{option}", f"no stack of layers found in the {role}"
                                      if getattr(self, option) == "auto" else f"{path!r} is not a ModuleList "
                                      f"of the {role}", value=getattr(self, option),
                                      fix="name the ModuleList of blocks, e.g. 'bert.encoder.layer'")
        return path, len(table[path])

    def configure(self, distiller: kdhooks.Distiller) -> None:
        self._student_stack, student_layers = self._stack(distiller, "student")
        self._teacher_stack, teacher_layers = self._stack(distiller, "teacher")
        self._layer_counts = (student_layers, teacher_layers)
        self.configure_layers(distiller, student_layers, teacher_layers)

    def configure_layers(self, distiller: kdhooks.Distiller, student_layers: int, teacher_layers: int) -> None:
        """Work out the layer pairs, with the models at hand."""

    def hidden_tap(self, role: str, index: int) -> kdhooks.Tap:
        """Hidden state ``index`` as HF numbers them: 0 = first block's input, i = block i's output."""
        stack = self._student_stack if role == "student" else self._teacher_stack
        if index == 0:
            return kdhooks.Tap(role, f"{stack}.0", "input", option=f"{role}_layers")
        return kdhooks.Tap(role, f"{stack}.{index - 1}", option=f"{role}_layers")


# --- the terms --------------------------------------------------------------------------


class HiddenStates(_LayerTerm):
    """TinyBERT hidden-state transfer (Jiao et al. 2020): MSE(h_S W_h, h_T) over layer pairs; cosine as DistilBERT.

    ``reduction: mean`` (default) averages over the layer pairs; ``sum`` adds
    them, as TinyBERT's and TextBrewer's code do (docs/conventions.md).
    """

    layer_map: LayerMap = "uniform"
    embeddings: bool = False
    distance: Literal["mse", "cosine"] = "mse"
    connector: str = "auto"
    reduction: Literal["mean", "sum"] = "mean"

    def configure_layers(self, distiller: kdhooks.Distiller, student_layers: int, teacher_layers: int) -> None:
        self.pairs = layer_pairs(self.layer_map, student_layers, teacher_layers, first=0,
                                 location=f"{self.location}.layer_map")
        if self.embeddings and (0, 0) not in self.pairs:
            self.pairs = [(0, 0), *self.pairs]

    def taps(self) -> dict[str, kdhooks.Tap]:
        taps = {}
        for student, teacher in self.pairs:
            taps[f"student_{student}"] = self.hidden_tap("student", student)
            taps[f"teacher_{teacher}"] = self.hidden_tap("teacher", teacher)
        return taps

    def check(self, shapes: dict[str, Any]) -> None:
        for s, t in self.pairs:
            _check_tokens(self, shapes, f"student_{s}", f"teacher_{t}", "hidden states")

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        self.projections = {
            (s, t): distiller.add_connector(self.name, kdhooks.feature_shape(shapes[f"student_{s}"]),
                                            kdhooks.feature_shape(shapes[f"teacher_{t}"]), self.connector,
                                            location=f"{self.location}.connector")
            for s, t in self.pairs}

    def loss(self, ctx: kdhooks.LossContext, **hidden: Any) -> torch.Tensor:
        mask = ctx.extras.get("attention_mask")
        total = 0.0
        for s, t in self.pairs:
            student = self.projections[(s, t)](_first_tensor(hidden[f"student_{s}"]))
            total = total + hidden_states_loss(student, _first_tensor(hidden[f"teacher_{t}"]), mask, self.distance)
        return total / len(self.pairs) if self.reduction == "mean" else total


class AttentionMaps(_LayerTerm):
    """TinyBERT attention transfer (Jiao et al. 2020), MSE or MiniLM's KL per query row, over layer pairs.

    ``reduction: mean`` (default) averages over the layer pairs; ``sum`` adds
    them, as TinyBERT's and TextBrewer's code do (docs/conventions.md).
    """

    layer_map: LayerMap = "uniform"
    distance: Literal["mse", "kl"] = "mse"
    heads: Literal["averaged", "matched"] = "averaged"
    embeddings: bool = False
    connector: str = "auto"
    attention: str = "auto"
    reduction: Literal["mean", "sum"] = "mean"

    def configure_layers(self, distiller: kdhooks.Distiller, student_layers: int, teacher_layers: int) -> None:
        self.pairs = layer_pairs(self.layer_map, student_layers, teacher_layers, first=1,
                                 location=f"{self.location}.layer_map")
        self._attention = {}
        for role, stack in (("student", self._student_stack), ("teacher", self._teacher_stack)):
            block = kdhooks.module_table(distiller.model(self.role(role)))[f"{stack}.0"]
            path = attention_module(block) if self.attention == "auto" else self.attention
            if not path:
                raise kdhooks.ConfigError(f"{self.location}.attention", f"no attention module found in the "
                                          f"{role}'s blocks", value=self.attention,
                                          fix="name it relative to a block, e.g. 'attention.self'")
            self._attention[role] = path
        # HF attention modules return their probabilities after attention dropout
        config = getattr(distiller.student, "config", None)
        settings = config.to_dict() if hasattr(config, "to_dict") else {}
        for key, rate in settings.items():
            if ("attn" in key or "attention" in key) and "drop" in key and isinstance(rate, float) and rate > 0:
                warnings.warn(f"{self.location}: the student's {key}={rate} drops attention probabilities "
                              f"before they are compared; set it to 0 to distill attention maps", stacklevel=2)

    def taps(self) -> dict[str, kdhooks.Tap]:
        taps = {}
        for student, teacher in self.pairs:
            for role, index in (("student", student), ("teacher", teacher)):
                stack = self._student_stack if role == "student" else self._teacher_stack
                taps[f"{role}_{index}"] = kdhooks.Tap(role, f"{stack}.{index - 1}.{self._attention[role]}",
                                                      "attention", option="attention")
        if self.embeddings:
            taps["student_embeddings"] = self.hidden_tap("student", 0)
            taps["teacher_embeddings"] = self.hidden_tap("teacher", 0)
        return taps

    def check(self, shapes: dict[str, Any]) -> None:
        for s, t in self.pairs:
            if not known(shapes, f"student_{s}", f"teacher_{t}"):
                continue
            student, teacher = (kdhooks.expect_rank(self, name, shapes, (4,), "attention is (batch, heads, L, L)")
                                for name in (f"student_{s}", f"teacher_{t}"))
            if (student[0], *student[2:]) != (teacher[0], *teacher[2:]):
                raise kdhooks.ConfigError(self.location, f"attention maps of layers ({s}, {t}) have different "
                                          f"batch sizes or sequence lengths: student {student}, teacher {teacher}",
                                          value=[s, t], fix="feed teacher and student the same tokens (one tokenizer)")
            if self.heads == "matched" and student[1] != teacher[1]:
                raise kdhooks.ConfigError(f"{self.location}.heads", f"the student has {student[1]} heads and the "
                                          f"teacher {teacher[1]}: they cannot be matched one to one",
                                          value="matched", fix="use `heads: averaged`")
        if self.embeddings:
            _check_tokens(self, shapes, "student_embeddings", "teacher_embeddings", "embeddings")

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        if self.embeddings:
            self.embedding_projection = distiller.add_connector(
                self.name, kdhooks.feature_shape(shapes["student_embeddings"]),
                kdhooks.feature_shape(shapes["teacher_embeddings"]), self.connector,
                location=f"{self.location}.connector")

    def loss(self, ctx: kdhooks.LossContext, **captures: Any) -> dict[str, torch.Tensor]:
        mask = ctx.extras.get("attention_mask")
        attention = sum(attention_maps_loss(captures[f"student_{s}"], captures[f"teacher_{t}"], mask,
                                            self.distance, self.heads) for s, t in self.pairs)
        if self.reduction == "mean":
            attention = attention / len(self.pairs)
        parts = {"": attention}
        if self.embeddings:
            student = self.embedding_projection(_first_tensor(captures["student_embeddings"]))
            parts["embeddings"] = hidden_states_loss(student, _first_tensor(captures["teacher_embeddings"]), mask)
        return parts


class LMKD(kdhooks.Term):
    """Token-level LM KD: forward/reverse KL, generalized JSD(β) of GKD (Agarwal et al. 2024), total variation.

    With ``student_head`` (``lm_head``) the logits are formed a chunk at a time
    from the head's weights and the hidden states that feed it: by default the
    head's input; ``student_hidden`` names another output that holds them (the
    backbone's, ``model``), for a model whose head module is never called, as
    under TRL's fused LM head. The same for the teacher. The loss is the mean
    over kept tokens × T² (Hinton's convention, ``temperature_squared: true``,
    the default); ``temperature_squared: false`` leaves out T², as TRL's GKD
    ``generalized_jsd_loss`` (docs/conventions.md).
    """

    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tv"] = "forward_kl"
    beta: kdhooks.UnitInterval = 0.5
    temperature: kdhooks.Positive = 1.0
    temperature_squared: bool = True
    causal: bool = True
    ignore_index: int = -100
    chunk_size: kdhooks.PositiveInt | None = 256
    top_k: kdhooks.PositiveInt | None = None
    student: str = "logits"
    teacher: str = "logits"
    student_head: str | None = None
    teacher_head: str | None = None
    student_hidden: str | None = None
    teacher_hidden: str | None = None

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {f"{role}_output": self._tap(role) for role in ("student", "teacher")}

    def _tap(self, role: str) -> kdhooks.Tap:
        head, hidden = getattr(self, f"{role}_head"), getattr(self, f"{role}_hidden")
        if hidden and not head:
            raise kdhooks.ConfigError(f"{self.location}.{role}_hidden", f"{role}_hidden names the hidden states "
                                      f"that feed {role}_head, which is not set", value=hidden,
                                      fix=f"set {role}_head (e.g. lm_head)")
        if hidden:
            return kdhooks.Tap(role, hidden, option=f"{role}_hidden")
        if head:
            return kdhooks.Tap(role, head, "input", option=f"{role}_head")
        return kdhooks.Tap(role, getattr(self, role), option=role)

    def __post_init__(self) -> None:
        self._heads: dict[str, nn.Module] = {}

    def check(self, shapes: dict[str, Any]) -> None:
        if not known(shapes, "student_output", "teacher_output"):
            return  # a backbone's ModelOutput (student_hidden): its hidden states are picked out in loss()
        if not self.student_head and not self.teacher_head:
            kdhooks.expect_same_classes(self, "student_output", "teacher_output", shapes)
            return
        # hidden states feed a head: the vocabularies are compared in loss(), the tokens here
        first, second = (kdhooks.feature_shape(shapes[name]) for name in ("student_output", "teacher_output"))
        if first[:-1] != second[:-1]:
            raise kdhooks.ConfigError(self.location, f"lm_kd compares next-token distributions token by token, but "
                                      f"the student's output has shape {first} and the teacher's {second}",
                                      value=[first, second], fix="feed both models the same tokens (one tokenizer)")

    def _side(self, ctx: kdhooks.LossContext, role: str, value: Any) -> torch.Tensor | LinearHead:
        if not getattr(self, f"{role}_head"):
            return value
        hidden = _hidden_tensor(value)
        if role not in self._heads:
            self._heads[role] = self._head(ctx.distiller, role, hidden.shape[-1])
        weight, bias = self._heads[role].weight, self._heads[role].bias
        if role != "student":
            weight, bias = weight.detach(), None if bias is None else bias.detach()
        return LinearHead(hidden, weight, bias)

    def _head(self, distiller: kdhooks.Distiller, role: str, width: int) -> nn.Module:
        """The output layer at ``<role>_head``, checked against the width of the hidden states that feed it."""
        head_path = getattr(self, f"{role}_head")
        table = kdhooks.module_table(distiller.model(self.role(role)))
        linear = [path for path, module in table.items()
                  if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2]
        if head_path not in linear:
            raise kdhooks.ConfigError(f"{self.location}.{role}_head", f"the {role} has no linear output layer "
                                      f"at {head_path!r}", value=head_path,
                                      fix=kdhooks.did_you_mean(head_path, linear) or f"name its LM head: {linear[-1:]}")
        head = table[head_path]
        if head.weight.shape[1] != width:
            raise kdhooks.ConfigError(f"{self.location}.{role}_hidden", f"the {role}'s hidden states have {width} "
                                      f"features and its head {head_path!r} takes {head.weight.shape[1]}",
                                      value=getattr(self, f"{role}_hidden"),
                                      fix="name the output that feeds the head (the backbone, e.g. `model`)")
        return head

    def loss(self, ctx: kdhooks.LossContext, student_output: torch.Tensor,
             teacher_output: torch.Tensor) -> torch.Tensor:
        student = self._side(ctx, "student", student_output)
        teacher = self._side(ctx, "teacher", teacher_output)
        student_vocab = student.weight.shape[0] if isinstance(student, LinearHead) else student.shape[-1]
        teacher_vocab = teacher.weight.shape[0] if isinstance(teacher, LinearHead) else teacher.shape[-1]
        if student_vocab != teacher_vocab:
            raise kdhooks.ConfigError(self.location, f"the student's vocabulary has {student_vocab} entries and "
                                      f"the teacher's {teacher_vocab}", fix="distill between models that share "
                                      "a tokenizer (resize the embeddings to one size)")
        tokens = (student.hidden if isinstance(student, LinearHead) else student).shape[:-1]
        mask = lm_token_mask(tuple(tokens), labels=ctx.labels, attention_mask=ctx.extras.get("attention_mask"),
                             causal=self.causal, ignore_index=self.ignore_index)
        loss = lm_kd_loss(student, teacher, mask=mask, divergence=self.divergence, beta=self.beta,
                          temperature=self.temperature, top_k=self.top_k, chunk_size=self.chunk_size)
        return loss if self.temperature_squared else loss / self.temperature**2


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("hidden_states", HiddenStates)
    registry.add_term("attention_maps", AttentionMaps)
    registry.add_term("lm_kd", LMKD)
