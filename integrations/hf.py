"""HuggingFace ``Trainer`` integration: distillation inside the Trainer's own loop.

    trainer = DistillationTrainer(model=student, teacher=teacher, kd_config="kd.yaml",
                                  args=TrainingArguments(...), train_dataset=...)
    trainer.train()

or, for a Trainer subclass you already use (TRL's ``SFTTrainer``, your own):
``with_distillation(SFTTrainer)(model=..., teacher=..., kd_config=..., ...)``.

This module translates, nothing more: the teacher is called without labels,
on the student's device, under the Trainer's autocast; the Distiller's
parameters join the optimizer the Trainer creates; its state goes into every
checkpoint and comes back with ``resume_from_checkpoint``; its step follows
``state.global_step``; its terms are logged through ``Trainer.log`` next to
the task loss. No loss math lives here.
"""
from __future__ import annotations

import inspect
import itertools
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

import kdhooks

__all__ = ["DISTILLER_STATE", "DistillationMixin", "DistillationTrainer", "with_distillation"]

DISTILLER_STATE = "kdhooks_distiller.pt"
LOG_PREFIX = "distill/"
# inputs the Trainer adds for the student's own loss; the teacher is never given them
_STUDENT_ONLY = ("labels", "label", "label_ids", "num_items_in_batch", "return_loss", "fused_lm_head")


class DistillationMixin:
    """Adds a kdhooks Distiller to any ``transformers.Trainer`` class: ``class T(DistillationMixin, SFTTrainer)``.

    Extra keyword arguments: ``teacher`` (a model or ``{role: model}``),
    ``kd_config`` (YAML path, YAML string, dict or DistillConfig) and
    ``example_inputs`` (a batch for the Distiller's dry pass; by default two
    examples of ``train_dataset`` through the Trainer's collator).
    ``trainer.distiller`` is the Distiller.
    """

    def __init__(self, *args: Any, teacher: nn.Module | Mapping[str, nn.Module] | None = None,
                 kd_config: Any = None, example_inputs: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.model is None:
            raise kdhooks.ConfigError("model", "distillation needs the student as `model=`", fix="pass model=student "
                                      "(model_init is not supported)")
        device = next(self.model.parameters()).device
        teachers = dict(teacher) if isinstance(teacher, Mapping) else {} if teacher is None else {"teacher": teacher}
        for module in teachers.values():
            module.to(device)
        self._not_for_teacher = set(_STUDENT_ONLY) | set(self.label_names)
        fused = self._fused_lm_head()
        if example_inputs is None:
            example_inputs = self._example_batch()
            if fused:
                # the dry pass runs the student as compute_loss will, so what the fused head skips fails here
                example_inputs["fused_lm_head"] = True
        try:
            self.distiller = kdhooks.Distiller(self.model, teacher, kd_config, example_inputs=example_inputs,
                                               teacher_call=self._call_teacher)
        except kdhooks.ConfigError as error:
            if fused and ("holds no logits" in error.problem
                          or (error.location.endswith("_head") and "was not called" in error.problem)):
                raise _fused_head_error(type(self).__name__, error) from None
            raise
        self._meter = kdhooks.LossMeter()
        self.add_callback(_DistillerCallback(self.distiller))

    # --- the teacher ------------------------------------------------------------------------

    def _call_teacher(self, teacher: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The teacher on the student's inputs, without labels, under the Trainer's mixed precision.

        An encoder-decoder teacher decodes what the student decodes: the student
        makes its decoder inputs from ``labels`` (shifted right), so the teacher gets
        the same decoder inputs made the same way, and no labels.
        """
        labels = kwargs.get("labels")
        kwargs = {key: value for key, value in kwargs.items() if key not in self._not_for_teacher}
        if (labels is not None and getattr(getattr(teacher, "config", None), "is_encoder_decoder", False)
                and kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None):
            kwargs["decoder_input_ids"] = teacher.prepare_decoder_input_ids_from_labels(labels=labels)
        # the Distiller runs the teacher from a pre-hook, outside the autocast accelerate wraps forward in
        with self.accelerator.autocast():
            return teacher(*args, **kwargs)

    def _fused_lm_head(self) -> bool:
        """Whether compute_loss runs the student with TRL's fused LM head (``model(..., fused_lm_head=True)``).

        TRL's ``add_fused_lm_head`` replaces the forward of the model (under PEFT, of its base model)
        with one that takes ``fused_lm_head``; SFTTrainer's own loss passes it unless a
        ``compute_loss_func`` or label smoothing needs the logits.
        """
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        try:
            parameters = inspect.signature(model.forward, follow_wrapped=False).parameters
        except (TypeError, ValueError):
            return False
        return ("fused_lm_head" in parameters and self.compute_loss_func is None
                and getattr(self, "label_smoother", None) is None)

    def _example_batch(self) -> dict[str, Any]:
        dataset = self.train_dataset
        if dataset is None:
            raise kdhooks.ConfigError("train_dataset", "the Distiller's dry pass needs a batch and there is no "
                                      "train_dataset", fix="pass train_dataset= or example_inputs=")
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            items = [dataset[i] for i in range(min(2, len(dataset)))]
        else:
            items = list(itertools.islice(iter(dataset), 2))
        if self.args.remove_unused_columns and items and isinstance(items[0], Mapping):
            self._set_signature_columns_if_needed()
            items = [{k: v for k, v in item.items() if k in self._signature_columns} for item in items]
        return self._prepare_inputs(self.data_collator(items))

    # --- the loss -----------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        if not self.distiller.student.training:
            # evaluation: no teacher ran, no term to add
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        extras = dict(inputs)  # the parent may pop the labels
        if any(name in inputs for name in self.label_names) or self.compute_loss_func is not None:
            # outputs only when asked: TRL's SFTTrainer runs the model a second time to return them
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            task_loss, outputs = result if return_outputs else (result, None)
        else:
            # pure distillation on unlabeled text: the student runs, the terms are the loss
            outputs = model(**inputs)
            task_loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        self.distiller.step = self.state.global_step
        # a task loss already divided over the accumulated batch (num_items_in_batch) is brought back to a
        # per-batch mean for the Distiller, and the sum divided again, so the terms are averaged over
        # the micro-batches of one optimizer step too
        scaled = self._loss_scaled_for_accumulation(num_items_in_batch)
        scale = self.current_gradient_accumulation_steps if scaled else 1
        with self.accelerator.autocast():
            loss = self.distiller(None if task_loss is None else task_loss * scale, **extras) / scale
        self._meter.add(self.distiller)
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer will leave the loss undivided by the accumulation steps (as it decides it)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
            self.compute_loss_func is not None

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            self._average_distiller_gradients()
        return loss

    def _average_distiller_gradients(self) -> None:
        """The Distiller is not inside the student's DDP/FSDP wrapper: average its gradients across processes."""
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        if not params or not dist.is_initialized():
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """``max_grad_norm`` clips the student and the Distiller's connectors as one set, as one loop would."""
        own = [p for p in self.distiller.parameters() if p.requires_grad]
        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        mixed_meshes = getattr(self, "_has_mixed_mesh_grads", lambda model: False)(model)
        if not own or sharded or mixed_meshes:
            # the engine clips its own parameters (the connectors are not sharded with them)
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *own], self.args.max_grad_norm)

    # --- the optimizer ------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        user_scheduler = self.lr_scheduler is not None
        optimizer = super().create_optimizer(model)
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = {name: p for name, p in self.distiller.named_parameters() if p.requires_grad and id(p) not in present}
        if not missing:
            return optimizer
        if user_scheduler:
            raise kdhooks.ConfigError("optimizers", "the optimizer you passed lacks the Distiller's parameters "
                                      "(connectors, heads), and its scheduler cannot take new ones",
                                      fix="build it with [*student.parameters(), *trainer.distiller.parameters()], "
                                      "or pass no scheduler")
        decay = set(self.get_decay_parameter_names(self.distiller))
        for params, weight_decay in (([p for n, p in missing.items() if n in decay], self.args.weight_decay),
                                     ([p for n, p in missing.items() if n not in decay], 0.0)):
            if params:
                optimizer.add_param_group({"params": params, "weight_decay": weight_decay})
        return optimizer

    # --- logging ----------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._meter.steps:
            logged = self._meter.means()
            names = sorted(logged)
            means = torch.tensor([logged[n] for n in names], dtype=torch.float64)
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means.to(self.args.device), reduction="mean").cpu()
            logs.update({f"{LOG_PREFIX}{name}": float(value) for name, value in zip(names, means)})
            self._meter.reset()
        super().log(logs, *args, **kwargs)

    # --- checkpoints ----------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            self._load_distiller_state(checkpoint)
        self._meter.reset()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_distiller_state(self, checkpoint: str | os.PathLike) -> None:
        path = os.path.join(checkpoint, DISTILLER_STATE)
        if not os.path.isfile(path):
            warnings.warn(f"{checkpoint} holds no {DISTILLER_STATE}: the Distiller's connectors start afresh "
                          f"(was this checkpoint written without distillation?)", stacklevel=3)
            return
        device = next(self.distiller.student.parameters()).device
        self.distiller.load_state_dict(torch.load(path, map_location=device, weights_only=True))


