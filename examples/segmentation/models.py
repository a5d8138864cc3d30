"""torchvision's segmentation architectures on backbones small enough to train on a CPU in minutes.

The teacher is torchvision's ``DeepLabV3`` (ASPP head, an FCN auxiliary head),
the student torchvision's ``LRASPP`` (the head of ``lraspp_mobilenet_v3_large``),
each on a plain conv backbone that returns the ``OrderedDict`` of features
torchvision's segmentation models read (``out``/``aux``, ``low``/``high``).
Both return dicts: ``{"out": ..., "aux": ...}`` and ``{"out": ...}``. The
full-size models (``deeplabv3_resnet50``, ``lraspp_mobilenet_v3_large``) work
the same way with kdhooks (tests/test_plugins_segmentation.py); they are too
slow to train here on a CPU.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.models.segmentation.lraspp import LRASPP


def stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Backbone(nn.Module):
    """Three conv stages at strides 2, 4 and 8 (widths w, 2w, 4w); returns the named features of two of them."""

    def __init__(self, width: int, names: dict[str, str]):
        super().__init__()
        self.stage1 = stage(3, width, 2)
        self.stage2 = stage(width, 2 * width, 2)
        self.stage3 = stage(2 * width, 4 * width, 2)
        self.names = names  # stage name -> output key

    def forward(self, x: torch.Tensor) -> OrderedDict:
        features = OrderedDict()
        for name in ("stage1", "stage2", "stage3"):
            x = getattr(self, name)(x)
            if name in self.names:
                features[self.names[name]] = x
        return features


def teacher(classes: int = 3, width: int = 32) -> DeepLabV3:
    """DeepLabV3 (ASPP on the stride-8 stage, 256 channels) with an FCN auxiliary head on the stride-4 stage."""
    backbone = Backbone(width, {"stage2": "aux", "stage3": "out"})
    return DeepLabV3(backbone, DeepLabHead(4 * width, classes), FCNHead(2 * width, classes))


def student(classes: int = 3, width: int = 8) -> LRASPP:
    """LR-ASPP on the stride-4 (low) and stride-8 (high) stages: the head of lraspp_mobilenet_v3_large."""
    backbone = Backbone(width, {"stage2": "low", "stage3": "high"})
    return LRASPP(backbone, 2 * width, 4 * width, classes, inter_channels=32)
