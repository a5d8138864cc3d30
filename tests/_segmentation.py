"""torchvision segmentation models (random init, no download) and tiny batches for the segmentation tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn

CLASSES = 3


def segmentation_models():
    return pytest.importorskip("torchvision.models.segmentation")


def mobile_pair() -> tuple[nn.Module, nn.Module]:
    """Student LR-ASPP MobileNetV3, teacher DeepLabV3 MobileNetV3 with its auxiliary head (dict outputs)."""
    models = segmentation_models()
    torch.manual_seed(0)
    student = models.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=CLASSES)
    teacher = models.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=CLASSES,
                                                  aux_loss=True)
    return student, teacher


def resnet_teacher() -> nn.Module:
    """DeepLabV3 ResNet-50 with its auxiliary FCN head: the issue's teacher."""
    models = segmentation_models()
    torch.manual_seed(1)
    return models.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=True)


def seg_batch(n: int = 4, size: int = 32, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, size, size) and masks (N, size, size) of class indices with a band of ignored (255) pixels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    masks = torch.randint(0, CLASSES, (n, size, size), generator=g)
    masks[:, : size // 8] = 255
    return images, masks