def _fused_head_error(trainer: str, error: kdhooks.ConfigError) -> kdhooks.ConfigError:
    """A dry pass under TRL's fused LM head that met no logits, or a head never called: what to set instead."""
    role = "teacher" if ".teacher" in error.location else "student"
    what = "builds no logits" if "holds no logits" in error.problem else f"never calls {error.value!r}"
    return kdhooks.ConfigError(error.location, f"{trainer} runs the student with a fused LM head "
                               f"(fused_lm_head=True), which {what}: lm_kd has neither the logits nor the "
                               f"hidden states at the head's input", value=error.value,
                               fix=f"set {role}_head: lm_head and {role}_hidden to the backbone whose "
                               f"last_hidden_state feeds it (`model` in Llama/GPT-2 style models, also under PEFT)")


class _DistillerCallback(TrainerCallback):
    """Clears the Distiller's gradients after each optimizer step; saves its state into each checkpoint."""

    def __init__(self, distiller: kdhooks.Distiller):
        self.distiller = distiller

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the Trainer zeroes only the model's gradients (model.zero_grad()), not the optimizer's
        self.distiller.zero_grad(set_to_none=True)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            torch.save(self.distiller.state_dict(), os.path.join(folder, DISTILLER_STATE))


class DistillationTrainer(DistillationMixin, Trainer):
    """``transformers.Trainer`` that distills ``teacher`` into ``model`` as ``kd_config`` says."""


def with_distillation(trainer_class: type[Trainer]) -> type[Trainer]:
    """A subclass of ``trainer_class`` (e.g. TRL's SFTTrainer) that takes ``teacher=`` and ``kd_config=``."""
    if issubclass(trainer_class, DistillationMixin):
        return trainer_class
    return type(f"Distillation{trainer_class.__name__}", (DistillationMixin, trainer_class),
                {"__doc__": f"{trainer_class.__name__} with knowledge distillation (kdhooks)."})
