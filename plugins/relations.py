"""Matching relations: between two layers of one network (FSP) and between the samples of a batch (RKD, SP, PKT).

Relations between samples compare N×N (or N×N×N) structures, so student and
teacher features may have any sizes; each sample's feature is flattened.
Where the reference code differs from the paper, ``form: reference`` gives the
reference code's formula; the constants between them, and how to port a
published weight: docs/conventions.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

import kdhooks

from ._layers import (LayerWeights, WeightedLayers, check_kind, check_same_batch, check_same_positions, known,
                      resolve_layer_weights, shape, smaller_grid, tensor_of)

Form = Literal["paper", "reference"]

# --- relations between layers ------------------------------------------------------------


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """G_ij = Σ_{s,t} F1_{s,t,i} · F2_{s,t,j} / (h·w): (N, C1, C2), maps pooled to the smaller grid; tokens over L."""
    first, second = smaller_grid(first.float(), second.float())
    if first.dim() == 4:
        return torch.einsum("nahw,nbhw->nab", first, second) / (first.shape[-2] * first.shape[-1])
    return torch.einsum("nla,nlb->nab", first, second) / first.shape[1]


def fsp_loss(student_matrices: Sequence[torch.Tensor], teacher_matrices: Sequence[torch.Tensor],
             form: Form = "paper", layer_weights: Sequence[float] | None = None) -> torch.Tensor:
    """1/N Σ_x Σ_i λ_i ‖G_i^T(x) − G_i^S(x)‖²₂: squared entries summed, averaged over samples (``paper``).

    ``reference`` averages over the matrix entries too, as RepDistiller's
    ``FSP.compute_loss``: the paper's pair i divided by its C1·C2 entries.
    ``layer_weights`` λ_i default to 1.
    """
    weights = [1.0] * len(student_matrices) if layer_weights is None else list(layer_weights)
    per_pair = [(t.float() - s.float()).pow(2).flatten(1) for s, t in zip(student_matrices, teacher_matrices)]
    if form == "reference":
        return sum(w * squared.mean() for w, squared in zip(weights, per_pair))
    return sum(w * squared.sum(1).mean() for w, squared in zip(weights, per_pair))


class FSP(kdhooks.Term):
    """A gift from knowledge distillation (Yim et al. 2017): Σ_i ‖G_i^T − G_i^S‖², G the FSP matrix of a layer pair.

    ``student`` and ``teacher`` list (first, second) layer pairs, e.g.
    ``[[stage1, stage2], [stage2, stage3]]``; a pair's maps are pooled to the
    smaller grid. Where the student's channels differ from the teacher's a
    connector maps them (the paper's student and teacher have equal widths).
    ``form: paper`` (default) sums a matrix's squared entries; ``form:
    reference`` averages them, as RepDistiller's ``FSP`` (pair i is the
    paper's ÷ C1·C2, so no single weight ports between them when the pairs'
    sizes differ; docs/conventions.md). ``layer_weights`` (default ``equal``;
    ``halving`` or a list) are the paper's λ_i. The paper trains with FSP
    alone first, then with the task loss: a step schedule on ``weight`` and
    ``task_weight`` (see docs/methods.md); RepDistiller's initialization uses
    weight 1 on its form.
    """

    student: list[tuple[str, str]]
    teacher: list[tuple[str, str]]
    connector: str = "auto"
    form: Form = "paper"
    layer_weights: LayerWeights = "equal"

    def configure(self, distiller: kdhooks.Distiller) -> None:
        self.pair_weights = resolve_layer_weights(self, self.layer_weights, len(self.student))

    def taps(self) -> dict[str, kdhooks.Tap]:
        if len(self.student) != len(self.teacher) or not self.student:
            raise kdhooks.ConfigError(self.location, f"fsp compares the student's and the teacher's layer pairs one "
                                      f"to one, got {len(self.student)} and {len(self.teacher)}",
                                      value={"student": self.student, "teacher": self.teacher},
                                      fix="list as many teacher pairs as student pairs")
        self.layers = sorted({path for pair in self.student for path in pair}), \
            sorted({path for pair in self.teacher for path in pair})
        return {**{f"student:{path}": kdhooks.Tap("student", path, option="student") for path in self.layers[0]},
                **{f"teacher:{path}": kdhooks.Tap("teacher", path, option="teacher") for path in self.layers[1]}}

    def check(self, shapes: dict[str, Any]) -> None:
        if not known(shapes, *shapes):
            return
        feature = {name: kdhooks.feature_shape(value) for name, value in shapes.items()}
        for student_pair, teacher_pair in zip(self.student, self.teacher):
            for role, pair in (("student", student_pair), ("teacher", teacher_pair)):
                first, second = feature[f"{role}:{pair[0]}"], feature[f"{role}:{pair[1]}"]
                if len(first) not in (3, 4) or len(first) != len(second):
                    raise kdhooks.ConfigError(f"{self.location}.{role}", f"an FSP matrix needs two conv maps or two "
                                              f"token features; the {role}'s {pair[0]!r} gives {first} and "
                                              f"{pair[1]!r} {second}", value=list(pair),
                                              fix="pair layers whose outputs are both (N, C, H, W) or both (N, L, D)")
                check_same_positions(self, pair, first, second)
            for student_path, teacher_path in zip(student_pair, teacher_pair):
                student, teacher = feature[f"student:{student_path}"], feature[f"teacher:{teacher_path}"]
                check_kind(self, (student_path, teacher_path), student, teacher, (4, 3), "FSP relates feature maps")
                check_same_batch(self, (student_path, teacher_path), student, teacher)

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        self.connectors = {}
        for student_pair, teacher_pair in zip(self.student, self.teacher):
            for student_path, teacher_path in zip(student_pair, teacher_pair):
                student, teacher = shape(shapes[f"student:{student_path}"]), shape(shapes[f"teacher:{teacher_path}"])
                if (student_path, teacher_path) not in self.connectors:
                    self.connectors[(student_path, teacher_path)] = distiller.add_connector(
                        self.name, student, teacher, self.connector, location=f"{self.location}.connector")

    def loss(self, ctx: kdhooks.LossContext, **features: Any) -> torch.Tensor:
        student_matrices, teacher_matrices = [], []
        for student_pair, teacher_pair in zip(self.student, self.teacher):
            mapped = [self.connectors[(s, t)](tensor_of(features[f"student:{s}"]))
                      for s, t in zip(student_pair, teacher_pair)]
            student_matrices.append(fsp_matrix(*mapped))
            teacher_matrices.append(fsp_matrix(*(tensor_of(features[f"teacher:{t}"]) for t in teacher_pair)))
        return fsp_loss(student_matrices, teacher_matrices, self.form, self.pair_weights)


# --- relations between samples -----------------------------------------------------------


def check_samples(term: kdhooks.Term, shapes: dict[str, Any], pairs: list[tuple[str, str]]) -> None:
    """Relations between samples: each (student, teacher) capture has a batch dim, and both the same samples."""
    for student_name, teacher_name in pairs:
        if not known(shapes, student_name, teacher_name):
            continue
        student, teacher = kdhooks.feature_shape(shapes[student_name]), kdhooks.feature_shape(shapes[teacher_name])
        for name, feature in ((student_name, student), (teacher_name, teacher)):
            if len(feature) < 2:
                path = term._taps[name].path
                raise kdhooks.ConfigError(term.location_of(name), f"{term.kind} relates the samples of a batch, one "
                                          f"feature row each; {path!r} gives shape {feature}, with no feature "
                                          f"dimension after the batch", value=path,
                                          fix="tap a layer whose output is (N, D) or (N, C, H, W)")
        check_same_batch(term, (term._taps[student_name].path, term._taps[teacher_name].path), student, teacher)


def _per_sample(feature: torch.Tensor) -> torch.Tensor:
    if feature.shape[0] < 2:
        raise ValueError("relations between samples need a batch of at least 2 samples")
    return feature.float().flatten(1)


def pairwise_distances(embeddings: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """‖e_i − e_j‖₂ for every pair, (N, N), with a gradient that stays finite at zero distance."""
    squared = embeddings.pow(2).sum(1)
    distances = (squared[:, None] + squared[None, :] - 2 * embeddings @ embeddings.T).clamp_min(eps).sqrt()
    return distances * (1 - torch.eye(len(embeddings), device=embeddings.device, dtype=embeddings.dtype))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, form: Form = "paper") -> torch.Tensor:
    """Mean over pairs i ≠ j of smooth-L1(ψ_D(s_i, s_j), ψ_D(t_i, t_j)), ψ_D = ‖x_i − x_j‖ / μ, μ the mean distance.

    ``reference`` averages over all N² entries, the zero diagonal included, as
    the authors' ``RkdDistance`` and RepDistiller's ``RKDLoss``: (N−1)/N × ``paper``.
    """
    student, teacher = _per_sample(student), _per_sample(teacher)
    off_diagonal = ~torch.eye(len(student), dtype=torch.bool, device=student.device)
    potentials = []
    for embeddings in (student, teacher):
        distances = pairwise_distances(embeddings)
        mean = distances[off_diagonal].mean().clamp_min(1e-12)
        potentials.append((distances if form == "reference" else distances[off_diagonal]) / mean)
    return F.smooth_l1_loss(potentials[0], potentials[1])


def _angles(embeddings: torch.Tensor) -> torch.Tensor:
    # cos ∠(e_i, e_j, e_k) = <(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖>, indexed [j, i, k]
    directions = F.normalize(embeddings[None, :, :] - embeddings[:, None, :], dim=2)
    return directions @ directions.transpose(1, 2)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, form: Form = "paper") -> torch.Tensor:
    """Mean over triplets of distinct samples of smooth-L1(ψ_A(s_i, s_j, s_k), ψ_A(t_i, t_j, t_k)), ψ_A = cos ∠ at j.

    ``reference`` averages over all N³ index triplets, as the authors'
    ``RKdAngle`` and RepDistiller's ``RKDLoss``; a triplet with a repeated
    index gives equal potentials (0, or 1 for i = k), so this is
    (N−1)(N−2)/N² × ``paper``.
    """
    student, teacher = _per_sample(student), _per_sample(teacher)
    if form == "reference":
        return F.smooth_l1_loss(_angles(student).flatten(), _angles(teacher).flatten())
    n = len(student)
    index = torch.arange(n, device=student.device)
    distinct = ((index[:, None, None] != index[None, :, None]) & (index[None, :, None] != index[None, None, :])
                & (index[:, None, None] != index[None, None, :]))
    if not distinct.any():
        return student.sum() * 0  # fewer than 3 samples: no angle to compare
    return F.smooth_l1_loss(_angles(student)[distinct], _angles(teacher)[distinct])


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0, form: Form = "paper") -> torch.Tensor:
    """w_d · L_RKD-D + w_a · L_RKD-A."""
    return (distance_weight * rkd_distance_loss(student, teacher, form)
            + angle_weight * rkd_angle_loss(student, teacher, form))


class RKD(kdhooks.Term):
    """Relational knowledge distillation (Park et al. 2019): w_d · Σ l_δ(ψ_D^t, ψ_D^s) + w_a · Σ l_δ(ψ_A^t, ψ_A^s).

    Distance (w_d = 25) and angle (w_a = 50) potentials of the batch's
    embeddings, Huber (smooth-L1) loss; reported as parts ``<name>.distance``
    and ``<name>.angle``. The paper taps the final embedding (before the
    classifier). ``form: paper`` (default) averages over distinct pairs and
    triplets; ``form: reference`` over all N² pairs and N³ triplets, as the
    authors' code and RepDistiller (their weights ported to ``paper``: × (N−1)/N
    for w_d, × (N−1)(N−2)/N² for w_a; docs/conventions.md).
    """

    student: str
    teacher: str
    distance_weight: kdhooks.NonNegative = 25.0
    angle_weight: kdhooks.NonNegative = 50.0
    form: Form = "paper"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_embedding": kdhooks.Tap("student", self.student),
                "teacher_embedding": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        check_samples(self, shapes, [("student_embedding", "teacher_embedding")])

    def loss(self, ctx: kdhooks.LossContext, student_embedding: Any,
             teacher_embedding: Any) -> dict[str, torch.Tensor]:
        student, teacher = tensor_of(student_embedding), tensor_of(teacher_embedding)
        return {"distance": self.distance_weight * rkd_distance_loss(student, teacher, self.form),
                "angle": self.angle_weight * rkd_angle_loss(student, teacher, self.form)}


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    """G̃ = row-wise L2-normalized A·Aᵀ, A the (N, C·H·W) activations: (N, N)."""
    activations = _per_sample(feature)
    return F.normalize(activations @ activations.T, dim=1)


def sp_loss(student_features: torch.Tensor | Sequence[torch.Tensor],
            teacher_features: torch.Tensor | Sequence[torch.Tensor], gamma: float = 3000.0,
            layer_weights: Sequence[float] | None = None) -> torch.Tensor:
    """γ/b² · Σ_layers w_l ‖G̃_T − G̃_S‖²_F, w_l = 1 unless given."""
    if isinstance(student_features, torch.Tensor):
        student_features, teacher_features = [student_features], [teacher_features]
    weights = [1.0] * len(student_features) if layer_weights is None else list(layer_weights)
    batch = student_features[0].shape[0]
    return gamma / batch**2 * sum(w * (similarity_matrix(t) - similarity_matrix(s)).pow(2).sum()
                                  for w, s, t in zip(weights, student_features, teacher_features))


class SP(WeightedLayers):
    """Similarity-preserving KD (Tung & Mori 2019): γ/b² Σ_layers ‖G̃_T − G̃_S‖²_F, γ = 3000.

    G̃ is the batch's row-normalized similarity matrix of a layer's activations;
    ``student`` and ``teacher`` are one path or equal-length lists, weighted by
    ``layer_weights`` (default ``equal``). The same as RepDistiller's
    ``Similarity``: its weight 3000 is γ here (docs/conventions.md).
    """

    gamma: kdhooks.NonNegative = 3000.0

    def check(self, shapes: dict[str, Any]) -> None:
        check_samples(self, shapes, [(f"student_{i}", f"teacher_{i}") for i in range(len(self.pairs))])

    def loss(self, ctx: kdhooks.LossContext, **features: Any) -> torch.Tensor:
        count = len(self.pairs)
        return sp_loss([tensor_of(features[f"student_{i}"]) for i in range(count)],
                       [tensor_of(features[f"teacher_{i}"]) for i in range(count)], self.gamma, self.pair_weights)


def conditional_probabilities(feature: torch.Tensor, eps: float = 1e-7, keep_self: bool = False) -> torch.Tensor:
    """p_{j|i} = K(x_i, x_j) / Σ_{k≠i} K(x_i, x_k), K = (cosine + 1)/2; the diagonal is 0 unless ``keep_self``.

    ``keep_self`` keeps j = i in the distribution (K(x_i, x_i) = 1), as the
    authors' code does.
    """
    unit = F.normalize(_per_sample(feature), dim=1, eps=eps)
    kernel = (unit @ unit.T + 1) / 2
    if not keep_self:
        kernel = kernel * (1 - torch.eye(len(kernel), device=kernel.device, dtype=kernel.dtype))
    return kernel / kernel.sum(1, keepdim=True).clamp_min(eps)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7, form: Form = "paper") -> torch.Tensor:
    """Mean over samples i of Σ_{j≠i} p^t_{j|i} log(p^t_{j|i} / p^s_{j|i}): KL between the conditional distributions.

    ``reference`` is the authors' ``cosine_similarity_loss`` (RepDistiller's
    ``PKT``): j = i kept in both distributions, and the mean over all N²
    entries instead of the sum over j: not a constant multiple of ``paper``.
    """
    keep_self = form == "reference"
    student_probs = conditional_probabilities(student, eps, keep_self)
    teacher_probs = conditional_probabilities(teacher, eps, keep_self)
    kl = teacher_probs * (torch.log(teacher_probs + eps) - torch.log(student_probs + eps))
    return kl.mean() if keep_self else kl.sum(1).mean()


class PKT(kdhooks.Term):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): Σ_i Σ_{j≠i} p^t_{j|i} log(p^t_{j|i} / p^s_{j|i}).

    The conditional probabilities come from the cosine-similarity kernel over
    the batch, so student and teacher embeddings may differ in size. ``form:
    paper`` (default) leaves out j = i, sums over j and averages over i;
    ``form: reference`` is the authors' code and RepDistiller's ``PKT``: j = i
    kept and the mean over all N² entries; ``paper`` is roughly N times it
    (10× at N = 8, 66× at N = 64 on random embeddings) and the ratio depends on
    the data, so RepDistiller's weight 30000 ports only with ``form:
    reference`` (docs/conventions.md).
    """

    student: str
    teacher: str
    form: Form = "paper"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student_embedding": kdhooks.Tap("student", self.student),
                "teacher_embedding": kdhooks.Tap("teacher", self.teacher)}

    def check(self, shapes: dict[str, Any]) -> None:
        check_samples(self, shapes, [("student_embedding", "teacher_embedding")])

    def loss(self, ctx: kdhooks.LossContext, student_embedding: Any, teacher_embedding: Any) -> torch.Tensor:
        return pkt_loss(tensor_of(student_embedding), tensor_of(teacher_embedding), form=self.form)


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("fsp", FSP)
    registry.add_term("rkd", RKD)
    registry.add_term("sp", SP)
    registry.add_term("pkt", PKT)
