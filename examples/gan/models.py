"""A pix2pix-style U-Net generator and a conditional PatchGAN discriminator, sized for 16x16 digits."""
from __future__ import annotations

import torch
from torch import nn


class UNet(nn.Module):
    """pix2pix's U-Net, three levels (16x16 → 2x2): conv-BN-LeakyReLU down, deconv-BN-(dropout)-ReLU up, skips.

    ``width`` is pix2pix's ``ngf``; the student has a quarter of the teacher's.
    The dropout of the innermost up-block is pix2pix's noise.
    """

    def __init__(self, width: int = 32, channels: int = 1, dropout: float = 0.5):
        super().__init__()
        w = width
        self.down1 = nn.Sequential(nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(0.2))
        self.down2 = nn.Sequential(nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2))
        self.down3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.ReLU())
        self.up3 = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w),
                                 nn.Dropout(dropout), nn.ReLU())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(4 * w, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU())
        self.up1 = nn.Sequential(nn.ConvTranspose2d(2 * w, channels, 4, 2, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        d2 = self.down2(d1)
        u3 = self.up3(self.down3(d2))
        u2 = self.up2(torch.cat([u3, d2], 1))
        return self.up1(torch.cat([u2, d1], 1))


class PatchCritic(nn.Module):
    """pix2pix's conditional PatchGAN (input ⊕ image → a 4x4 map of real/fake logits), ``ndf`` = ``width``."""

    def __init__(self, width: int = 32, channels: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(2 * channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
                                    nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
                                    nn.Conv2d(2 * width, 1, 3, 1, 1))

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([condition, image], 1))
