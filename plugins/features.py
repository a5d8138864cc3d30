"""Matching intermediate features: the features themselves (FitNets), their distributions (NST), their factors (FT).

Constants against the reference code, and how to port a published weight: docs/conventions.md.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import kdhooks

from ._layers import WeightedLayers, check_pairs, check_same_batch, known, resized, shape, smaller_grid, tensor_of


def fitnets_loss(student_hint: torch.Tensor, teacher_guided: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the regressed student hint and the teacher's guided layer."""
    if student_hint.shape != teacher_guided.shape:
        # mse_loss would broadcast a batch of one (or a width of one) with only a warning
        raise ValueError(f"fitnets compares the regressed hint {tuple(student_hint.shape)} with the guided layer "
                         f"{tuple(teacher_guided.shape)} element by element: their shapes differ")
    return F.mse_loss(student_hint.float(), teacher_guided.float())


class FitNets(kdhooks.Term):
    """FitNets: hints for thin deep nets (Romero et al. 2015): ||r(student hint) − teacher guided||².

    The element mean, as RepDistiller's ``HintLoss`` (its weight 100 ports as
    is); the paper's ½‖·‖² sums over a sample's elements. The default
    connector is a 1x1 conv, RepDistiller's ``ConvReg`` a 3x3 conv + BN + ReLU
    (docs/conventions.md).
    """

    student: str
    teacher: str
    connector: str = "auto"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_hint": kdhooks.Tap("student", self.student),
                "teacher_guided": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        # the connector joins widths and grids (build() names the shapes it cannot join); the samples must agree
        if known(shapes, "student_hint", "teacher_guided"):
            check_same_batch(self, (self.student, self.teacher), kdhooks.feature_shape(shapes["student_hint"]),
                             kdhooks.feature_shape(shapes["teacher_guided"]))

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        self.regressor = distiller.add_connector(self.name, shapes["student_hint"], shapes["teacher_guided"],
                                                 self.connector, location=f"{self.location}.connector")

    def loss(self, ctx: kdhooks.LossContext, student_hint: torch.Tensor,
             teacher_guided: torch.Tensor) -> torch.Tensor:
        return fitnets_loss(self.regressor(student_hint), teacher_guided)


# --- neural selectivity transfer ---------------------------------------------------------


def selectivity_samples(feature: torch.Tensor) -> torch.Tensor:
    """Each channel's responses over positions, L2-normalized: (N, C, H·W) for conv maps, (N, D, L) for tokens."""
    feature = feature.float()
    samples = feature.flatten(2) if feature.dim() == 4 else feature.transpose(1, 2)
    return F.normalize(samples, dim=2)


def _kernel(first: torch.Tensor, second: torch.Tensor, kernel: str, degree: int, bandwidth: torch.Tensor | None):
    if kernel == "gaussian":
        return torch.exp(-torch.cdist(first, second).pow(2) / (2 * bandwidth[:, None, None]))
    products = first @ second.transpose(1, 2)
    return products if kernel == "linear" else products.pow(degree)


def mmd_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor,
             kernel: Literal["linear", "polynomial", "gaussian"] = "polynomial", degree: int = 2) -> torch.Tensor:
    """MMD² between the channel-wise normalized distributions, averaged over samples.

    MMD² = 1/C_T² Σ k(t_i, t_i') + 1/C_S² Σ k(s_j, s_j') − 2/(C_T C_S) Σ k(s_j, t_i), with
    k linear (xᵀy), polynomial ((xᵀy)^d, c = 0) or gaussian (exp(−‖x − y‖²/2σ²), σ² the mean
    squared distance of the pairs). Channel counts may differ; conv maps of different
    sizes are pooled to the smaller grid.
    """
    student_feature, teacher_feature = smaller_grid(student_feature, teacher_feature)
    student, teacher = selectivity_samples(student_feature), selectivity_samples(teacher_feature)
    bandwidth = None
    if kernel == "gaussian":
        pooled = torch.cat([student, teacher], dim=1)
        squared = torch.cdist(pooled, pooled).pow(2)
        pairs = pooled.shape[1] * (pooled.shape[1] - 1)
        bandwidth = (squared.sum((1, 2)) / pairs).detach().clamp_min(1e-12)  # the diagonal adds zeros
    return (_kernel(teacher, teacher, kernel, degree, bandwidth).mean((1, 2))
            + _kernel(student, student, kernel, degree, bandwidth).mean((1, 2))
            - 2 * _kernel(student, teacher, kernel, degree, bandwidth).mean((1, 2))).mean()


