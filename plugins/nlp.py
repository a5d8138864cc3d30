"""Transformer and language-model distillation: hidden states, attention maps, token-level divergences.

Models are duck-typed: a layer stack is the longest ``nn.ModuleList`` of blocks
of one type (``bert.encoder.layer``, ``model.layers``, ``transformer.h``), its
attention module the first submodule of a block whose name says ``attn`` or
``attention``. Hidden states are numbered as HF's ``output_hidden_states``:
0 is the embeddings' output (the first block's input), ``i`` the output of
block ``i``. An encoder–decoder model (``config.is_encoder_decoder``: T5, BART)
has two stacks: ``stack: encoder | decoder`` picks one, ``attention: self |
cross`` the self- or cross-attention of its blocks. Masks come from the step's
extras, which the HF integration passes on: ``attention_mask`` for an encoder or
a single stack, ``labels`` (≠ ignore index) and ``decoder_attention_mask`` for a
decoder of an encoder–decoder model. No transformers import here. Constants
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
from ._fused_linear_divergence import lm_kd_loss
from ._token_divergence import LinearHead, lm_token_mask, token_divergence, top_k_log_probs

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
                        heads: str = "averaged", key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between attention probabilities (B, H, Lq, Lk): MSE per entry or KL(teacher‖student) per query row.

    ``heads='averaged'`` compares the head-averaged maps (any head counts),
    ``'matched'`` head i with head i. ``mask`` (B, Lq) marks real query tokens
    and ``key_mask`` (B, Lk) real keys (default: ``mask``, for self-attention;
    cross-attention's keys are the encoder's tokens): padded ones take no part.
    """
    student_attention, teacher_attention = student_attention.float(), teacher_attention.float()
    if heads == "averaged":
        student_attention = student_attention.mean(1, keepdim=True)
        teacher_attention = teacher_attention.mean(1, keepdim=True)
    batch, _, length, key_length = teacher_attention.shape
    if mask is None:
        mask = torch.ones(batch, length, device=teacher_attention.device)
    if key_mask is None:
        key_mask = mask if key_length == length else torch.ones(batch, key_length, device=teacher_attention.device)
    mask, key_mask = mask.to(teacher_attention.dtype), key_mask.to(teacher_attention.dtype)
    queries, keys = mask[:, None, :, None], key_mask[:, None, None, :]
    n_heads = teacher_attention.shape[1]
    if distance == "kl":
        # zero probabilities contribute nothing (x log x → 0); the floor only keeps log finite
        log_ratio = teacher_attention.clamp_min(1e-30).log() - student_attention.clamp_min(1e-30).log()
        per_row = (teacher_attention * log_ratio * keys).sum(-1, keepdim=True)
        return (per_row * queries).sum() / (queries.sum() * n_heads).clamp_min(1)
    squared = (student_attention - teacher_attention).pow(2) * queries * keys
    return squared.sum() / ((queries * keys).sum() * n_heads).clamp_min(1)


# --- finding layers in a model ------------------------------------------------------------


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder–decoder (T5, BART), as its HF config says."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def stack_side_paths(model: nn.Module) -> dict[str, str]:
    """The paths of an encoder–decoder model's ``encoder`` and ``decoder`` (``get_encoder()``/``get_decoder()``)."""
    paths = {id(module): path for path, module in model.named_modules()}
    sides = {}
    for side in ("encoder", "decoder"):
        getter = getattr(model, f"get_{side}", None)
        try:
            module = getter() if callable(getter) else None
        except (AttributeError, NotImplementedError, TypeError):
            # transformers' base get_encoder()/get_decoder() raise on models without that side: found by name below
            module = None
        if module is not None and id(module) in paths and paths[id(module)]:
            sides[side] = paths[id(module)]
        else:  # by name: the shortest path ending in `encoder` / `decoder`
            named = sorted((p for p in paths.values() if p.rsplit(".", 1)[-1] == side), key=len)
            if named:
                sides[side] = named[0]
    return sides


