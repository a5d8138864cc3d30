"""MMSegmentation (1.x, mmengine) integration: a segmentor in mmseg's ``MODELS`` that distills a student.

In an ordinary mmseg config::

    custom_imports = dict(imports=['kdhooks.integrations.mmseg'], allow_failed_imports=False)
    model = dict(type='DistilledSegmentor',
                 student=dict(type='EncoderDecoder', ...),      # the student segmentor's model config
                 teacher='teacher_config.py',                   # or a segmentor config, or a module
                 teacher_ckpt='teacher.pth',
                 kd=dict(terms=[dict(kind='seg_pixel_kd', student='decode_head.conv_seg',
                                     teacher='decode_head.conv_seg', weight=10)]))

It reuses the MMDetection adapter's machinery (``kdhooks.integrations.mmdet``:
mmengine's checkpoints allowed under torch's ``weights_only`` loading, the
teacher's checkpoint loaded in that context) and translates as it does: the
student and the Distiller's parts are submodules (optimized, checkpointed, DDP-
wrapped), the teacher is not (frozen, eval, moved with the model, never saved).
``loss`` mode returns the student's losses plus each term as ``loss_kd_<name>``
and the terms' metrics as ``kd_<name>``; ``predict`` and ``tensor`` are the
student's. The teacher runs in ``tensor`` mode on the student's preprocessed
inputs (both models must normalize alike). The ground-truth masks reach the
terms as ``labels`` (``(N, H, W)``, the preprocessor's padding as
``ignore_index`` 255). The Distiller's step follows the Runner's iteration.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import MessageHub
from mmengine.model import BaseModel
from mmseg.registry import MODELS
from torch import nn

import kdhooks
from kdhooks.integrations.mmdet import allow_mmengine_checkpoints, mmengine_checkpoint_loader

__all__ = ["DistilledSegmentor", "build_segmentor"]


def _config(value: Any) -> Any:
    if isinstance(value, ConfigDict):
        return value.to_dict()
    return value


def build_segmentor(model: Any, checkpoint: str | None = None) -> nn.Module:
    """A segmentor from a model config, a config file (its ``model``) or a module, with ``checkpoint`` loaded."""
    from mmengine.runner import load_checkpoint

    given = isinstance(model, nn.Module)
    if isinstance(model, (str, Path)):
        model = Config.fromfile(str(model)).model
    module = model if given else MODELS.build(ConfigDict(model) if isinstance(model, dict) else model)
    if checkpoint is not None:
        with mmengine_checkpoint_loader():
            load_checkpoint(module, str(checkpoint), map_location="cpu", strict=True, logger="current")
    elif not given:
        warnings.warn("DistilledSegmentor: no teacher_ckpt; the teacher has the weights its init_cfg gives",
                      stacklevel=3)
        module.init_weights()
    return module


def _tensor_mode(teacher: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The teacher on the student's preprocessed images: its whole network, no post-processing."""
    return teacher(args[0] if args else kwargs["inputs"], mode="tensor")


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")


@MODELS.register_module()
class DistilledSegmentor(BaseModel):
    """A student segmentor trained with a kdhooks Distiller against a frozen teacher segmentor.

    Args:
        student: the student segmentor's model config (e.g. an ``EncoderDecoder``).
        teacher: the teacher's model config, the path of its config file, or the teacher itself.
        kd: the kdhooks config (dict, YAML path or YAML string).
        teacher_ckpt: the teacher's weights.
        example_size: (height, width) of the zeros image the Distiller's dry pass runs on.
        data_preprocessor: defaults to the student's.
    """

    def __init__(self, student: dict, teacher: Any, kd: Any, teacher_ckpt: str | None = None,
                 example_size: tuple[int, int] = (64, 64), data_preprocessor: dict | None = None,
                 init_cfg: dict | None = None):
        allow_mmengine_checkpoints()  # the Runner builds the model before it resumes
        student = _config(student)
        if data_preprocessor is None:
            data_preprocessor = student.get("data_preprocessor")
        super().__init__(data_preprocessor=_config(data_preprocessor), init_cfg=init_cfg)
        self.student = MODELS.build(ConfigDict(student))
        teacher_model = build_segmentor(_config(teacher), teacher_ckpt)
        # not a submodule: out of state_dict, parameters() and DDP; moved with the model in _apply
        object.__setattr__(self, "teacher", teacher_model)
        example = torch.zeros(1, 3, *example_size)
        self.distiller = kdhooks.Distiller(self.student, teacher_model, _config(kd), example_inputs=example,
                                           teacher_call=_tensor_mode)

    def _apply(self, fn: Any, recurse: bool = True) -> DistilledSegmentor:
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, inputs: torch.Tensor, data_samples: list | None = None, mode: str = "tensor") -> Any:
        if mode != "loss":
            return self.student(inputs, data_samples, mode=mode)
        step = MessageHub.get_current_instance().get_info("iter")
        if step is not None:
            self.distiller.step = step
        losses = self.student(inputs, data_samples, mode="loss")
        labels = torch.stack([sample.gt_sem_seg.data[0] for sample in data_samples]).long()
        task_weight = self.distiller.current_task_weight
        parts = self.distiller.loss_parts(None, labels=labels)
        if task_weight != 1.0:
            losses = {name: value * task_weight if "loss" in name else value for name, value in losses.items()}
        for name, value in parts.items():
            losses[f"loss_kd_{_key(name)}"] = value
        for name, value in self.distiller.last_metrics.items():
            if "loss" not in name:  # mmengine would add it to the loss
                losses[f"kd_{_key(name)}"] = torch.as_tensor(value, dtype=torch.float32).detach()
        return losses
