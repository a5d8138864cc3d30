"""Distilling semantic segmentation: pixel-wise, pair-wise, holistic (adversarial) and channel-wise terms.

Liu et al. 2019/2020 (Structured Knowledge Distillation for Dense Prediction, SKD: ``seg_pixel_kd``,
``seg_pairwise``, ``seg_adversarial``) and Shu et al. 2021 (Channel-wise Knowledge Distillation for
Dense Prediction: ``cwd``). Their taps default to the models' score maps ``(N, C, H, W)``; a
torchvision segmentation model returns a dict, so ``:out`` (and ``:aux`` for its auxiliary head)
select them. Pair-wise and channel-wise terms also take intermediate features (``backbone:out``,
``backbone:high``). A student map of another size than the teacher's is resized to the teacher's
(average pooling down, bilinear up: the one resize of the other feature terms).

``seg_adversarial`` owns a discriminator that the plugin trains itself, with its own Adam, from
the step's own forward; the discriminator is not in ``kd.parameters()``, so the user's optimizer
never sees it, and it is in ``kd.state_dict()`` (see ``SegAdversarial``).

Constants against the reference code (SKD's and CIRKD's criterions, mmrazor's
``ChannelWiseDivergence``) are given in each term's docstring; docs/conventions.md has the others.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import kdhooks

from ._layers import check_same_batch, known, resized, shape, tensor_of
from .logits import kd_loss


def _float(value: Any) -> torch.Tensor:
    return tensor_of(value).float()


def _check_maps(term: kdhooks.Term, shapes: dict[str, Any], student: str, teacher: str,
                same_channels: bool, why: str) -> None:
    """Both taps are conv maps of the same batch, and (``same_channels``) of the same classes."""
    if not known(shapes, student, teacher):
        return
    student_shape = kdhooks.expect_rank(term, student, shapes, (4,), why)
    teacher_shape = kdhooks.expect_rank(term, teacher, shapes, (4,), why)
    check_same_batch(term, (term.student, term.teacher), student_shape, teacher_shape)
    if same_channels and student_shape[1] != teacher_shape[1]:
        raise kdhooks.ConfigError(term.location, f"{term.kind} compares class maps channel by channel, but the "
                                  f"student's {term.student!r} has {student_shape[1]} channels and the teacher's "
                                  f"{term.teacher!r} {teacher_shape[1]}", value=[student_shape, teacher_shape],
                                  fix="tap the score maps of both models (`:out`), over the same classes")


# --- pixel-wise distillation ---------------------------------------------------------------


def pixel_kd_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, temperature: float = 1.0,
                  labels: torch.Tensor | None = None, ignore_index: int = 255) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) per pixel, averaged over the pixels (those not ``ignore_index``).

    ``student_map`` and ``teacher_map`` are ``(N, C, H, W)``; the student's is resized to the
    teacher's size. ``labels`` ``(N, H', W')`` are resized to the maps' size (nearest).
    """
    student_map, teacher_map = student_map.float(), teacher_map.float()
    student_map = resized(student_map, tuple(teacher_map.shape[-2:]))
    classes = teacher_map.shape[1]
    student_rows = student_map.permute(0, 2, 3, 1).reshape(-1, classes)
    teacher_rows = teacher_map.permute(0, 2, 3, 1).reshape(-1, classes)
    if labels is not None:
        keep = _label_map(labels, tuple(teacher_map.shape[-2:])).reshape(-1) != ignore_index
        if not bool(keep.any()):
            return student_rows.sum() * 0  # every pixel ignored: nothing to match, still in the graph
        student_rows, teacher_rows = student_rows[keep], teacher_rows[keep]
    return kd_loss(student_rows, teacher_rows, temperature)


def _label_map(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"segmentation labels are a (N, H, W) map of class indices; got {got}")
    if tuple(labels.shape[-2:]) != size:
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return labels


class SegPixelKD(kdhooks.Term):
    """Pixel-wise distillation (Liu et al. 2019, SKD): T² · KL(p_T ‖ p_S) per pixel, averaged over pixels.

    ``labels`` passed to the step (``kd(loss, labels=masks)``, ``(N, H, W)``) skip
    the ``ignore_index`` pixels; without labels every pixel counts. SKD's
    ``CriterionPixelWise`` is the cross-entropy Σ_c −p_T log p_S summed over a
    map's classes and averaged over pixels, at T = 1: the same gradient (it adds
    the teacher's entropy, a constant), so its λ_pi = 10 ports as is; CIRKD's
    ``CriterionKD`` is this term (T² · batchmean KL over pixels) exactly.
    """

    student: str = ":out"
    teacher: str = ":out"
    temperature: kdhooks.Positive = 1.0
    ignore_index: int = 255

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_map": kdhooks.Tap("student", self.student),
                "teacher_map": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        _check_maps(self, shapes, "student_map", "teacher_map", True, "a class distribution at every pixel")

    def loss(self, ctx: kdhooks.LossContext, student_map: Any, teacher_map: Any) -> torch.Tensor:
        return pixel_kd_loss(tensor_of(student_map), tensor_of(teacher_map), self.temperature, ctx.labels,
                             self.ignore_index)