def layer_stack(model: nn.Module, within: str = "") -> str:
    """The path of the model's stack of blocks: its longest ModuleList of one block type (under ``within``)."""
    best, size = "", 0
    prefix = f"{within}." if within else ""
    for path, module in model.named_modules():
        if not path.startswith(prefix):
            continue
        if isinstance(module, nn.ModuleList) and len(module) > size and len({type(m) for m in module}) == 1:
            best, size = path, len(module)
    return best


def _is_cross(name: str) -> bool:
    name = name.lower()
    return "cross" in name or "encdec" in name or ("encoder" in name and ("attn" in name or "attention" in name))


def attention_module(block: nn.Module, cross: bool = False) -> str:
    """The first submodule of a block named like an attention module (``attention``, ``self_attn``, ``attn``);
    with ``cross`` the first named like a cross-attention (``encoder_attn``, ``EncDecAttention``,
    ``crossattention``)."""
    for path, _ in block.named_modules():
        name = path.rsplit(".", 1)[-1].lower()
        if ("attn" in name or "attention" in name) and _is_cross(name) == cross:
            return path
    return ""


def _attention_selector(model: nn.Module, cross: bool) -> str:
    """``:i`` when the model's attention modules return their probabilities at index i ≠ 1 (T5: last).

    Read from the ``_can_record_outputs`` HF models declare for ``output_attentions``.
    """
    key = "cross_attentions" if cross else "attentions"
    for module_type in dict.fromkeys(type(m) for m in model.modules()):
        index = getattr((getattr(module_type, "_can_record_outputs", None) or {}).get(key), "index", None)
        if isinstance(index, int):
            return "" if index == 1 else f":{index}"
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


def _hidden_tensor(value: Any, term: kdhooks.Term, role: str) -> torch.Tensor:
    """Hidden states (..., D) from a capture: the tensor, a backbone's ``last_hidden_state``, or a tuple's first item.

    An output with fields but no ``last_hidden_state`` (a whole model's, with its
    ``loss`` and ``logits``) is a ConfigError naming the option and the fields it has.
    """
    option = f"{role}_hidden" if getattr(term, f"{role}_hidden") else f"{role}_head"
    path = getattr(term, option)
    if hasattr(value, "keys") and not isinstance(value, torch.Tensor):
        if "last_hidden_state" not in value.keys():
            raise kdhooks.ConfigError(f"{term.location}.{option}", f"the {role}'s output at {path!r} is a "
                                      f"{type(value).__name__} without a `last_hidden_state` field (it has "
                                      f"{', '.join(value.keys()) or 'none'}): it is not the backbone that feeds "
                                      f"the head", value=path, fix="name the backbone whose output has "
                                      "last_hidden_state (`model` in Llama/GPT-2 style models, also under PEFT), "
                                      "or pick the field with a selector (`path:field`)")
        value = value["last_hidden_state"]
    elif isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise kdhooks.ConfigError(f"{term.location}.{option}", f"the {role}'s output at {path!r} is {shape}, not "
                                  f"hidden states (..., features)", value=path,
                                  fix="name the module whose output feeds the head (the backbone, e.g. `model`)")
    return value


def _labels_for(ctx: kdhooks.LossContext, tokens: tuple[int, ...]) -> torch.Tensor | None:
    labels = ctx.labels
    return labels if isinstance(labels, torch.Tensor) and tuple(labels.shape) == tuple(tokens) else None


