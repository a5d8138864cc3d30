"""On-policy distillation inside any HF Trainer: GKD (Agarwal et al. 2024), as TRL's GKDTrainer does it.

With probability ``lmbda`` per training batch the student continues the batch's
prompts (``generate``); with ``seq_kd`` the teacher continues the others. The
batch is replaced by the generated sequences (prompt masked out of the labels),
and the Trainer's loss runs on them as on any batch: the student's forward runs
the teacher too, and the terms compare both models on the sampled sequences.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn
from transformers import GenerationConfig

import kdhooks

_PROMPT_COLUMNS = ("prompts", "prompt_attention_mask")


class OnPolicyBatches:
    """Draws, per training batch, which model generates its sequences, and makes the batch from them.

    ``generated`` counts the batches each model generated (``student``, ``teacher``).
    """

    def __init__(self, trainer: Any, options: kdhooks.OnPolicy, example_batch: Any):
        self.options = options
        self.seed = trainer.args.seed if options.seed is None else options.seed
        self.generated = {"student": 0, "teacher": 0}
        self._step, self._micro_batch = -1, 0
        student, teacher = trainer.distiller.student, trainer.distiller.teacher
        for role, model in (("student", student), ("teacher", teacher if options.seq_kd else None)):
            config = getattr(model, "config", None)
            if getattr(config, "is_encoder_decoder", False):
                raise kdhooks.ConfigError("on_policy", f"the {role} is an encoder–decoder model: on-policy "
                                          f"distillation continues the prompts of a decoder-only (causal) LM",
                                          fix="remove on_policy: for T5/BART, distil on the dataset's targets")
            if model is not None and not hasattr(model, "generate"):
                raise kdhooks.ConfigError("on_policy", f"the {role} ({type(model).__name__}) has no generate()",
                                          fix="use a transformers model with a generation head (…ForCausalLM)")
        if options.seq_kd and teacher is None:
            raise kdhooks.ConfigError("on_policy.seq_kd", "seq_kd has the teacher generate, and no model is "
                                      "attached as `teacher`", value=True,
                                      fix="pass teacher=model (or {'teacher': model, ...}), or set seq_kd: false")
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        if getattr(trainer, "is_fsdp_enabled", False) or getattr(plugin, "zero_stage", None) == 3:
            # generate() runs on the unwrapped student, whose parameters these engines shard
            raise kdhooks.ConfigError("on_policy", "on-policy distillation generates with the whole student, and "
                                      "FSDP / DeepSpeed ZeRO-3 shard its parameters (not supported yet)",
                                      fix="use DDP or DeepSpeed ZeRO-1/2, or remove on_policy:")
        self.pad_token_id = _pad_token_id(trainer, student)
        if isinstance(example_batch, Mapping):
            # a batch that marks no prompt (the whole sequence trained) fails here, not at the first draw
            kdhooks.OnPolicy.prompts(example_batch)

    def batch(self, trainer: Any, model: nn.Module, inputs: dict[str, Any],
              num_items_in_batch: Any) -> tuple[dict[str, Any], Any]:
        """This batch, or the batch of sequences generated from its prompts, with its token count.

        A generated batch has its own number of trained tokens, unknown to the Trainer when it counted
        ``num_items_in_batch`` over the data's labels: it is given as None, so its loss is its own mean
        (divided over the accumulation steps by the Trainer).
        """
        step = trainer.state.global_step
        self._micro_batch = self._micro_batch + 1 if step == self._step else 0
        self._step = step
        source = self.options.source(self.seed, step, self._micro_batch)
        if source is None:
            # the prompt columns of TRL's ChatML collator are for generating, not for the models' forward
            return {k: v for k, v in inputs.items() if k not in _PROMPT_COLUMNS}, num_items_in_batch
        inputs = trainer._prepare_inputs(inputs)
        generator = trainer.accelerator.unwrap_model(model) if source == "student" else trainer.distiller.teacher
        prompts = kdhooks.OnPolicy.prompts(inputs)
        prompt_ids, prompt_mask = kdhooks.OnPolicy.prompt_batch(prompts, self.pad_token_id)
        config = self.generation_config(generator)
        # eval mode: no dropout while sampling, and the Distiller records (and runs the teacher) only on the
        # student's training forwards, so generating is invisible to the terms
        with _in_eval_mode(generator), trainer.accelerator.autocast():
            sequences = generator.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                           generation_config=config)
        self.generated[source] += 1
        return kdhooks.OnPolicy.training_batch(sequences, prompt_mask, config.eos_token_id, self.pad_token_id), None

    def generation_config(self, model: nn.Module) -> GenerationConfig:
        """The configured sampling, with the model's own EOS tokens (a chat model may stop on several)."""
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        # in eval mode gradient checkpointing is off, so the KV cache is usable whatever the training uses
        return GenerationConfig(**self.options.generation_kwargs(), use_cache=True, pad_token_id=self.pad_token_id,
                                eos_token_id=eos)


def on_policy_batches(trainer: Any, example_batch: Any) -> OnPolicyBatches | None:
    """The trainer's on-policy batches if its config has ``on_policy:``; a config that cannot work closes the
    Distiller (its hooks leave the student) and raises."""
    options = trainer.distiller.config.on_policy
    if options is None:
        return None
    try:
        batches = OnPolicyBatches(trainer, options, example_batch)
        trainer.distiller.applies_on_policy = True
        return batches
    except kdhooks.ConfigError:
        trainer.distiller.close()
        raise


def _pad_token_id(trainer: Any, student: nn.Module) -> int:
    """The tokenizer's pad token, else the model's, else its EOS (as generate pads finished rows)."""
    tokenizer = getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    candidates = [getattr(tokenizer, "pad_token_id", None)]
    for holder in (getattr(student, "generation_config", None), getattr(student, "config", None)):
        candidates += [getattr(holder, "pad_token_id", None), getattr(holder, "eos_token_id", None)]
    for candidate in candidates:
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int):
            return candidate
    raise kdhooks.ConfigError("on_policy", "no pad token to left-pad the prompts with: neither the tokenizer "
                              "(processing_class) nor the student's config has a pad or EOS token id",
                              fix="pass processing_class=tokenizer, or set model.config.pad_token_id")


@contextlib.contextmanager
def _in_eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode, each submodule's own mode restored after (a frozen part stays in eval)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


__all__ = ["OnPolicyBatches", "on_policy_batches"]