# --- pair-wise distillation ----------------------------------------------------------------


def pooled_nodes(feature: torch.Tensor, nodes: int, pool: str = "max") -> torch.Tensor:
    """A conv map pooled to a ``nodes`` × ``nodes`` grid (at most its own size): the graph's nodes."""
    size = (min(nodes, feature.shape[-2]), min(nodes, feature.shape[-1]))
    return F.adaptive_max_pool2d(feature, size) if pool == "max" else F.adaptive_avg_pool2d(feature, size)


def affinity(feature: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every two spatial positions of a conv map: ``(N, HW, HW)``."""
    nodes = F.normalize(feature.float().flatten(2), dim=1, eps=1e-8)
    return nodes.transpose(1, 2) @ nodes


def pairwise_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, nodes: int = 2,
                  pool: str = "max") -> torch.Tensor:
    """(a_ij^S − a_ij^T)², averaged over the node pairs and the samples, after pooling both maps to the grid."""
    student = pooled_nodes(student_feature, nodes, pool)
    teacher = pooled_nodes(teacher_feature, nodes, pool)
    if student.shape[-2:] != teacher.shape[-2:]:
        student = resized(student, tuple(teacher.shape[-2:]))
    return (affinity(student) - affinity(teacher)).pow(2).mean()


class SegPairwise(kdhooks.Term):
    """Pair-wise distillation (Liu et al. 2019, SKD): (a_ij^S − a_ij^T)² over node pairs, a = cosine similarity.

    Both feature maps are pooled (``pool``: max, as SKD) to a ``nodes`` × ``nodes``
    grid; a node's feature is its channel vector, so the widths may differ (no
    connector). SKD's and CIRKD's ``CriterionPairWiseforWholeFeatAfterPool``
    pool with patches of ``pool_scale`` × the map (0.5: a 2 × 2 grid, the
    default here) and compute this mean (their sum / (HW)² / N) with the norm
    in the cosine detached; kdhooks keeps its gradient. Their λ_pa ports as is.
    """

    student: str
    teacher: str
    nodes: kdhooks.PositiveInt = 2
    pool: Literal["max", "avg"] = "max"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_feature": kdhooks.Tap("student", self.student),
                "teacher_feature": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        _check_maps(self, shapes, "student_feature", "teacher_feature", False,
                    "the graph's nodes are the map's positions")

    def loss(self, ctx: kdhooks.LossContext, student_feature: Any, teacher_feature: Any) -> torch.Tensor:
        return pairwise_loss(tensor_of(student_feature), tensor_of(teacher_feature), self.nodes, self.pool)


# --- channel-wise distillation -------------------------------------------------------------


def cwd_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T² · KL(softmax(t_c/T) ‖ softmax(s_c/T)) over each channel's positions, averaged over channels and samples."""
    student_map, teacher_map = student_map.float(), teacher_map.float()
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"cwd compares the maps channel by channel: the student's {tuple(student_map.shape)} "
                         f"and the teacher's {tuple(teacher_map.shape)} differ")
    student_rows = F.log_softmax(student_map.flatten(2) / temperature, dim=2)
    teacher_rows = F.log_softmax(teacher_map.flatten(2) / temperature, dim=2)
    kl = (teacher_rows.exp() * (teacher_rows - student_rows)).sum(2)  # (N, C)
    return kl.mean() * temperature**2


class CWD(kdhooks.Term):
    """Channel-wise distillation (Shu et al. 2021): T² · KL over each channel's spatial softmax, mean over N·C.

    On score maps (default ``:out``) or features; a student map of another size
    is resized to the teacher's, and of another width joined by ``connector``
    (``auto``: identity for equal widths, else a 1x1 conv, as the paper's
    feature variant). Like every term with a connector it needs
    ``example_inputs``. mmrazor's ``ChannelWiseDivergence`` and the authors'
    ``CriterionCWD`` (``norm_type: channel``) divide the sum by N·C and scale by
    T², as here: their ``loss_weight`` (3 on logits) and τ (their configs: 1 on
    Cityscapes logits; the paper: 4) port as they are.
    """

    student: str = ":out"
    teacher: str = ":out"
    temperature: kdhooks.Positive = 4.0
    connector: str = "auto"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_map": kdhooks.Tap("student", self.student),
                "teacher_map": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        _check_maps(self, shapes, "student_map", "teacher_map", False, "a distribution over each channel's positions")

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        student, teacher = shape(shapes["student_map"]), shape(shapes["teacher_map"])
        # resized first (in loss()), so the connector only joins widths
        self.connector_module = distiller.add_connector(self.name, (*student[:2], *teacher[2:]), teacher,
                                                        self.connector, location=f"{self.location}.connector")

    def loss(self, ctx: kdhooks.LossContext, student_map: Any, teacher_map: Any) -> torch.Tensor:
        student_map, teacher_map = tensor_of(student_map), tensor_of(teacher_map)
        student_map = self.connector_module(resized(student_map, tuple(teacher_map.shape[-2:])))
        return cwd_loss(student_map, teacher_map, self.temperature)