def token_mask(ctx: kdhooks.LossContext, side: str | None, tokens: tuple[int, ...],
               ignore_index: int = -100) -> torch.Tensor | None:
    """Which tokens (B, L) of a stack take part: ``attention_mask`` for an encoder or a single stack; for the
    decoder of an encoder–decoder model ``labels != ignore_index`` and ``decoder_attention_mask``, where given."""
    if side != "decoder":
        mask = ctx.extras.get("attention_mask")
        return mask if mask is None or tuple(mask.shape) == tuple(tokens) else None
    mask = None
    labels = _labels_for(ctx, tokens)
    if labels is not None:
        mask = labels != ignore_index
    decoder_mask = ctx.extras.get("decoder_attention_mask")
    if decoder_mask is not None and tuple(decoder_mask.shape) == tuple(tokens):
        mask = decoder_mask.bool() if mask is None else mask & decoder_mask.bool()
    return mask


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
    """Shared by the two layer-wise terms: finds the layer stacks before the taps are declared.

    ``stack`` says which stack of an encoder–decoder model (T5, BART) the layers
    are in: ``encoder`` (default) or ``decoder``; a model with one stack has
    nothing to choose. A ``student_layers``/``teacher_layers`` path is taken as
    written, and its side follows from where it is.
    """

    student_layers: str = "auto"
    teacher_layers: str = "auto"
    stack: Literal["encoder", "decoder"] = "encoder"

    def _stack(self, distiller: kdhooks.Distiller, role: str) -> tuple[str, int, str | None]:
        model, option = distiller.model(self.role(role)), f"{role}_layers"
        path = getattr(self, option)
        sides = stack_side_paths(model) if is_encoder_decoder(model) else {}
        if sides and self.stack not in sides:
            raise kdhooks.ConfigError(f"{self.location}.stack", f"the {role} is an encoder–decoder model without "
                                      f"a {self.stack} found (get_{self.stack}())", value=self.stack,
                                      fix=f"name its stack of blocks in {option}")
        if path == "auto":
            path = layer_stack(model, sides.get(self.stack, ""))
        table = kdhooks.module_table(model)
        if not path or not isinstance(table.get(path), nn.ModuleList):
            raise kdhooks.ConfigError(f"{self.location}.{option}", f"no stack of layers found in the {role}"
                                      if getattr(self, option) == "auto" else f"{path!r} is not a ModuleList "
                                      f"of the {role}", value=getattr(self, option),
                                      fix="name the ModuleList of blocks, e.g. 'bert.encoder.layer'")
        exact = next((name for name, module in model.named_modules() if module is table[path]), path)
        side = next((s for s, prefix in sides.items() if exact.startswith(f"{prefix}.")), None)
        return path, len(table[path]), side

    def configure(self, distiller: kdhooks.Distiller) -> None:
        self._student_stack, student_layers, self._side = self._stack(distiller, "student")
        self._teacher_stack, teacher_layers, teacher_side = self._stack(distiller, "teacher")
        if self._side != teacher_side and None not in (self._side, teacher_side):
            raise kdhooks.ConfigError(f"{self.location}.stack", f"the student's layers are in its {self._side}, "
                                      f"the teacher's in its {teacher_side}: their tokens differ",
                                      value=[self._student_stack, self._teacher_stack],
                                      fix="take both from the encoder or both from the decoder")
        self._layer_counts = (student_layers, teacher_layers)
        self.configure_layers(distiller, student_layers, teacher_layers)

    def mask(self, ctx: kdhooks.LossContext, tokens: tuple[int, ...]) -> torch.Tensor | None:
        """The tokens (B, L) of this term's stack that take part (padding and, in a decoder, ignored labels out)."""
        return token_mask(ctx, self._side, tokens)

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
        total, mask = 0.0, None
        for s, t in self.pairs:
            student = self.projections[(s, t)](_first_tensor(hidden[f"student_{s}"]))
            if mask is None:
                mask = self.mask(ctx, tuple(student.shape[:2]))
            total = total + hidden_states_loss(student, _first_tensor(hidden[f"teacher_{t}"]), mask, self.distance)
        return total / len(self.pairs) if self.reduction == "mean" else total


