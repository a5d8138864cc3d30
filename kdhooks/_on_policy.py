"""On-policy distillation's options and batch surgery: training on sequences a model generates.

The config's ``on_policy:`` mapping; an integration (``kdhooks.integrations.hf``)
reads it, asks :meth:`OnPolicy.source` which model, if any, generates for a
batch, finds each row's prompt, has that model continue the prompts, and trains
on :meth:`OnPolicy.training_batch` instead. Pure torch: no framework here.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ._errors import ConfigError
from ._options import Options, PositiveInt, UnitInterval

IGNORE_INDEX = -100
# (0, 1]: top_p = 0 would keep no token
_TopP = Annotated[float, Field(strict=True, gt=0, le=1)]
_PositiveFinite = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
_NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
# batch keys of a padding-free (packed) batch: its rows are not sequences one can continue
_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")


class OnPolicy(Options):
    """On-policy distillation, GKD (Agarwal et al. 2024): with probability ``lmbda`` per batch the student
    continues the batch's prompts and the terms are computed on its own sequences, scored by both models.

    ``seq_kd``: the other batches are continued by the teacher instead (sequence-level KD) rather than kept.
    ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k`` (0: off) are passed to
    ``generate``; the defaults are TRL GKDTrainer's. ``seed`` seeds the per-batch draw (default: the
    trainer's seed).
    """

    lmbda: UnitInterval = 0.5
    seq_kd: bool = False
    max_new_tokens: PositiveInt = 128
    do_sample: bool = True
    temperature: _PositiveFinite = 0.9
    top_p: _TopP = 1.0
    top_k: _NonNegativeInt = 0
    seed: int | None = None

    def source(self, seed: int, step: int, micro_batch: int) -> Literal["student", "teacher"] | None:
        """Which model generates this batch's sequences: ``student`` with probability lmbda, else
        ``teacher`` under seq_kd, else none (the batch is kept).

        One draw per (seed, optimizer step, micro-batch), independent of what ran before: a resumed run
        draws as the uninterrupted one did, and every process draws alike, so they generate together.
        """
        # a str seed is hashed with SHA-512 by random.Random: the same draw in every process and Python run
        draw = random.Random(f"kdhooks.on_policy:{seed}:{step}:{micro_batch}").random()
        if draw < self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else None

    def generation_kwargs(self) -> dict[str, Any]:
        """The sampling options as ``generate`` takes them."""
        options = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            options.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return options

    @staticmethod
    def prompts(batch: Mapping[str, Any], location: str = "on_policy") -> list[torch.Tensor]:
        """Each row's prompt tokens (1-D), found as TRL's collators mark them.

        In order: ``prompts`` with ``prompt_attention_mask`` (GKD's ChatML collator, left-padded);
        else the tokens before the first ``completion_mask`` 1; else the tokens before the first
        label that is not -100 (SFTTrainer's prompt-completion data, the Trainer's LM batches).
        Padding is read from ``attention_mask``, on either side. A row with nothing to continue from
        (its first token is trained) is a ConfigError: on-policy distillation needs prompts.
        """
        if any(key in batch for key in _PACKED_KEYS):
            raise ConfigError(location, "the batch is padding-free (packed sequences in one row): on-policy "
                              "distillation continues each sequence's prompt and cannot find them there",
                              fix="set padding_free: false (and packing: false) in the SFTConfig")
        if "prompts" in batch:
            ids = batch["prompts"]
            mask = batch.get("prompt_attention_mask")
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            return [row[keep] for row, keep in zip(ids, real)]
        if "input_ids" not in batch:
            raise ConfigError(location, f"the batch has no input_ids (keys: {', '.join(map(str, batch))})",
                              fix="on-policy distillation needs token batches of a causal LM")
        ids = batch["input_ids"]
        real = batch["attention_mask"].bool() if batch.get("attention_mask") is not None else torch.ones_like(
            ids, dtype=torch.bool)
        if batch.get("completion_mask") is not None:
            trained, marked_by = batch["completion_mask"].bool() & real, "completion_mask"
        elif batch.get("labels") is not None and batch["labels"].shape == ids.shape:
            trained, marked_by = (batch["labels"] != IGNORE_INDEX) & real, "labels"
        else:
            raise ConfigError(location, "the batch marks no prompt: it has neither prompts, completion_mask nor "
                              "token labels", fix=_PROMPT_FIX)
        positions = torch.arange(ids.shape[1], device=ids.device)
        # a row with nothing trained is all prompt
        first_trained = torch.where(trained, positions, ids.shape[1]).min(dim=1).values
        prompts = [row[keep & (positions < first)] for row, keep, first in zip(ids, real, first_trained)]
        empty = [i for i, prompt in enumerate(prompts) if prompt.numel() == 0]
        if empty:
            raise ConfigError(location, f"row {empty[0]} of the batch has no prompt: its {marked_by} train the "
                              f"whole sequence from its first token, so there is nothing to continue from",
                              value=len(empty), fix=_PROMPT_FIX)
        return prompts

    @staticmethod
    def prompt_batch(prompts: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts left-padded (a decoder-only model continues each row from its last column): ids, mask."""
        width = max(prompt.numel() for prompt in prompts)
        ids = prompts[0].new_full((len(prompts), width), pad_token_id)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - prompt.numel():] = prompt
            mask[row, width - prompt.numel():] = 1
        return ids, mask

    @staticmethod
    def training_batch(sequences: torch.Tensor, prompt_attention_mask: torch.Tensor,
                       eos_token_ids: int | Sequence[int] | None, pad_token_id: int) -> dict[str, torch.Tensor]:
        """A batch to train on from ``generate``'s output (left-padded prompts, then the new tokens).

        Each row is its prompt, then its continuation up to and including the first EOS, right-padded;
        labels are the continuation's tokens, -100 on the prompt, after EOS and on padding. The rows are
        flushed left so every sequence starts at position 0, as it did when it was generated.
        """
        width = prompt_attention_mask.shape[1]
        continuation = sequences[:, width:]
        kept = torch.ones_like(continuation, dtype=torch.bool)
        if eos_token_ids is not None and continuation.numel():
            eos = torch.as_tensor(eos_token_ids, device=sequences.device).reshape(-1)
            is_eos = torch.isin(continuation, eos)
            # tokens after the first EOS are generate's padding of a finished row
            kept = (is_eos.int().cumsum(dim=1) - is_eos.int()) == 0
        real = torch.cat([prompt_attention_mask.bool(), kept], dim=1)
        trained = torch.cat([torch.zeros_like(prompt_attention_mask, dtype=torch.bool), kept], dim=1)
        lengths = real.sum(dim=1)
        length = int(lengths.max())
        ids = sequences.new_full((sequences.shape[0], length), pad_token_id)
        labels = sequences.new_full((sequences.shape[0], length), IGNORE_INDEX)
        for row in range(sequences.shape[0]):
            tokens = sequences[row][real[row]]
            ids[row, :tokens.numel()] = tokens
            labels[row, :tokens.numel()] = torch.where(trained[row][real[row]], tokens, IGNORE_INDEX)
        mask = (torch.arange(length, device=sequences.device) < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


_PROMPT_FIX = ("give the batches prompts: labels of -100 on the prompt tokens (SFTTrainer: a dataset with `prompt` "
               "and `completion` columns), a `completion_mask`, or `prompts` with `prompt_attention_mask` "
               "columns (TRL's DataCollatorForChatML)")


def on_policy_options(value: Any, location: str = "on_policy") -> OnPolicy | None:
    """The config's ``on_policy`` value validated: a mapping of options, an OnPolicy, or None (off)."""
    if value is None:
        return None
    if isinstance(value, OnPolicy):
        # made in Python: its fields were not validated, so they are now, like the config's
        values = {name: getattr(value, name) for name in OnPolicy.option_names()}
    elif isinstance(value, Mapping):
        values = dict(value)
    else:
        raise ConfigError(location, f"on_policy must be a mapping of options, got {value!r}", value=value,
                          fix="write `on_policy: {lmbda: 0.5, max_new_tokens: 64}`")
    return OnPolicy.validate(values, location)
