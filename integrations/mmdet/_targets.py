"""Ground truth as the detection terms read it, from the student's dense head (a single-stage head or an RPN).

The anchors, the positives of the head's own assigner and its regression
targets in the encoding of its box outputs; and the checks, at build, that a
teacher's box outputs can be compared with those targets row by row.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from mmdet.structures.bbox import get_box_tensor
from torch import nn

import kdhooks


def is_anchor_head(head: Any) -> bool:
    return hasattr(head, "prior_generator") and hasattr(head, "get_anchors")


def assigns_points(head: Any) -> bool:
    """An anchor-free head that assigns points as FCOS does: ``get_targets(points, batch_gt_instances)``."""
    if not hasattr(head, "prior_generator") or not hasattr(head, "get_targets"):
        return False
    return list(inspect.signature(head.get_targets).parameters)[:2] == ["points", "batch_gt_instances"]


def point_positives(head: nn.Module, sizes: list[tuple], data_samples: list,
                    device: torch.device) -> list[torch.Tensor]:
    """Per level (B, H·W): True at the points the head's own assigner makes positive (FCOS: inside a box, within
    the centre-sampling radius where the head samples centres, in the level's regression range)."""
    points = head.prior_generator.grid_priors(sizes, dtype=torch.float32, device=device)
    with torch.no_grad():
        labels = head.get_targets(points, [s.gt_instances for s in data_samples])[0]
    # each level's labels are the images' points one image after the other
    return [((level >= 0) & (level < head.num_classes)).reshape(len(data_samples), -1) for level in labels]


def setting(value: Any) -> Any:
    """A box coder setting, comparable whether the config wrote a list or the default is a tuple."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else value


def coder_settings(coder: Any) -> tuple:
    """The box coder's type and public settings (means, stds, clipping)."""
    if coder is None:
        return (None, None)
    return type(coder).__name__, {k: setting(v) for k, v in vars(coder).items() if not k.startswith("_")}


def box_encoding(head: nn.Module) -> tuple:
    """What a row of the head's box outputs means: priors per location, the box coder and its settings, the priors."""
    generator = getattr(head, "prior_generator", None)
    return (getattr(head, "num_base_priors", None), *coder_settings(getattr(head, "bbox_coder", None)),
            [tuple(s) for s in getattr(generator, "strides", [])],
            [b.tolist() for b in getattr(generator, "base_anchors", [])])


def check_box_encoding(heads: dict[str, Any], path: str, terms: str) -> None:
    """Regression targets in the student head's encoding need box deltas, and a teacher head that encodes alike.

    ``heads``: the student's and the teacher's module at ``path`` (``bbox_head``,
    ``rpn_head``). The targets come from the student head's assigner, encoded
    with its box coder against its anchors (``head_targets``); the terms compare
    them with both heads' outputs row by row, so those rows must be deltas of
    the same coder against the same anchors.
    """
    for role, head in heads.items():
        if head is None or not hasattr(head, "bbox_coder") or not hasattr(head, "prior_generator"):
            raise kdhooks.ConfigError(terms, f"the {role}'s {path} ({type(head).__name__}) is not an anchor head "
                                      f"with a box coder: there are no regression targets to compare its box "
                                      f"outputs with", fix="distill box outputs between anchor heads (RetinaNet, "
                                      "ATSS, an RPN; a RoI head with rois: true), or drop the term")
        if hasattr(head, "reg_max") or hasattr(head, "integral"):
            bins = head.reg_max + 1 if hasattr(head, "reg_max") else "several"
            raise kdhooks.ConfigError(terms, f"the {role}'s {type(head).__name__} outputs a distribution over "
                                      f"{bins} bins per box edge (4 × {bins} channels per prior), not box deltas "
                                      f"to compare with regression targets",
                                      fix="use `ld` (localization distillation) for distribution heads (GFL, LD)")
    mine, theirs = box_encoding(heads["student"]), box_encoding(heads["teacher"])
    what = ("priors per location", "box coder", "box coder settings", "strides", "anchor shapes")
    differences = [f"{name}: student {a}, teacher {b}" for name, a, b in zip(what, mine, theirs) if a != b]
    if differences:
        raise kdhooks.ConfigError(terms, f"the heads encode boxes differently ({'; '.join(differences)}); box "
                                  f"outputs are compared row by row with targets in the student's encoding",
                                  fix=f"give the teacher's and the student's {path} the same anchor_generator and "
                                  "bbox_coder, or drop the term")


@contextlib.contextmanager
def every_positive(head: nn.Module) -> Iterator[None]:
    """Within: the head's targets cover every prior its assigner makes positive, not a random sample of them.

    An RPN samples 256 anchors per image (``RandomSampler``) for its loss; the
    terms read all positives, and drawing a second random sample here would
    also move the random state training goes on with. mmdet's ``PseudoSampler``
    keeps the assignment as it is.
    """
    from mmdet.models.task_modules.samplers import PseudoSampler

    sampler = getattr(head, "sampler", None)
    if sampler is None or isinstance(sampler, PseudoSampler):
        yield
        return
    head.sampler = PseudoSampler()
    try:
        yield
    finally:
        head.sampler = sampler


def head_targets(head: nn.Module, sizes: list[tuple], data_samples: list, device: torch.device) -> dict[str, Any]:
    """The student head's own assignment: per level (B, H·W·A, 4) regression targets and weights, positives.

    The targets are in the encoding of the head's box outputs. A head with
    ``reg_decoded_bbox=True`` (ATSS, any anchor head with an IoU loss) assigns
    gt boxes in pixels and decodes its outputs to compare; here the pixel
    targets of the positives are encoded with the head's box coder against
    their anchors instead, exactly as the head's targets are encoded when
    ``reg_decoded_bbox=False``, so they compare with the outputs like with like.
    An RPN (one class, object or not) is given the boxes with every label 0, as
    mmdet's two-stage detectors give them to it, and all its positives.
    """
    metas = [s.metainfo for s in data_samples]
    gt_instances = [s.gt_instances for s in data_samples]
    if head.num_classes == 1:
        gt_instances = [instances.clone() for instances in gt_instances]
        for instances in gt_instances:
            instances.labels = torch.zeros_like(instances.labels)
    anchors, valid = head.get_anchors(sizes, metas, device=device)
    # per level (B, H·W·A, 4), before get_targets joins each image's list in place (ATSS-style heads do)
    level_anchors = [torch.stack([get_box_tensor(image[level]) for image in anchors]) for level in range(len(sizes))]
    with torch.no_grad(), every_positive(head):
        targets = head.get_targets(anchors, valid, gt_instances, metas)
    if targets[0][0].dim() == 3:
        # ATSS-style heads (GFL) return the anchors first
        targets = targets[1:]
    labels, _, reg_targets, reg_weights = targets[:4]
    positives = [(level >= 0) & (level < head.num_classes) for level in labels]
    reg_targets = list(reg_targets)
    if getattr(head, "reg_decoded_bbox", False):
        for level, (boxes, weights) in enumerate(zip(reg_targets, reg_weights)):
            chosen = weights.sum(dim=-1) > 0
            encoded = boxes.new_zeros(*boxes.shape[:-1], head.bbox_coder.encode_size)
            if chosen.any():
                encoded[chosen] = head.bbox_coder.encode(level_anchors[level][chosen], boxes[chosen])
            reg_targets[level] = encoded
    return {"reg_targets": reg_targets, "reg_weights": list(reg_weights), "positives": positives}