def _use_eager_attention(distiller: kdhooks.Distiller, role: str, model: nn.Module, location: str) -> None:
    """Switch a HF model whose attention returns no probabilities (SDPA, flash) to eager, with a warning that
    names the model, once; back on close(). A model that cannot switch is left to the attention tap's
    ConfigError (load it with ``attn_implementation="eager"``)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        return
    model.set_attn_implementation("eager")
    if getattr(model.config, "_attn_implementation", None) != "eager":
        return
    who = "the student" if role == "student" else "the teacher" if role == "teacher" else f"the teacher {role!r}"
    warnings.warn(f"{location}: attention maps need attention probabilities, which {current!r} attention does not "
                  f"return; switching {who} ({type(model).__name__}) to 'eager' attention until close() (load it "
                  f"with attn_implementation='eager' to silence this)", UserWarning, stacklevel=2)
    distiller.on_close(lambda: model.set_attn_implementation(current))


class AttentionMaps(_LayerTerm):
    """TinyBERT attention transfer (Jiao et al. 2020), MSE or MiniLM's KL per query row, over layer pairs.

    ``reduction: mean`` (default) averages over the layer pairs; ``sum`` adds
    them, as TinyBERT's and TextBrewer's code do (docs/conventions.md).
    ``attention: self`` (default; ``auto`` is the same) compares the blocks'
    self-attention, ``cross`` the cross-attention of a decoder's blocks over the
    encoder's tokens (``stack: decoder``); another value is a module path
    relative to a block (``attention.self``).
    """

    layer_map: LayerMap = "uniform"
    distance: Literal["mse", "kl"] = "mse"
    heads: Literal["averaged", "matched"] = "averaged"
    embeddings: bool = False
    connector: str = "auto"
    attention: str = "self"
    reduction: Literal["mean", "sum"] = "mean"

    def configure_layers(self, distiller: kdhooks.Distiller, student_layers: int, teacher_layers: int) -> None:
        self.pairs = layer_pairs(self.layer_map, student_layers, teacher_layers, first=1,
                                 location=f"{self.location}.layer_map")
        cross = self.attention == "cross"
        if cross and self._side != "decoder":
            raise kdhooks.ConfigError(f"{self.location}.attention", "cross-attention is in the decoder's blocks of "
                                      "an encoder–decoder model" + ("" if self._side else ", and the student is "
                                                                    "not one"), value=self.attention,
                                      fix="set `stack: decoder`" if self._side else "use `attention: self`")
        self._attention = {}
        for role, stack in (("student", self._student_stack), ("teacher", self._teacher_stack)):
            model = distiller.model(self.role(role))
            _use_eager_attention(distiller, self.role(role), model, self.location)
            block = kdhooks.module_table(model)[f"{stack}.0"]
            if self.attention in ("auto", "self", "cross"):
                path = attention_module(block, cross=cross)
                path = path and path + _attention_selector(model, cross)
            else:
                path = self.attention
            if not path:
                raise kdhooks.ConfigError(f"{self.location}.attention", f"no {'cross-' if cross else ''}attention "
                                          f"module found in the {role}'s blocks", value=self.attention,
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
        batch, _, queries, keys = captures[f"student_{self.pairs[0][0]}"].shape
        mask = self.mask(ctx, (batch, queries))
        # cross-attention's keys are the encoder's tokens
        key_mask = token_mask(ctx, "encoder", (batch, keys)) if self.attention == "cross" else mask
        attention = sum(attention_maps_loss(captures[f"student_{s}"], captures[f"teacher_{t}"], mask,
                                            self.distance, self.heads, key_mask) for s, t in self.pairs)
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
    ``generalized_jsd_loss`` (docs/conventions.md). ``compile`` (default true)
    runs the divergence's passes as kernels built by torch.compile, fused per
    block of rows; where it cannot build them the eager passes run, after one
    warning.

    Kept tokens: a causal LM's position i predicts token i+1 (``causal``, the
    default for it); a masked LM (``causal: false``) predicts its own position.
    An encoder–decoder student (T5, BART) is found from its config: its decoder's
    logits at i predict ``labels[i]``, so the tokens kept are those whose label
    is not ``ignore_index`` (and, when given, ``decoder_attention_mask``), with no
    shift; the encoder's ``attention_mask`` takes no part.
    """

    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tv"] = "forward_kl"
    beta: kdhooks.UnitInterval = 0.5
    temperature: kdhooks.Positive = 1.0
    temperature_squared: bool = True
    causal: bool | None = None
    ignore_index: int = -100
    chunk_size: kdhooks.PositiveInt | None = 256
    top_k: kdhooks.PositiveInt | None = None
    compile: bool = True
    student: str = "logits"
    teacher: str = "logits"
    student_head: str | None = None
    teacher_head: str | None = None
    student_hidden: str | None = None
    teacher_hidden: str | None = None

    def configure(self, distiller: kdhooks.Distiller) -> None:
        self._seq2seq = is_encoder_decoder(distiller.student)
        if self._seq2seq and self.causal:
            raise kdhooks.ConfigError(f"{self.location}.causal", "the student is an encoder–decoder model: its "
                                      "decoder's logits at position i predict labels[i], there is no shift to make",
                                      value=True, fix="leave `causal` unset (or false)")
        self._causal = (not self._seq2seq) if self.causal is None else self.causal
        self._heads = {role: self._head(distiller, role) for role in ("student", "teacher")
                       if getattr(self, f"{role}_head")}
        # a backbone's output (a ModelOutput) has no shape for the dry pass: its first call is looked at here
        self._probed: dict[str, Any] = {}
        self._probes = []
        for role in self._heads:
            hidden = getattr(self, f"{role}_hidden")
            module = kdhooks.module_table(distiller.model(self.role(role))).get(hidden or "")
            if hidden and ":" not in hidden and module is not None:
                handle = module.register_forward_hook(kdhooks.model_hook(self._probe(role)))
                self._probes.append(handle)
                distiller.on_close(handle.remove)

    def _probe(self, role: str):
        def probe(module: nn.Module, args: tuple, output: Any) -> None:
            if role not in self._probed:
                try:
                    self._probed[role] = tuple(_hidden_tensor(output, self, role).shape)
                except kdhooks.ConfigError as error:
                    self._probed[role] = error
        return probe

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
        self._probed: dict[str, Any] = {}
        self._probes: list[Any] = []
        self._seq2seq, self._causal = False, self.causal is not False

    def check(self, shapes: dict[str, Any]) -> None:
        """At the dry pass: the hidden states against their head, the vocabularies, the tokens."""
        for handle in self._probes:  # the probes' work is done: one call each, at the dry pass (or step 1)
            handle.remove()
        self._probes = []
        features: dict[str, tuple | None] = {}
        for role in ("student", "teacher"):
            shape = shapes.get(f"{role}_output")
            shape = kdhooks.feature_shape(shape) if known(shapes, f"{role}_output") else None
            probed = self._probed.pop(role, None)
            if isinstance(probed, kdhooks.ConfigError):
                raise probed
            features[role] = shape or probed
            if role in self._heads and features[role] is not None:
                self._check_width(role, features[role][-1])
        vocab = {role: self._heads[role].weight.shape[0] if role in self._heads else
                 None if features[role] is None else features[role][-1] for role in ("student", "teacher")}
        self._check_vocab(vocab["student"], vocab["teacher"])
        first, second = features["student"], features["teacher"]
        if first is not None and second is not None and first[:-1] != second[:-1]:
            raise kdhooks.ConfigError(self.location, f"lm_kd compares next-token distributions token by token, but "
                                      f"the student's output has shape {first} and the teacher's {second}",
                                      value=[first, second], fix="feed both models the same tokens (one tokenizer)")

    def _check_vocab(self, student: int | None, teacher: int | None) -> None:
        if student is not None and teacher is not None and student != teacher:
            raise kdhooks.ConfigError(self.location, f"the student's vocabulary has {student} entries and the "
                                      f"teacher's {teacher}: their next-token distributions cannot be compared",
                                      value=[student, teacher], fix="distill between models that share a tokenizer "
                                      "(resize_token_embeddings to one size if only padding entries differ)")

    def _check_width(self, role: str, width: int) -> None:
        head = self._heads[role]
        if head.weight.shape[1] != width:
            option = f"{role}_hidden" if getattr(self, f"{role}_hidden") else f"{role}_head"
            raise kdhooks.ConfigError(f"{self.location}.{option}", f"the {role}'s hidden states have {width} "
                                      f"features and its head {getattr(self, f'{role}_head')!r} takes "
                                      f"{head.weight.shape[1]}", value=getattr(self, option),
                                      fix="name the output that feeds the head (the backbone, e.g. `model`)")

    def _side(self, ctx: kdhooks.LossContext, role: str, value: Any) -> torch.Tensor | LinearHead:
        if not getattr(self, f"{role}_head"):
            return value
        hidden = _hidden_tensor(value, self, role)
        self._check_width(role, hidden.shape[-1])
        weight, bias = self._heads[role].weight, self._heads[role].bias
        if role != "student":
            weight, bias = weight.detach(), None if bias is None else bias.detach()
        return LinearHead(hidden, weight, bias)

    def _head(self, distiller: kdhooks.Distiller, role: str) -> nn.Module:
        """The output layer at ``<role>_head``: a linear layer whose weight makes the logits."""
        head_path = getattr(self, f"{role}_head")
        table = kdhooks.module_table(distiller.model(self.role(role)))
        linear = [path for path, module in table.items()
                  if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2]
        if head_path not in linear:
            raise kdhooks.ConfigError(f"{self.location}.{role}_head", f"the {role} has no linear output layer "
                                      f"at {head_path!r}", value=head_path,
                                      fix=kdhooks.did_you_mean(head_path, linear) or f"name its LM head: {linear[-1:]}")
        head = table[head_path]
        if hasattr(head, "base_layer") and any(hasattr(head, name) for name in ("lora_A", "lora_embedding_A")):
            raise kdhooks.ConfigError(f"{self.location}.{role}_head", f"the {role}'s head {head_path!r} carries a "
                                      f"LoRA adapter: its logits are not its weight times the hidden states",
                                      value=head_path, fix="leave the head out of the LoRA target_modules (train it "
                                      "fully with modules_to_save, or not at all), or distill from its logits "
                                      f"(unset {role}_head)")
        return head

    def loss(self, ctx: kdhooks.LossContext, student_output: torch.Tensor,
             teacher_output: torch.Tensor) -> torch.Tensor:
        student = self._side(ctx, "student", student_output)
        teacher = self._side(ctx, "teacher", teacher_output)
        self._check_vocab(student.weight.shape[0] if isinstance(student, LinearHead) else student.shape[-1],
                          teacher.weight.shape[0] if isinstance(teacher, LinearHead) else teacher.shape[-1])
        tokens = tuple((student.hidden if isinstance(student, LinearHead) else student).shape[:-1])
        if self._seq2seq:
            # the decoder's tokens: labels and decoder_attention_mask; the encoder's attention_mask is not theirs
            mask = lm_token_mask(tokens, labels=ctx.labels, attention_mask=ctx.extras.get("decoder_attention_mask"),
                                 causal=False, ignore_index=self.ignore_index)
        else:
            mask = lm_token_mask(tokens, labels=ctx.labels, attention_mask=ctx.extras.get("attention_mask"),
                                 causal=self._causal, ignore_index=self.ignore_index)
        loss = lm_kd_loss(student, teacher, mask=mask, divergence=self.divergence, beta=self.beta,
                          temperature=self.temperature, top_k=self.top_k, chunk_size=self.chunk_size,
                          compile=self.compile)
        return loss if self.temperature_squared else loss / self.temperature**2


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("hidden_states", HiddenStates)
    registry.add_term("attention_maps", AttentionMaps)
    registry.add_term("lm_kd", LMKD)
