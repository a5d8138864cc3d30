"""Shared by the feature-level terms: layer lists, the kind of a feature, resizing maps.

A feature is a conv map (N, C, H, W), tokens (N, L, D) or vectors (N, D).
Terms say which kinds their method has a meaning for; a pair of layers whose
features cannot be compared is a ConfigError at attach time.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

import kdhooks

KINDS = {4: "conv map (N, C, H, W)", 3: "tokens (N, L, D)", 2: "vectors (N, D)"}


def as_list(paths: str | list[str]) -> list[str]:
    return [paths] if isinstance(paths, str) else list(paths)


def layer_pairs(term: kdhooks.Term, student: str | list[str], teacher: str | list[str]) -> list[tuple[str, str]]:
    """(student path, teacher path) pairs from the ``student``/``teacher`` options, one path or equal lists."""
    students, teachers = as_list(student), as_list(teacher)
    if not students or len(students) != len(teachers):
        raise kdhooks.ConfigError(term.location, f"term {term.name!r} pairs student and teacher layers one to one, "
                                  f"got {len(students)} student and {len(teachers)} teacher layers",
                                  value={"student": students, "teacher": teachers},
                                  fix="list as many teacher layers as student layers")
    return list(zip(students, teachers))


def pair_taps(pairs: list[tuple[str, str]], kind: str = "output") -> dict[str, kdhooks.Tap]:
    """``student_i`` / ``teacher_i`` taps of kind ``kind`` for each layer pair, errors pointing at the options."""
    taps = {}
    for i, (student, teacher) in enumerate(pairs):
        taps[f"student_{i}"] = kdhooks.Tap("student", student, kind, option="student")
        taps[f"teacher_{i}"] = kdhooks.Tap("teacher", teacher, kind, option="teacher")
    return taps


class PairedLayers(kdhooks.Term):
    """A term over layer pairs: ``student`` and ``teacher`` name one layer each, or equal-length lists of them.

    Its taps are ``student_i`` / ``teacher_i`` (outputs, or ``tap_kind``), and
    ``self.pairs`` holds the (student path, teacher path) pairs in order.
    """

    student: str | list[str]
    teacher: str | list[str]
    tap_kind: ClassVar[str] = "output"

    def configure(self, distiller: kdhooks.Distiller) -> None:
        self.pairs = layer_pairs(self, self.student, self.teacher)

    def taps(self) -> dict[str, kdhooks.Tap]:
        return pair_taps(self.pairs, self.tap_kind)


# per-pair weights: by name, or one non-negative number per layer pair
LayerWeights = Literal["equal", "halving"] | list[kdhooks.NonNegative]


def resolve_layer_weights(term: kdhooks.Term, spec: LayerWeights, count: int) -> list[float]:
    """One weight per layer pair, shallowest pair first.

    ``equal``: 1 each. ``halving``: each pair half the next deeper one, the
    deepest 1 (2^(i−n+1): ¼, ½, 1 for three), the weighting of AB's authors'
    code and RepDistiller's ``ABLoss``. A list is taken as written and must
    have one number per pair.
    """
    if spec == "equal":
        return [1.0] * count
    if spec == "halving":
        return [2.0 ** (i - count + 1) for i in range(count)]
    weights = [float(w) for w in spec]
    if len(weights) != count:
        raise kdhooks.ConfigError(f"{term.location}.layer_weights", f"term {term.name!r} has {count} layer "
                                  f"pair{'s' if count != 1 else ''} and {len(weights)} layer_weights",
                                  value=list(spec), fix=f"give {count} numbers, shallowest pair first, or write "
                                  "`layer_weights: equal` or `halving`")
    return weights


class WeightedLayers(PairedLayers):
    """Paired layers whose per-pair losses are summed with ``layer_weights`` (equal by default).

    ``self.pair_weights`` holds the resolved weights, one per pair in order.
    """

    layer_weights: LayerWeights = "equal"

    def configure(self, distiller: kdhooks.Distiller) -> None:
        super().configure(distiller)
        self.pair_weights = resolve_layer_weights(self, self.layer_weights, len(self.pairs))

    def weighted(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """Σ_i w_i · loss_i over the layer pairs."""
        return sum(w * loss for w, loss in zip(self.pair_weights, losses))


def shape(value: Any) -> tuple[int, ...]:
    """A capture's shape; a module that returns a tuple gives its first tensor's."""
    while isinstance(value, list):
        value = value[0]
    return tuple(value)


tensor_of = kdhooks.tensor_of


def _kind(feature: tuple) -> str:
    return KINDS.get(len(feature), f"{len(feature)}-D feature {feature}")


def check_kind(term: kdhooks.Term, pair: tuple[str, str], student_shape: tuple, teacher_shape: tuple,
               kinds: tuple[int, ...], why: str) -> None:
    """A ConfigError unless both features are of one kind (rank) that ``kinds`` allows."""
    allowed = " or ".join(KINDS.get(k, f"{k}-D feature") for k in kinds)
    for role, path, feature in (("student", pair[0], student_shape), ("teacher", pair[1], teacher_shape)):
        if len(feature) not in kinds:
            raise kdhooks.ConfigError(f"{term.location}.{role}", f"{term.kind} needs {allowed} features; the "
                                      f"{role}'s {path!r} gives shape {feature}: {why}", value=path,
                                      fix=f"tap a layer whose output is a {allowed}")
    if len(student_shape) != len(teacher_shape):
        raise kdhooks.ConfigError(term.location, f"{term.kind} compares features of one kind; the student's "
                                  f"{pair[0]!r} is a {_kind(student_shape)} and the teacher's {pair[1]!r} a "
                                  f"{_kind(teacher_shape)}", value=list(pair),
                                  fix="pair conv layers with conv layers and token layers with token layers")


def check_same_positions(term: kdhooks.Term, pair: tuple[str, str], student_shape: tuple,
                         teacher_shape: tuple) -> None:
    """Token features must have the same length: there is no meaningful way to resample tokens."""
    if len(student_shape) == 3 and student_shape[1] != teacher_shape[1]:
        raise kdhooks.ConfigError(term.location, f"{term.kind} compares token features position by position; the "
                                  f"student's {pair[0]!r} has {student_shape[1]} tokens and the teacher's "
                                  f"{pair[1]!r} {teacher_shape[1]}", value=list(pair),
                                  fix="feed both models the same tokens (one tokenizer, same patch grid)")


def known(shapes: dict[str, Any], *names: str) -> bool:
    """Whether every named capture has a tensor shape: a dict, None or other non-tensor capture is not checked."""
    try:
        return all(isinstance(kdhooks.feature_shape(shapes[name]), tuple) for name in names)
    except (KeyError, TypeError):
        return False


def check_same_batch(term: kdhooks.Term, pair: tuple[str, str], student_shape: tuple, teacher_shape: tuple) -> None:
    """Student and teacher features of the same samples: a batch of one would broadcast against the other."""
    if student_shape[:1] != teacher_shape[:1]:
        raise kdhooks.ConfigError(term.location, f"{term.kind} compares the student's and the teacher's features "
                                  f"sample by sample, but the student's {pair[0]!r} has shape {student_shape} and "
                                  f"the teacher's {pair[1]!r} {teacher_shape}: different batch sizes",
                                  value=list(pair), fix="feed both models the same batch (a teacher_call must keep "
                                  "the batch size)")


def check_pairs(term: kdhooks.Term, pairs: list[tuple[str, str]], shapes: dict[str, Any],
                kinds: tuple[int, ...], why: str) -> None:
    """``student_i``/``teacher_i`` features of one kind that ``kinds`` allows, same samples, same token count."""
    for i, pair in enumerate(pairs):
        if not known(shapes, f"student_{i}", f"teacher_{i}"):
            continue
        student, teacher = kdhooks.feature_shape(shapes[f"student_{i}"]), kdhooks.feature_shape(shapes[f"teacher_{i}"])
        check_kind(term, pair, student, teacher, kinds, why)
        check_same_positions(term, pair, student, teacher)
        check_same_batch(term, pair, student, teacher)


def resized(feature: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """A conv map (or a stack of 2-D maps) at spatial ``size``: average pooling down, bilinear up."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    if feature.shape[-2] >= size[0] and feature.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feature, size)
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)


def smaller_grid(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two conv maps pooled to the smaller of their spatial sizes; token features as they are."""
    if first.dim() != 4 or first.shape[-2:] == second.shape[-2:]:
        return first, second
    size = (min(first.shape[-2], second.shape[-2]), min(first.shape[-1], second.shape[-1]))
    return resized(first, size), resized(second, size)
