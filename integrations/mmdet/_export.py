"""The student alone: ``kdhooks mmdet export`` writes a checkpoint and config that plain mmdet loads."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from mmengine.config import Config

import kdhooks

from ._checkpoints import allow_mmengine_checkpoints

STUDENT_PREFIX = "student."


def export_student(checkpoint: str | Path, out: str | Path, config: str | Path | None = None) -> Path:
    """Write the student's weights from a DistilledDetector checkpoint as a plain mmdet checkpoint.

    With ``config`` (the distillation config) the student's config is written next to it as ``<out>.py``:
    the config without the teacher (no top-level value naming the teacher's config or checkpoint remains), its
    ``load_from`` the checkpoint written, as ``out`` was given.
    """
    if not Path(checkpoint).is_file():
        raise kdhooks.ConfigError(str(checkpoint), "checkpoint not found", value=str(checkpoint),
                                  fix="pass a checkpoint the Runner saved (work_dir/iter_N.pth)")
    allow_mmengine_checkpoints()
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    weights = state.get("state_dict", state)
    student = {key[len(STUDENT_PREFIX):]: value for key, value in weights.items() if key.startswith(STUDENT_PREFIX)}
    if not student:
        raise kdhooks.ConfigError(str(checkpoint), "no 'student.' weights: not a DistilledDetector checkpoint",
                                  fix="pass a checkpoint the Runner saved while training a DistilledDetector")
    meta = {key: value for key, value in state.get("meta", {}).items() if key != "cfg"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "state_dict": student}, out)
    if config is not None:
        cfg = Config.fromfile(str(config))
        if cfg.model.get("type") != "DistilledDetector":
            raise kdhooks.ConfigError(f"{config}:model.type", "not a DistilledDetector config",
                                      value=cfg.model.get("type"), fix="pass the distillation config")
        # the teacher's config and checkpoint (a '{{ fileDirname }}' path of this machine, often kept in a
        # top-level variable such as `teacher_config`) are not the student's: drop every value naming them
        teacher_refs = {str(v) for v in (cfg.model.get("teacher"), cfg.model.get("teacher_ckpt")) if isinstance(v, str)}
        for key in [k for k, v in cfg.items() if isinstance(v, str) and v in teacher_refs]:
            cfg.pop(key)
        cfg.model = cfg.model.student
        imports = [m for m in cfg.get("custom_imports", {}).get("imports", []) if not m.startswith("kdhooks")]
        if "custom_imports" in cfg:
            if imports:
                cfg.custom_imports.imports = imports
            else:
                cfg.pop("custom_imports")
        cfg.load_from, cfg.resume = str(out), False
        cfg.dump(str(out.with_suffix(".py")))
    return out


def _export(args: argparse.Namespace) -> int:
    out = export_student(args.checkpoint, args.out, args.config)
    print(f"wrote the student's weights to {out}" + (f" and its config to {out.with_suffix('.py')}"
                                                     if args.config else ""))
    return 0


def register_cli(commands: argparse._SubParsersAction) -> None:
    """``kdhooks mmdet export CHECKPOINT OUT [--config KD_CONFIG]``."""
    mmdet = commands.add_parser("mmdet", help="MMDetection: export the distilled student")
    actions = mmdet.add_subparsers(dest="mmdet_command", required=True)
    export = actions.add_parser("export", help="write the student alone from a DistilledDetector checkpoint, "
                                "loadable by plain mmdet")
    export.add_argument("checkpoint", help="a checkpoint the Runner saved (e.g. work_dir/iter_400.pth)")
    export.add_argument("out", help="the student-only checkpoint to write")
    export.add_argument("--config", default=None, help="the distillation config: also write the student's "
                        "config as OUT with a .py suffix")
    export.set_defaults(run=_export)
