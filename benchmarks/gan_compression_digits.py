"""GAN compression on digits: a quarter-width pix2pix student alone vs with recon + feature distillation, 3 seeds.

    python benchmarks/gan_compression_digits.py                  # about 8-12 min on 2 shared cores (one thread)
    python benchmarks/gan_compression_digits.py --from-results   # the section again, from runs/*.json

The example's data, models and loop (examples/gan/): scikit-learn's digits at
16x16 with the bottom half hidden; pix2pix's U-Net (teacher width 32, student
8: a quarter of the channels) and conditional PatchGAN, the generator's loss
GAN + 100·L1 to the real image. One teacher (seed 0), then per seed the student
alone and the student with examples/gan/gan_compression.yaml (recon w=100 to
the teacher's output, fitnets with 1x1 convs on down2 and up2), from the same
initial weights and batches. Scores on the 450 validation digits: mean |G(x) −
real| and the accuracy of a fixed classifier (logistic regression on the real
training digits) on G(x). Writes docs/gan_digits.png and the GAN section of docs/methods.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "gan"
sys.path.insert(0, str(EXAMPLE))
sys.path.insert(0, str(Path(__file__).parent))
from _measure import saved_or_measured, write_section  # noqa: E402
from train import data, digit_classifier, evaluate, train_student, train_teacher  # noqa: E402

COMMAND = "python benchmarks/gan_compression_digits.py"
RESULTS = ROOT / "runs" / "gan_compression_digits.json"
GRID = ROOT / "docs" / "gan_digits.png"
VARIANTS = {"student alone": None, "student + recon + feature distillation": str(EXAMPLE / "gan_compression.yaml")}


def save_grid(rows: dict[str, torch.Tensor], path: Path) -> None:
    """One row of digits per generator (images in [-1, 1]), labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = next(iter(rows.values())).shape[0]
    figure, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.8, len(rows) * 0.9))
    for r, (name, images) in enumerate(rows.items()):
        for c in range(columns):
            axis = axes[r, c]
            axis.imshow(images[c, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(seeds: list[int], teacher_steps: int, steps: int) -> dict:
    start = time.time()
    sets = data()
    classifier = digit_classifier(sets)
    real_accuracy = float((torch.from_numpy(classifier.predict(sets["val_real"].flatten(1).numpy()))
                           == sets["val_labels"]).float().mean())
    teacher = train_teacher(sets, teacher_steps, seed=0)
    results = {"teacher": evaluate(teacher, sets, classifier), "classifier_on_real": real_accuracy, "seeds": seeds,
               "teacher_steps": teacher_steps, "steps": steps, "variants": {n: [] for n in VARIANTS},
               "seconds": dict.fromkeys(VARIANTS, 0.0), "teacher_seconds": time.time() - start}
    print(f"teacher {results['teacher']}, classifier on real {real_accuracy:.4f}", flush=True)
    # one validation digit of each class for the grid
    picks = torch.stack([torch.nonzero(sets["val_labels"] == d)[0, 0] for d in range(10)])
    with torch.no_grad():
        grid = {"input": sets["val_masked"][picks], "real": sets["val_real"][picks],
                "teacher": teacher(sets["val_masked"][picks])}
    for seed in seeds:
        for name, config in VARIANTS.items():
            began = time.time()
            student = train_student(teacher, config, sets, steps, seed)
            results["variants"][name].append(evaluate(student, sets, classifier))
            results["seconds"][name] += time.time() - began
            print(f"seed {seed} {name}: {results['variants'][name][-1]} ({time.time() - began:.0f} s)", flush=True)
            if seed == seeds[0]:
                with torch.no_grad():
                    grid[name.replace("student + recon + feature distillation", "distilled student")] = \
                        student(sets["val_masked"][picks])
    save_grid(grid, GRID)
    results["total_seconds"] = time.time() - start
    return results


def section(results: dict) -> str:
    alone = results["variants"]["student alone"]
    teacher = results["teacher"]
    rows = [f"| teacher (width 32) | {teacher['l1']:.3f} | | {100 * teacher['accuracy']:.1f} | | | |"]
    for name, values in results["variants"].items():
        l1 = [v["l1"] for v in values]
        accuracy = [100 * v["accuracy"] for v in values]
        if name == "student alone":
            d_l1 = d_acc = per_seed_d = ""
        else:
            diffs_l1 = [v["l1"] - a["l1"] for v, a in zip(values, alone)]
            diffs_acc = [100 * (v["accuracy"] - a["accuracy"]) for v, a in zip(values, alone)]
            d_l1, d_acc = f"{statistics.mean(diffs_l1):+.3f}", f"{statistics.mean(diffs_acc):+.1f}"
            per_seed_d = " / ".join(f"{dl:+.3f}, {da:+.1f}" for dl, da in zip(diffs_l1, diffs_acc))
        per_seed = " / ".join(f"{v['l1']:.3f}, {100 * v['accuracy']:.1f}" for v in values)
        rows.append(f"| {name} (width 8) | {statistics.mean(l1):.3f} ± {statistics.stdev(l1):.3f} | {d_l1} | "
                    f"{statistics.mean(accuracy):.1f} ± {statistics.stdev(accuracy):.1f} | {d_acc} | "
                    f"{per_seed} | {per_seed_d} |")
    distilled = results["variants"]["student + recon + feature distillation"]
    d_l1 = [v["l1"] - a["l1"] for v, a in zip(distilled, alone)]
    d_acc = [100 * (v["accuracy"] - a["accuracy"]) for v, a in zip(distilled, alone)]
    reading = (f"Adding `recon` and the feature distillation changes the L1 to the real digits by "
               f"{statistics.mean(d_l1):+.3f} ({sum(d < 0 for d in d_l1)} of {len(d_l1)} seeds lower) and the "
               f"classifier's accuracy on the generated digits by {statistics.mean(d_acc):+.1f} points "
               f"({sum(d > 0 for d in d_acc)} of {len(d_acc)} seeds up, per seed "
               f"{', '.join(f'{d:+.1f}' for d in d_acc)}).")
    per_run = ", ".join(f"{name}: {results['seconds'][name] / len(results['seeds']):.0f} s"
                        for name in results["variants"])
    return f"""
## GAN compression: a quarter-width pix2pix generator alone vs with recon + feature distillation

scikit-learn's digits at 16×16 in [−1, 1], the bottom half hidden (set to 0); the generator draws
the whole digit (`examples/gan/`). pix2pix's loop stays the user's: a conditional PatchGAN
(width 32) with its own Adam, the generator's loss GAN (BCE) + 100·L1 to the real image, Adam 2e-4,
β = (0.5, 0.999), batch 32. Teacher: pix2pix's U-Net at width 32 ({results['teacher_steps']} steps, seed 0);
students: the same U-Net at width 8 (a quarter of the channels), {results['steps']} steps, alone or with
`examples/gan/gan_compression.yaml` (`recon` w=100, L1 to the teacher's output; `fitnets` with a
1×1 conv on `down2` and on `up2`, w=1 each). The teacher runs in eval mode (kdhooks' default: no
dropout, BatchNorm on its running statistics). Scores on the 450 validation digits: L1 = mean
|G(x) − real image| (lower is better), accuracy = a fixed classifier (logistic regression on the
real training digits; {100 * results['classifier_on_real']:.1f} % on the real validation digits) on G(x).
{len(results['seeds'])} seeds, mean ± std; Δ the mean of per-seed differences to the student alone.

| digits 16×16, bottom half hidden | L1 to real | Δ | accuracy (%) | Δ | per seed (L1, acc) | per-seed Δ |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{reading} The distilled student draws digits that the classifier recognises slightly more often,
no closer to the real pixels: the user's L1 to the real image (weight 100) already pins the pixels,
and the teacher's output, the `recon` target, is itself close to them. The effect is small next to
the distance to the teacher (4× the channels, 2.5× the steps). The GAN loss, the discriminator and
its optimizer are the loop's own in both rows; kdhooks only adds the terms.

Samples (one validation digit per class; rows: input, real, teacher, student alone, distilled
student, the students of seed {results['seeds'][0]}):

![GAN samples](gan_digits.png)

Seconds per student run (one thread, shared 2-core CPU): {per_run}; teacher {results['teacher_seconds']:.0f} s;
{results['total_seconds']:.0f} s in all.

Command: `{COMMAND}` (options: `--seeds`, `--teacher-steps`, `--steps`; `--from-results` rewrites this
section from `runs/gan_compression_digits.json`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--from-results", action="store_true")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing docs/methods.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = saved_or_measured(RESULTS, args.from_results, lambda: run(args.seeds, args.teacher_steps, args.steps))
    text = section(results)
    if args.no_docs:
        print(text)
    else:
        write_section(ROOT / "docs" / "methods.md", "gan", text)


if __name__ == "__main__":
    main()
