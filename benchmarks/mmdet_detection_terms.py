"""Detection distillation on the generated shapes data: the student alone vs the student + each detection term.

    python benchmarks/mmdet_detection_terms.py      # writes its tables into docs/methods.md
    python benchmarks/mmdet_detection_terms.py --families faster_rcnn --student-iters 300   # one pair, reduced

A ResNet-18 RetinaNet, a ResNet-18 GFL and a ResNet-18 Faster R-CNN teacher
are trained once (seed 0); then, for each seed, the quarter-width student of
each is trained alone and with each term, through mmengine's Runner with the
configs of examples/mmdet/ (same iterations, data order and initial weights
per seed), and scored with CocoMetric (bbox mAP) on the validation images.
The single-stage pairs go to the section ``detection`` of docs/methods.md,
the Faster R-CNN pair to ``detection-two-stage``; a run writes the sections of
the families it trained.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "mmdet"
sys.path.insert(0, str(Path(__file__).parent))
from _measure import write_section  # noqa: E402

COMMAND = "python benchmarks/mmdet_detection_terms.py"


@dataclass
class Family:
    """A teacher/student pair of examples/mmdet/ and the variants of its distillation config to compare."""

    teacher: str
    student: str
    kd: str
    # label -> the kd config's terms it keeps (by name, or kind where unnamed); empty: the config's terms as they are
    variants: dict[str, list[str]] = field(default_factory=dict)


FAMILIES = {
    "retinanet": Family("retinanet_r18_shapes.py", "retinanet_tiny_shapes.py", "kd_retinanet_shapes.py", {
        "det_cls_kd": ["det_cls_kd"], "det_bounded_reg": ["det_bounded_reg"],
        "det_feature_imitation": ["det_feature_imitation"],
        "all three": ["det_cls_kd", "det_bounded_reg", "det_feature_imitation"]}),
    "gfl": Family("gfl_r18_shapes.py", "gfl_tiny_shapes.py", "kd_gfl_shapes.py", {"ld": []}),
    # Chen et al.'s two terms on both stages (the RPN; the RoI head over the student's sampled proposals, the
    # teacher's RoI head on the same proposals), Wang et al.'s imitation near objects from the RPN's anchors
    "faster_rcnn": Family("faster_rcnn_r18_shapes.py", "faster_rcnn_tiny_shapes.py", "kd_faster_rcnn_shapes.py", {
        "det_cls_kd (RPN + RoI)": ["rpn_cls_kd", "roi_cls_kd"],
        "det_bounded_reg (RPN + RoI)": ["rpn_bounded_reg", "roi_bounded_reg"],
        "det_feature_imitation (RPN anchors)": ["det_feature_imitation"],
        "all three": ["rpn_cls_kd", "roi_cls_kd", "rpn_bounded_reg", "roi_bounded_reg", "det_feature_imitation"]}),
}
# the docs/methods.md section each family's rows go to
SECTIONS = {"detection": ("retinanet", "gfl"), "detection-two-stage": ("faster_rcnn",)}


def shapes_module():
    spec = importlib.util.spec_from_file_location("kdhooks_example_shapes", EXAMPLES / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(name: str, work_dir: Path, data: Path, iters: int, seed: int):
    from mmengine.config import Config

    cfg = Config.fromfile(str(EXAMPLES / name))
    shapes_module().use_data_root(cfg, data)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None          # scored once, by test()
    warmup = min(50, iters // 4)
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=warmup),
        dict(type="CosineAnnealingLR", by_epoch=False, begin=warmup, end=iters, eta_min=1e-4),
    ]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=iters, by_epoch=False)
    cfg.default_hooks.logger.interval = 100
    cfg.log_level = "INFO"
    cfg.randomness = dict(seed=seed)
    return cfg


def run(cfg) -> dict[str, float]:
    """Train, then score the model in memory with CocoMetric."""
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    return {"mAP": 100 * metrics.get("coco/bbox_mAP", 0.0), "mAP50": 100 * metrics.get("coco/bbox_mAP_50", 0.0)}


def with_terms(cfg, keep: list[str]):
    """The distillation config with only the terms named in ``keep`` (by name, or kind where unnamed)."""
    if not keep:
        return cfg
    cfg = copy.deepcopy(cfg)
    terms = [dict(term) for term in cfg.model.kd.terms]
    cfg.model.kd = dict(terms=[term for term in terms if term.get("name", term["kind"]) in keep])
    assert len(cfg.model.kd.terms) == len(keep), (keep, terms)
    return cfg


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def teacher_metrics(family: Family, name: str, work: Path, data: Path, iters: int, reuse: bool) -> dict[str, float]:
    """Train the family's teacher (seed 0) and score it; with ``reuse`` an earlier run's checkpoint and scores."""
    where = work / f"{name}_teacher"
    scores = where / "teacher_scores.json"
    if reuse and scores.exists() and (where / f"iter_{iters}.pth").exists():
        return json.loads(scores.read_text())
    begun = time.time()
    metrics = run(config(family.teacher, where, data, iters, 0))
    scores.write_text(json.dumps({**metrics, "seconds": time.time() - begun}))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                        help="the pairs to train (each docs/methods.md section is written from its own families)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teacher-iters", type=int, default=1000)
    parser.add_argument("--student-iters", type=int, default=500)
    parser.add_argument("--reuse-teachers", action="store_true",
                        help="use a teacher checkpoint and scores an earlier run left in --work-dir")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "mmdet_bench"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "methods.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import kdhooks.integrations.mmdet  # noqa: F401  (registers DistilledDetector)

    work = Path(args.work_dir)
    data = shapes_module().make_shapes(work / "data", train=256, val=64)
    started = time.time()
    teachers, results, seconds = {}, {}, dict.fromkeys(args.families, 0.0)

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    for name in args.families:
        begun = time.time()
        metrics = teacher_metrics(FAMILIES[name], name, work, data, args.teacher_iters, args.reuse_teachers)
        # a reused teacher counts the seconds it took when it was trained
        seconds[name] += metrics.pop("seconds", time.time() - begun)
        results[f"{name} teacher"] = [metrics]
        teachers[name] = work / f"{name}_teacher" / f"iter_{args.teacher_iters}.pth"
        log(f"{name} teacher: {results[f'{name} teacher'][0]}")

    for seed in range(args.seeds):
        for name in args.families:
            family = FAMILIES[name]
            variants = {f"{name} student alone": config(family.student, work / "alone", data, args.student_iters, seed)}
            kd = config(family.kd, work / "kd", data, args.student_iters, seed)
            kd.model.teacher_ckpt = str(teachers[name])
            for label, keep in family.variants.items():
                variants[f"{name} student + {label}"] = with_terms(kd, keep)
            for label, cfg in variants.items():
                begun = time.time()
                cfg.work_dir = str(work / f"seed{seed}" / re.sub(r"[^0-9A-Za-z]+", "_", label).strip("_"))
                results.setdefault(label, []).append(run(cfg))
                seconds[name] += time.time() - begun
                log(f"seed {seed} {label}: {results[label][-1]}")
            (work / f"results_{'_'.join(args.families)}.json").write_text(json.dumps(results, indent=1))

    for section, members in SECTIONS.items():
        chosen = [name for name in members if name in args.families]
        if not chosen:
            continue
        rows = {label: runs for label, runs in results.items() if label.split(" ")[0] in chosen}
        text = RENDER[section](rows, args.teacher_iters, args.student_iters, args.seeds,
                               sum(seconds[name] for name in chosen))
        write_section(Path(args.out), section, text)
        print(text)


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """mAP per variant, its change against the student alone of its family, each seed."""
    rows = ["| shapes (64×64, 2 classes), bbox mAP (%) on 64 val images | mAP | Δ vs alone | mAP@0.5 | "
            "mAP per seed |", "|---|---|---|---|---|"]
    for label, runs in results.items():
        maps = [r["mAP"] for r in runs]
        alone = results.get(f"{label.split(' ')[0]} student alone")
        change = "" if "+" not in label or not alone else \
            f"{statistics.mean(maps) - statistics.mean(r['mAP'] for r in alone):+.1f}"
        per_seed = " / ".join(f"{m:.1f}" for m in maps)
        rows.append(f"| {label} | {mean_std(maps)} | {change} | {mean_std([r['mAP50'] for r in runs])} "
                    f"| {per_seed} |")
    return "\n".join(rows)


def render(results: dict[str, list[dict[str, float]]], teacher_iters: int, student_iters: int, seeds: int,
           seconds: float) -> str:
    """The docs/methods.md section of the single-stage pairs (RetinaNet, GFL)."""
    return f"""## Detection (MMDetection): student alone vs student + each detection term