# --- holistic (adversarial) distillation -----------------------------------------------------


class MapDiscriminator(nn.Module):
    """A Wasserstein critic on (a score map ⊕ the image): spectral-normalized 4x4 stride-2 convs, one score per image.

    SKD's discriminator without its self-attention blocks: ``depth`` convs of
    ``width``·2^i channels with LeakyReLU(0.1), a 1x1 conv to one channel, the
    mean over positions. The score map goes through tanh first (SKD's
    ``preprocess_GAN_mode`` 2), the image as it is.
    """

    def __init__(self, in_channels: int, width: int = 64, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            layers += [spectral_norm(nn.Conv2d(channels, width * 2**i, 4, 2, 1)), nn.LeakyReLU(0.1)]
            channels = width * 2**i
        layers.append(spectral_norm(nn.Conv2d(channels, 1, 1)))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean((1, 2, 3))


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[(‖∇D(x̂)‖₂ − 1)²] at random interpolates x̂ of real and fake inputs (Gulrajani et al. 2017)."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


class TrainedApart(nn.Module):
    """A module that its term trains with its own optimizer: in ``state_dict()``, not in ``parameters()``.

    Registered with ``distiller.add_part`` so it moves with the Distiller
    (``kd.to(device)``) and is saved with it, but its module is held outside
    ``_modules``: ``kd.parameters()`` (what the user's optimizer, DDP and
    gradient clipping see) never contains its parameters. Its state is saved as
    ``<part>.module.<key>`` and the optimizer's Adam moments and step as
    ``<part>.optimizer.<parameter>.<exp_avg|exp_avg_sq|step>``, so a resumed run
    continues the same adversarial game.
    """

    def __init__(self, module: nn.Module, lr: float, betas: tuple[float, float]):
        super().__init__()
        object.__setattr__(self, "module", module)  # not a submodule: out of parameters()
        module.requires_grad_(False)
        self.optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=betas)
        for p in module.parameters():
            # Adam's own first-step state, made now: a fresh Distiller has the same state_dict keys
            self.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                       "exp_avg_sq": torch.zeros_like(p)}

    def _entries(self) -> dict[str, torch.Tensor]:
        entries = {f"module.{k}": v for k, v in self.module.state_dict(keep_vars=True).items()}
        for name, p in self.module.named_parameters():
            for key, value in self.optimizer.state[p].items():
                entries[f"optimizer.{name}.{key}"] = value
        return entries

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self._entries().items():
            destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        entries = self._entries()
        for key, target in entries.items():
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
                continue
            value = state_dict[prefix + key]
            if tuple(value.shape) != tuple(target.shape):
                error_msgs.append(f"size mismatch for {prefix + key}: copying a param with shape "
                                  f"{tuple(value.shape)}, the current one is {tuple(target.shape)}")
                continue
            with torch.no_grad():
                target.copy_(value)
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in entries)

    def _apply(self, fn: Any, recurse: bool = True) -> TrainedApart:
        self.module._apply(fn, recurse)
        for p in self.module.parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                state = self.optimizer.state[p]
                state[key] = state[key].to(device=p.device, dtype=p.dtype)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"(trained by its own Adam, not in parameters()): {self.module!r}"


