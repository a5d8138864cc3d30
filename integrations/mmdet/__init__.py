"""MMDetection (mmengine) integration: a detector in ``MODELS`` that distills a student from a teacher.

In an ordinary mmdet config::

    custom_imports = dict(imports=['kdhooks.integrations.mmdet'], allow_failed_imports=False)
    model = dict(type='DistilledDetector',
                 student=dict(type='RetinaNet', ...),          # a single-stage or two-stage detector config
                 teacher='teacher_config.py',                   # or a detector config, or a module
                 teacher_ckpt='teacher.pth',
                 kd=dict(terms=[dict(kind='det_cls_kd', weight=1.0)]))   # a kdhooks config (or a YAML path)

This package translates, nothing more, one job per module:

- ``_detector``: ``DistilledDetector``, the model the Runner builds, wraps
  (DDP), optimizes and checkpoints. The student and the Distiller's
  connectors are its submodules, the teacher is not (kept frozen in eval
  mode, left out of checkpoints and the optimizer, and moved with the model).
  ``loss`` mode returns the student's losses plus each term as
  ``loss_kd_<name>``; ``predict`` and ``tensor`` are the student's. The
  Distiller's step follows the Runner's iteration (from the message hub), so
  schedules run per iteration. Ground truth reaches the terms in the step's
  extras (see ``kdhooks.plugins.detection``). ``copy.deepcopy`` gives a
  ``DistilledStudent`` (the student and the connectors, no teacher), which
  mmengine's ``EMAHook`` averages.
- ``_teacher``: the teacher, loaded from ``teacher_ckpt`` or used as given
  when it is a module (never re-initialised), and how it runs: under no_grad
  on the student's preprocessed inputs, re-normalized as its own
  ``data_preprocessor`` would (mean, std, channel order, padding); backbone,
  neck and head (a two-stage teacher: its RPN, its features kept for the RoI
  head), no post-processing.
- ``_targets``: the extras of the student's dense head (a single-stage head,
  or a two-stage student's RPN): anchors, its own assigner's positives, and
  regression targets in the encoding of its box outputs; the checks that a
  teacher head encodes boxes alike.
- ``_two_stage``: two-stage detectors (Faster R-CNN). Terms with ``rois:
  true`` read the RoI head's rows over the proposals the student sampled; the
  teacher's RoI head runs on the same proposals after the student's forward
  (Chen et al. 2017) and its outputs reach them as ``teacher_rois``, with the
  proposals' regression targets from the student RoI head's assigner.
- ``_checkpoints``: torch 2.6+ loads with ``weights_only=True``; importing this
  package allows exactly what mmengine checkpoints hold besides tensors
  (``allow_mmengine_checkpoints``). It replaces nothing of mmengine's:
  ``mmengine_checkpoint_loader()`` is a context in which mmengine's local loader
  allows them again at each load, for a process where another library's
  ``safe_globals`` context has removed them. Building a ``DistilledDetector``
  allows them again (the Runner builds its model before it resumes), and the
  teacher's checkpoint is loaded in that context.
- ``_export``: ``kdhooks mmdet export`` writes the student alone, which plain
  mmdet loads with the student's config.
- ``_masks``: ``ImitationMaskHook`` (``custom_hooks``) saves the masks the
  feature-imitation terms used over a few training images as PNGs.
"""
from __future__ import annotations

from ._checkpoints import allow_mmengine_checkpoints, mmengine_checkpoint_loader
from ._detector import DistilledDetector, DistilledStudent
from ._export import STUDENT_PREFIX, export_student, register_cli
from ._masks import ImitationMaskHook, mask_overlay
from ._teacher import build_teacher

__all__ = ["STUDENT_PREFIX", "DistilledDetector", "DistilledStudent", "ImitationMaskHook", "allow_mmengine_checkpoints",
           "build_teacher", "export_student", "mask_overlay", "mmengine_checkpoint_loader", "register_cli"]

allow_mmengine_checkpoints()