Generated COCO-format data (`examples/mmdet/shapes.py`: 256 training and 64 validation images of 64×64
noise with one to three filled rectangles or ellipses). Teachers: ResNet-18 RetinaNet and ResNet-18 GFL
(FPN P2–P5, trained from scratch, {teacher_iters} iterations, batch 8, seed 0). Students: the same detectors
at a quarter of the width (ResNet-18 with 16 base channels, 32-channel FPN and head), {student_iters}
iterations, batch 8. SGD with warm-up and cosine decay, lr 0.02 for the teachers and 0.01 for the students
(at 0.02 the plain RetinaNet student stayed at background-only in one seed of three). {seeds} seeds,
mean ± std; a seed fixes the initial weights and the data order of every variant. Terms as in
`examples/mmdet/kd_retinanet_shapes.py` (det_cls_kd w=1, T=1, w0=1.5; det_bounded_reg w=0.5, m=0;
det_feature_imitation w=0.01, ψ=0.5) and `kd_gfl_shapes.py` (ld w=0.25, T=10, at positives). Scored with
mmdet's CocoMetric. {seconds:.0f} s in all on this project's shared 2-core CPU (one thread).

{table(results)}

Command: `{COMMAND} --families retinanet gfl` (options: `--seeds`, `--teacher-iters`, `--student-iters`).
"""


def render_two_stage(results: dict[str, list[dict[str, float]]], teacher_iters: int, student_iters: int, seeds: int,
                     seconds: float) -> str:
    """The docs/methods.md section of the two-stage pair (Faster R-CNN)."""
    schedule = "" if (teacher_iters, student_iters) == (1000, 500) else (
        f" This is a reduced schedule: the student trains {student_iters} iterations (the single-stage pairs "
        f"above: 500) and the teacher {teacher_iters} (above: 1000), since a distilled Faster R-CNN step (the "
        f"ResNet-18 teacher's forward included) takes about 1.1 s on the shared 2-core CPU and the full "
        f"schedule would have taken some 2.5 hours; the differences are between students trained alike, "
        f"not final accuracies.")
    return f"""## Detection, two-stage (MMDetection): a Faster R-CNN student alone vs + each detection term