class SegAdversarial(kdhooks.Term):
    """Holistic distillation (Liu et al. 2019, SKD): a Wasserstein critic tells the teacher's maps from the student's.

    A spectral-normalized critic D (``MapDiscriminator``) sees a score map
    (through tanh) concatenated with the image (resized to the map), as the
    paper's conditional D(Q|I). At each ``kd(...)``, before the student's loss
    is formed, the plugin updates D from the same forward, ``discriminator_steps``
    times, with its own Adam (``discriminator_lr``, β = (0.5, 0.9)): WGAN-GP,
    D minimises E[D(Q_S|I)] − E[D(Q_T|I)] + λ_gp E[(‖∇D(x̂)‖ − 1)²] on the
    detached maps (λ_gp = ``gradient_penalty``, 10 as SKD and Gulrajani et al.).
    The student's term is then the critic's Wasserstein estimate
    E[D(Q_T|I)] − E[D(Q_S|I)] with the updated D in eval mode: its gradient is
    SKD's −E[D(Q_S|I)] (the teacher's part is a constant), its value the
    distance the critic still sees (logged with the critic's loss as
    ``<name>.discriminator``). SKD's λ_d = 0.1 ports as ``weight``.

    The discriminator and the user's optimizer: D is held by a part that is in
    ``kd.state_dict()`` (its weights, spectral-norm vectors and Adam state) but
    not in ``kd.parameters()``, and its parameters have ``requires_grad`` False
    except inside the plugin's own update, so the student's backward leaves no
    gradient on them: the user's optimizer never holds or steps D, and D is
    stepped once per ``kd(...)`` (per ``discriminator_steps``), by its own
    optimizer, with the critic's sign. With ``weight`` scheduled to 0 D is not
    trained either. Under DDP each process trains its own D on its own batches.
    """

    student: str = ":out"
    teacher: str = ":out"
    image: bool = True
    width: kdhooks.PositiveInt = 64
    depth: kdhooks.PositiveInt = 3
    discriminator_lr: kdhooks.Positive = 1e-4
    discriminator_steps: kdhooks.PositiveInt = 1
    gradient_penalty: kdhooks.NonNegative = 10.0

    def taps(self) -> dict[str, kdhooks.Tap]:
        taps = {"student_map": kdhooks.Tap("student", self.student),
                "teacher_map": kdhooks.Tap("teacher", self.teacher)}
        if self.image:
            taps["image"] = kdhooks.Tap("student", "", "input", option="image")
        return taps

    def check(self, shapes: dict[str, Any]) -> None:
        _check_maps(self, shapes, "student_map", "teacher_map", True, "the critic compares class maps")
        if known(shapes, "teacher_map"):
            size = min(kdhooks.feature_shape(shapes["teacher_map"])[-2:])
            if size < 2**self.depth:
                raise kdhooks.ConfigError(f"{self.location}.depth", f"the critic halves the map {self.depth} "
                                          f"times, and the teacher's map is {size} pixels across", value=self.depth,
                                          fix=f"set depth to at most {max(1, size.bit_length() - 1)}")
        if self.image and known(shapes, "image"):
            kdhooks.expect_rank(self, "image", shapes, (4,), "the critic is conditioned on the image")

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        channels = shape(shapes["teacher_map"])[1] + (shape(shapes["image"])[1] if self.image else 0)
        critic = MapDiscriminator(channels, self.width, self.depth)
        self.critic = distiller.add_part(self.name, TrainedApart(critic, self.discriminator_lr, (0.5, 0.9)))

    def critic_inputs(self, score_map: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        dtype = next(self.critic.module.parameters()).dtype
        x = torch.tanh(score_map.to(dtype))
        if image is not None:
            x = torch.cat([x, resized(image.to(dtype), tuple(x.shape[-2:]))], dim=1)
        return x

    def train_critic(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One WGAN-GP step of the critic on detached inputs; its loss and its Wasserstein estimate."""
        critic, optimizer = self.critic.module, self.critic.optimizer
        critic.train().requires_grad_(True)
        try:
            with torch.enable_grad():
                distance = critic(real).mean() - critic(fake).mean()
                loss = -distance
                if self.gradient_penalty:
                    loss = loss + self.gradient_penalty * gradient_penalty(critic, real, fake)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            critic.requires_grad_(False)
            optimizer.zero_grad(set_to_none=True)
        return loss.detach(), distance.detach()

    def loss(self, ctx: kdhooks.LossContext, student_map: Any, teacher_map: Any, image: Any = None) -> torch.Tensor:
        teacher_map = tensor_of(teacher_map).detach()
        student_map = resized(tensor_of(student_map), tuple(teacher_map.shape[-2:]))
        image = tensor_of(image).detach() if image is not None else None
        real = self.critic_inputs(teacher_map, image)
        fake_detached = self.critic_inputs(student_map.detach(), image)
        for _ in range(self.discriminator_steps):
            critic_loss, _ = self.train_critic(real, fake_detached)
        ctx.log(f"{self.name}.discriminator", critic_loss)
        critic = self.critic.module.eval()
        with torch.no_grad():
            teacher_score = critic(real).mean()
        return teacher_score - critic(self.critic_inputs(student_map, image)).mean()


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("seg_pixel_kd", SegPixelKD)
    registry.add_term("seg_pairwise", SegPairwise)
    registry.add_term("cwd", CWD)
    registry.add_term("seg_adversarial", SegAdversarial)