class MMD(WeightedLayers):
    """Like what you like: neuron selectivity transfer (Huang & Wang 2017): MMD² of channel-normalized features.

    ``student`` and ``teacher`` are one path or equal-length lists, summed with
    ``layer_weights`` (default ``equal``). Channels are the samples of the
    distribution, so widths may differ; conv maps need no connector, token
    features (N, L, D) need the same length. The paper weighs the term λ/2
    (set it with ``weight``); RepDistiller's ``NSTLoss`` is this MMD² (polynomial
    kernel) and its weight 50 ports as is (docs/conventions.md).
    """

    kernel: Literal["linear", "polynomial", "gaussian"] = "polynomial"
    degree: kdhooks.PositiveInt = 2

    def check(self, shapes: dict[str, Any]) -> None:
        check_pairs(self, self.pairs, shapes, (4, 3), "a neuron's selectivity is its response over positions")

    def loss(self, ctx: kdhooks.LossContext, **features: Any) -> torch.Tensor:
        return self.weighted([mmd_loss(tensor_of(features[f"student_{i}"]), tensor_of(features[f"teacher_{i}"]),
                                       self.kernel, self.degree) for i in range(len(self.pairs))])


# --- factor transfer ---------------------------------------------------------------------


def _conv_stack(channels: list[int], transposed: bool = False, last_activation: bool = True) -> nn.Sequential:
    convolution = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
        layers.append(convolution(c_in, c_out, 3, padding=1))
        if i < len(channels) - 2 or last_activation:
            layers += [nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


def _token_stack(sizes: list[int], last_activation: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The teacher's feature → a factor with ``rate`` × its channels (encoder) → the feature again (decoder)."""

    def __init__(self, feature_shape: tuple[int, ...], rate: float = 0.5):
        super().__init__()
        channels = feature_shape[1] if len(feature_shape) == 4 else feature_shape[-1]
        factor = max(1, int(channels * rate))
        if len(feature_shape) == 4:
            self.encoder = _conv_stack([channels, channels, channels, factor])
            self.decoder = _conv_stack([factor, channels, channels, channels], transposed=True, last_activation=False)
        else:
            self.encoder = _token_stack([channels, channels, channels, factor])
            self.decoder = _token_stack([factor, channels, channels, channels], last_activation=False)
        self.factor_channels = factor

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(feature))


class Translator(nn.Module):
    """The student's feature → a factor of the paraphraser's size (and spatial size, for conv maps)."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], factor_channels: int):
        super().__init__()
        self.size = tuple(teacher_shape[2:]) if len(teacher_shape) == 4 else None
        channels = student_shape[1] if len(student_shape) == 4 else student_shape[-1]
        sizes = [channels, channels, channels, factor_channels]
        self.layers = _conv_stack(sizes) if self.size else _token_stack(sizes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            feature = resized(feature, self.size)
        return self.layers(feature)


def factor_transfer_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: int = 1) -> torch.Tensor:
    """‖F_S/‖F_S‖₂ − F_T/‖F_T‖₂‖_p^p per sample, averaged over samples and factor elements (the authors' L1 mean)."""
    student_factor = F.normalize(student_factor.float().flatten(1), dim=1)
    teacher_factor = F.normalize(teacher_factor.float().flatten(1), dim=1)
    return (student_factor - teacher_factor).abs().pow(p).mean()


def reconstruction_loss(feature: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """‖x − P(x)‖², averaged: the paraphraser's unsupervised objective."""
    return F.mse_loss(reconstruction.float(), feature.float())


class FT(kdhooks.Term):
    """Paraphrasing complex network: factor transfer (Kim et al. 2018): β ‖F_T/‖F_T‖ − F_S/‖F_S‖‖_p, p = 1.

    A paraphraser (conv encoder to ``rate`` = 0.5 × the teacher's channels,
    decoder back) learns the teacher's factor F_T by reconstruction; a
    translator maps the student's feature to F_S. The plugin trains the
    paraphraser itself (its own Adam, ``paraphraser_lr``) for the first
    ``paraphraser_steps`` steps, during which the term adds nothing, and keeps
    it frozen afterwards unless ``joint``; the user's optimizer trains the
    translator with the student (``kd.parameters()``). β = 500 as in the paper;
    the loss is the authors' code's (``nn.L1Loss`` between the L2-normalized
    factors: a mean over factor elements), so their β ports as is.
    RepDistiller's ``FactorTransfer`` differs in formula (it normalizes
    mean_c F², an attention map of the factor, not the factor), so its weight
    200 does not port (docs/conventions.md). The reconstruction loss
    is logged as ``<name>.reconstruction``. Under DDP each process trains its
    own paraphraser on its own batches (their Adam steps are not synchronized).
    """

    student: str
    teacher: str
    rate: kdhooks.Positive = 0.5
    beta: kdhooks.NonNegative = 500.0
    p: kdhooks.PositiveInt = 1
    paraphraser_steps: kdhooks.NonNegativeInt = 500
    paraphraser_lr: kdhooks.Positive = 1e-3
    joint: bool = False

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_feature": kdhooks.Tap("student", self.student),
                "teacher_feature": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        pairs = [(self.student, self.teacher)]
        check_pairs(self, pairs, {"student_0": shapes["student_feature"], "teacher_0": shapes["teacher_feature"]},
                    (4, 3), "factors are conv maps or token features")

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        student, teacher = shape(shapes["student_feature"]), shape(shapes["teacher_feature"])
        self.paraphraser = distiller.add_part(self.name, Paraphraser(teacher, self.rate))
        # trained here, by its own optimizer: invisible to the user's (no grad) and to DDP (no requires_grad)
        self.paraphraser.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.paraphraser.parameters(), lr=self.paraphraser_lr)
        self.translator = distiller.add_part(self.name, Translator(student, teacher, self.paraphraser.factor_channels))

    def train_paraphraser(self, teacher_feature: torch.Tensor) -> torch.Tensor:
        """One reconstruction step of the paraphraser on this batch's teacher feature."""
        self.paraphraser.train().requires_grad_(True)
        try:
            with torch.enable_grad():
                loss = reconstruction_loss(teacher_feature, self.paraphraser(teacher_feature.detach()))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        finally:
            self.paraphraser.requires_grad_(False)
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def loss(self, ctx: kdhooks.LossContext, student_feature: Any, teacher_feature: Any) -> torch.Tensor:
        student_feature, teacher_feature = tensor_of(student_feature), tensor_of(teacher_feature)
        paraphrasing = ctx.step < self.paraphraser_steps
        if paraphrasing or self.joint:
            ctx.log(f"{self.name}.reconstruction", self.train_paraphraser(teacher_feature))
        if paraphrasing:
            # no factor to learn yet; the translator stays in the graph (DDP needs its gradients)
            return ctx.distiller.zero_touching(self.name)
        with torch.no_grad():
            teacher_factor = self.paraphraser.eval().encoder(teacher_feature)
        return self.beta * factor_transfer_loss(self.translator(student_feature), teacher_factor, self.p)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("fitnets", FitNets)
    registry.add_term("mmd", MMD)
    registry.add_term("ft", FT)