The same data. Teacher: ResNet-18 Faster R-CNN (`examples/mmdet/faster_rcnn_r18_shapes.py`, mmdet's
faster-rcnn_r50_fpn with ResNet-18: FPN P2–P5 at 64 channels, an RPN with 16–128-pixel anchors, RoIAlign 7×7
and two shared 256-unit FC layers, 128 sampled RoIs per image; from scratch, {teacher_iters} iterations, batch 8,
seed 0, lr 0.02). Student: the same at a quarter of the width (`faster_rcnn_tiny_shapes.py`: 16 base channels,
32-channel FPN, RPN and RoI features, 64-unit FC layers), {student_iters} iterations, batch 8, lr 0.01, SGD
with warm-up and cosine decay. {seeds} seeds, mean ± std; a seed fixes the initial weights and the data order
of every variant. Terms as in `examples/mmdet/kd_faster_rcnn_shapes.py`, each on both stages as Chen et al.
2017 apply them: det_cls_kd on the RPN's objectness (sigmoid form) and on the RoI head's classes over the
proposals the student sampled, the teacher's RoI head run on the same proposals (`rois: true`; softmax,
T=1, w0=1.5), both w=1; det_bounded_reg (m=0) on the RPN's deltas (w=0.5) and on the RoI deltas of the
positive proposals (w=0.1: the RoI coder divides deltas by 0.1 and 0.2); det_feature_imitation (Wang et al.
2019) on the four FPN levels near objects, the region from the RPN's anchors (w=0.01, ψ=0.5). Scored with
mmdet's CocoMetric. {seconds:.0f} s in all on the shared 2-core CPU (one thread).{schedule}

{table(results)}

Command: `{COMMAND} --families faster_rcnn` (options: `--seeds`, `--teacher-iters`, `--student-iters`).
"""


RENDER = {"detection": render, "detection-two-stage": render_two_stage}


if __name__ == "__main__":
    main()
