"""MMDetection (mmengine) integration: a detector in ``MODELS`` that distills a student from a teacher.

In an ordinary mmdet config::

    custom_imports = dict(imports=['kdhooks.integrations.mmdet'], allow_failed_imports=False)
    model = dict(type='DistilledDetector',
                 student=dict(type='RetinaNet', ...),          # any single-stage detector config
                 teacher='teacher_config.py',                   # or a detector config, or a module
                 teacher_ckpt='teacher.pth',
                 kd=dict(terms=[dict(kind='det_cls_kd', weight=1.0)]))   # a kdhooks config (or a YAML path)

This package translates, nothing more, one job per module:

- ``_detector``: ``DistilledDetector``, the model the Runner builds, wraps
  (DDP), optimizes and checkpoints. The student and the Distiller's
  connectors are its submodules, the teacher is not (it is loaded from
  ``teacher_ckpt``, or used as given when it is a module, never
  re-initialised; kept frozen in eval mode, left out of checkpoints and the
  optimizer, and moved with the model). ``loss`` mode returns the student's
  losses plus each term as ``loss_kd_<name>``; ``predict`` and ``tensor`` are
  the student's. The teacher runs under no_grad on the student's preprocessed
  inputs, re-normalized as its own ``data_preprocessor`` would (mean, std,
  channel order, padding). The Distiller's step follows the Runner's iteration
  (from the message hub), so schedules run per iteration. Ground truth reaches
  the terms in the step's extras (see ``kdhooks.plugins.detection``), taken
  from the student head's own anchor generator and assigner, regression
  targets in the encoding of its box outputs. ``copy.deepcopy`` gives a
  ``DistilledStudent`` (the student and the connectors, no teacher), which
  mmengine's ``EMAHook`` averages.
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
from ._detector import DistilledDetector, DistilledStudent, build_teacher
from ._export import STUDENT_PREFIX, export_student, register_cli
from ._masks import ImitationMaskHook, mask_overlay

__all__ = ["DistilledDetector", "DistilledStudent", "ImitationMaskHook", "STUDENT_PREFIX", "allow_mmengine_checkpoints",
           "build_teacher", "export_student", "mask_overlay", "mmengine_checkpoint_loader", "register_cli"]

allow_mmengine_checkpoints()
