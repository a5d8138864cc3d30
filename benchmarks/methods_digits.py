"""Every "what to match" term on digits against the plain student and plain KD, and the cost of grad taps.

    python benchmarks/methods_digits.py        # writes its section into docs/methods.md

The demo's pair and loop (kdhooks.demo: teacher_cnn, student_cnn, train). Per
seed: one teacher, then every variant from the same initial student, the same
data split and batch order. Each term runs at its paper's defaults added to the
cross-entropy (task weight 1), except the logit terms, which share the demo's
0.5/0.5 split with KD, and the initialization methods (AB, FSP), which run
alone for the first epochs and then give way to the task loss, as in their
papers. Nothing here is tuned to the results.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import kdhooks
from kdhooks.demo import KD_CONFIG, accuracy, digits_tensors, student_cnn, teacher_cnn, train

sys.path.insert(0, str(Path(__file__).parent))
from _measure import interleaved_medians, peak_bytes, write_section  # noqa: E402

COMMAND = "python benchmarks/methods_digits.py"
STAGES = ["stage1", "stage2", "stage3"]
RELUS = ["stage1.2", "stage2.1.2", "stage3.1.2"]  # their inputs are the pre-activations (BN outputs)
BATCH = 64  # the demo's batch size


def init_then_train(term: dict, steps: int) -> dict:
    """The AB/FSP recipe as schedules: the term alone for ``steps`` steps, then the task loss alone."""
    return {"task_weight": {"schedule": "step", "milestones": [steps], "values": [0.0, 1.0]},
            "terms": [{**term, "weight": {"schedule": "step", "milestones": [steps], "values": [term["weight"], 0.0]}}]}


def variants(steps_per_epoch: int, init_epochs: int) -> dict[str, tuple[str, dict | str | None]]:
    """Name -> (term kind shown in the table, config). Options not written are the term's paper defaults.

    AB and FSP (names starting with "init:") get ``init_epochs`` more epochs: their initialization phase
    comes before the usual training in the papers, and it uses no labels.
    """
    init = init_epochs * steps_per_epoch
    with_ce = lambda *terms: {"task_weight": 1.0, "terms": list(terms)}  # noqa: E731
    return {
        "student alone": ("", None),
        "KD (T = 4)": ("kd", KD_CONFIG),
        "logits L2": ("logits_l2", {"task_weight": 0.5, "terms": [{"kind": "logits_l2", "weight": 0.5}]}),
        "DKD (α 1, β 8, T 4)": ("dkd", with_ce({"kind": "dkd", "warmup": steps_per_epoch})),
        "weights (stage2, stage3 convs)": ("weights", with_ce({"kind": "weights", "student": [
            "stage2.1.0.weight", "stage3.1.0.weight"], "teacher": ["stage2.1.0.weight", "stage3.1.0.weight"]})),
        "FitNets (stage2)": ("fitnets", with_ce({"kind": "fitnets", "student": "stage2", "teacher": "stage2"})),
        "NST / MMD polynomial (stage3)": ("mmd", with_ce({"kind": "mmd", "weight": 25, "student": "stage3",
                                                           "teacher": "stage3"})),
        "NST / MMD linear (stage3)": ("mmd", with_ce({"kind": "mmd", "weight": 25, "kernel": "linear",
                                                       "student": "stage3", "teacher": "stage3"})),
        "NST / MMD gaussian (stage3)": ("mmd", with_ce({"kind": "mmd", "weight": 25, "kernel": "gaussian",
                                                         "student": "stage3", "teacher": "stage3"})),
        "FT (stage3, β 500)": ("ft", with_ce({"kind": "ft", "student": "stage3", "teacher": "stage3",
                                               "paraphraser_steps": init})),
        "gradient AT (input, β 1)": ("grad_at", with_ce({"kind": "grad_at"})),
        "AT (3 stages, β 1000)": ("at", with_ce({"kind": "at", "student": STAGES, "teacher": STAGES})),
        "init: AB, then CE": ("ab", init_then_train({"kind": "ab", "weight": 3e-3, "student": RELUS,
                                                    "teacher": RELUS}, init)),
        "init: FSP, then CE": ("fsp", init_then_train({"kind": "fsp", "weight": 0.01,
                                                      "student": [["stage1", "stage2"], ["stage2", "stage3"]],
                                                      "teacher": [["stage1", "stage2"], ["stage2", "stage3"]]}, init)),
        "RKD (pool, w_d 25, w_a 50)": ("rkd", with_ce({"kind": "rkd", "student": "pool", "teacher": "pool"})),
        "SP (stage3, γ 3000)": ("sp", with_ce({"kind": "sp", "student": "stage3", "teacher": "stage3"})),
        "PKT (pool)": ("pkt", with_ce({"kind": "pkt", "student": "pool", "teacher": "pool"})),
    }


def run_seed(seed: int, epochs: int, init_epochs: int, log) -> tuple[dict[str, float], float]:
    x, y, x_test, y_test = digits_tensors(seed)
    torch.manual_seed(seed)
    teacher = train(teacher_cnn(), x, y, epochs=epochs, seed=seed)
    torch.manual_seed(1000 + seed)  # the demo's initial student for this seed
    student0 = student_cnn()
    steps_per_epoch = -(-len(y) // BATCH)
    results = {}
    for name, (_, config) in variants(steps_per_epoch, init_epochs).items():
        torch.manual_seed(5000 + seed)  # connectors and heads drawn alike whatever ran before
        if config is not None:
            results[f"{name} (gradient ratio)"] = first_step_gradient_ratio(student0, teacher, config, x, y)
        torch.manual_seed(5000 + seed)
        extra = init_epochs if name.startswith("init:") else 0
        student = train(copy.deepcopy(student0), x, y, teacher=teacher if config else None, config=config,
                        epochs=epochs + extra, seed=seed)
        results[name] = accuracy(student, x_test, y_test)
        results[f"{name} (train)"] = accuracy(student, x, y)
        log(f"seed {seed}: {name}: {100 * results[name]:.2f}")
    return results, accuracy(teacher, x_test, y_test)


def first_step_gradient_ratio(student0: torch.nn.Module, teacher: torch.nn.Module, config: dict | str,
                              x: torch.Tensor, y: torch.Tensor) -> float:
    """‖∇ terms‖ / ‖∇ cross-entropy‖ on the student's weights, at its initialization, on the first batch.

    How strongly the terms pull compared with the task: a diagnostic, not a result.
    """
    student = copy.deepcopy(student0).train()
    config = yaml.safe_load(config) if isinstance(config, str) else config
    images, labels = x[:BATCH], y[:BATCH]
    weights = [p for p in student.parameters() if p.dim() > 1]
    with kdhooks.Distiller(student, teacher, {**config, "task_weight": 0.0}, example_inputs=images[:2]) as kd:
        task = F.cross_entropy(student(images), labels)
        terms = kd(task, labels=labels)
        if not terms.requires_grad:
            return 0.0  # nothing from the terms at step 0 (FT's paraphraser phase)
        term_gradients = torch.autograd.grad(terms, weights, retain_graph=True, allow_unused=True)
    task_gradients = torch.autograd.grad(task, weights)
    norm = lambda gradients: torch.sqrt(sum((g ** 2).sum() for g in gradients if g is not None))  # noqa: E731
    return float(norm(term_gradients) / norm(task_gradients))


def size(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def grad_tap_cost() -> list[str]:
    """Step time and peak memory of a grad_at step against plain training and KD, one batch of 64."""
    x, y, _, _ = digits_tensors(0)
    x, y = x[:BATCH], y[:BATCH]
    teacher = teacher_cnn()
    configs = {"no distillation": None, "KD": KD_CONFIG, "gradient AT": {"terms": [{"kind": "grad_at"}]},
               "AT (3 stages)": {"terms": [{"kind": "at", "student": STAGES, "teacher": STAGES}]}}
    steps, students, distillers = {}, [], []
    for name, config in configs.items():
        student = student_cnn().train()
        kd = kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) if config else None
        optimizer = torch.optim.SGD([*student.parameters(), *(kd.parameters() if kd else [])], lr=0.01)

        def step(student=student, kd=kd, optimizer=optimizer) -> None:
            task = F.cross_entropy(student(x), y)
            loss = kd(task, labels=y) if kd else task
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        steps[name] = step
        students.append(student)
        distillers.append(kd)
    medians = interleaved_medians(steps, repeats=40, warmup=5)
    peaks = {name: peak_bytes(step) for name, step in steps.items()}
    for kd in distillers:
        if kd is not None:
            kd.close()
    base = medians["no distillation"]
    lines = ["| step | time (ms) | × no distillation | × KD | peak memory (MB) |", "|---|---|---|---|---|"]
    for name in configs:
        lines.append(f"| {name} | {1000 * medians[name]:.1f} | {medians[name] / base:.2f} | "
                     f"{medians[name] / medians['KD']:.2f} | {peaks[name] / 2**20:.1f} |")
    lines += ["", f"A gradient-AT step takes {medians['gradient AT'] / medians['KD']:.1f}× the time of a KD step and "
              f"{peaks['gradient AT'] / peaks['KD']:.1f}× its peak memory: both models run with autograd on, "
              "and the student's backward is about doubled. A KD step already costs several plain steps here "
              f"because the teacher has {size(teacher_cnn()) / size(student_cnn()):.0f} times the student's parameters."]
    return lines


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread(values):.2f}"


def verdict(delta: list[float]) -> str:
    """Paired over seeds: above (below) the student alone on every seed and by half a point on average."""
    if all(d > 0 for d in delta) and statistics.mean(delta) >= 0.5:
        return "beats the student alone"
    if all(d < 0 for d in delta) and statistics.mean(delta) <= -0.5:
        return "below the student alone"
    return "within the noise"


# what we think explains a method that does not beat the student here, next to the measured numbers
REASONS = {
    "kd": "soft targets are all the teacher adds over the labels here, and the room above the student alone "
          "(see above) is about as large as the spread over seeds",
    "logits_l2": "as for KD; matching raw logits also asks the student to copy their scale, which KD's "
                 "temperature-softened probabilities do not",
    "dkd": "as for KD; β = 8 weighs the non-target classes as for CIFAR-100's 100 classes, digits has 10",
    "weights": "the learned maps absorb most of the difference between the two weights, so the term hardly "
               "constrains the student (see its pull)",
    "fitnets": "a 1x1 regressor from 8 to 16 channels makes the hint easy to meet without changing what the "
               "student computes; FitNets' gain in the paper is for deep, thin students that are hard to optimize",
    "mmd": "stage3 is a 2x2 map: each channel's selectivity is a vector of 4 positions, so NST matches almost no "
           "spatial pattern, and at λ/2 = 25 the term pulls far harder than the task; the bounded gaussian "
           "kernel pulls least and hurts least",
    "ft": "FT does not pull at the start (its paraphraser trains first); afterwards the factor comes from stage3, "
          "a 2x2 map whose channels already feed the same 10 classes as the teacher's, which leaves little "
          "structure to transfer",
    "grad_at": "the term does move the student's input gradients toward the teacher's "
               "(tests/test_methods_gradients.py), but on 8x8 digits where the loss is sensitive says little the "
               "labels do not; the paper too found gradient-based transfer weaker than activation-based",
    "at": "β = 1000 is the paper's constant for a mean over each map's positions, and these maps have 64, 16 and 4 "
          "positions (CIFAR's: 1024, 256, 64), so every position weighs 16 to 250 times more; the first steps' "
          "large AT gradient inflates the convolution weights ahead of BatchNorm, which shrinks their effective "
          "learning rate, and the cross-entropy barely falls afterwards",
    "ab": "the initialization transfers the teacher's on/off pattern without labels, so the classifier starts "
          "from chance at the switch, and the paper reports AB's gain for students that train poorly from "
          "scratch, while this one fits its training set alone",
    "fsp": "as for AB: FSP's initialization speeds up optimization, and this student already optimizes well",
    "rkd": "w_d = 25 and w_a = 50, set for the paper's metric-learning embeddings, make the term pull far harder "
           "than the cross-entropy on the pooled 16-d student embedding, and matching the 128-d teacher's "
           "distances and angles there costs the student its fit to the training set",
    "sp": "γ = 3000 makes the term pull far harder than the cross-entropy on a 16-channel 2x2 stage3; the student "
          "pays for matching the teacher's batch similarities with its fit to the training set",
    "pkt": "with the paper's weight 1 the term pulls little against the cross-entropy (see its pull)",
}


def why(column, base: list[float], teachers: list[float], kinds: dict, test_images: int) -> list[str]:
    """One line per method that does not beat the student alone: the measured numbers and our reading of them."""
    base_train = 100 * statistics.mean(column("student alone (train)"))
    gap = 100 * (statistics.mean(teachers) - statistics.mean(base))
    lines = [
        "### Reading the table",
        "",
        f"The student alone already fits {base_train:.1f}% of the training set and the teacher is only {gap:.1f} "
        f"points above it on the test set: that is all any transfer can win here, and {len(base)} seeds of "
        f"{test_images} test images resolve about a point. Methods that do not beat the student alone here:",
        "",
    ]
    for name, (kind, config) in kinds.items():
        if config is None:
            continue
        delta = [100 * (a - b) for a, b in zip(column(name), base)]
        if verdict(delta) == "beats the student alone":
            continue
        train_accuracy = 100 * statistics.mean(column(f"{name} (train)"))
        pull = statistics.mean(column(f"{name} (gradient ratio)"))
        measured = f"Δ {statistics.mean(delta):+.2f}, train {train_accuracy:.1f}%, pull {pull:.2g}"
        if train_accuracy < base_train - 1:
            measured += f": it keeps the student from fitting the training set ({base_train:.1f}% alone)"
        lines.append(f"- {name} ({measured}). We think {REASONS[kind]}.")
    return lines


def table(results: list[dict[str, float]], teachers: list[float], epochs: int, init_epochs: int,
          steps_per_epoch: int, minutes: float, cost: list[str]) -> str:
    seeds = len(results)
    column = lambda name: [r[name] for r in results]  # noqa: E731
    base = column("student alone")
    kinds = variants(steps_per_epoch, init_epochs)
    lines = [
        "## What to match: logits, weights, features, gradients, attention, sparsity, relations",
        "",
        "Plugins `logits` (`kd`, `logits_l2`, `dkd`), `weights` (`weights`), `features` (`fitnets`, `mmd`, `ft`), "
        "`gradients` (`grad_at`), `attention` (`at`), `sparsity` (`ab`), `relations` (`fsp`, `rkd`, `sp`, `pkt`). "
        "Each term's formula is also a plain function in its module (`at_loss`, `dkd_loss`, `rkd_loss`, ...).",
        "",
        "### Results on digits",
        "",
        f"`{COMMAND}` — {seeds} seeds (data split, teacher, initial student and batch order per seed), "
        f"{epochs} epochs each, the demo's loop and pair (teacher {mean_std(teachers)}); "
        f"{minutes:.1f} min on one CPU thread. Test accuracy (%), mean ± std over seeds; Δ is the mean of the "
        "per-seed differences to the student alone, wins the seeds where the method is above it; train is the "
        "accuracy on the training set; pull is ‖∇ terms‖ / ‖∇ cross-entropy‖ on the student's weights at its "
        "initialization (first batch), how hard the terms pull against the task. Terms run at "
        "their papers' defaults added to the cross-entropy; logit terms share the demo's 0.5/0.5 split; "
        f"AB and FSP initialize the student alone for {init_epochs} epochs (task weight 0) and then give way to "
        f"the cross-entropy for the usual {epochs} (a step schedule on both weights, below); FT's paraphraser "
        f"trains for the first {init_epochs} epochs while the student trains on the cross-entropy. NST's weight is "
        "λ/2 = 25; AB's 3·10⁻³ is the authors' code's scale (their loss divided by 1000/3); FSP's 10⁻² is about "
        "RepDistiller's 50 on its mean over matrix entries (at weight 1 our sum over entries, about 10³ at the "
        "start, diverges within a few steps at the demo's learning rate).",
        "",
        "| method | term | accuracy | Δ vs student alone | wins | Δ vs KD | train | pull | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (kind, _) in kinds.items():
        values = column(name)
        train_accuracy = f"{100 * statistics.mean(column(f'{name} (train)')):.1f}"
        if name == "student alone":
            lines.append(f"| {name} | | {mean_std(values)} | | | | {train_accuracy} | | |")
            continue
        delta = [100 * (a - b) for a, b in zip(values, base)]
        delta_kd = [100 * (a - b) for a, b in zip(values, column("KD (T = 4)"))]
        pull = f"{statistics.mean(column(f'{name} (gradient ratio)')):.2g}"
        lines.append(f"| {name} | `{kind}` | {mean_std(values)} | {statistics.mean(delta):+.2f} "
                     f"| {sum(d > 0 for d in delta)}/{seeds} | {statistics.mean(delta_kd):+.2f} | {train_accuracy} "
                     f"| {pull} | {verdict(delta)} |")
    lines += [
        "",
        "Verdict, paired over seeds: above (below) the student alone on every seed and by at least half a point "
        f"on average, else within the noise: the student alone varies by {100 * spread(base):.2f} points over "
        f"seeds and one test image is {100 / len(digits_tensors(0)[3]):.2f} points.",
        "",
        "The AB recipe as it runs here, schedules only (FSP's is the same with its term):",
        "",
        "```yaml",
        yaml.safe_dump(init_then_train({"kind": "ab", "weight": 3e-3, "student": list(RELUS), "teacher": list(RELUS)},
                                       init_epochs * steps_per_epoch), sort_keys=False, default_flow_style=None).strip(),
        "```",
        "",
        *why(column, base, teachers, kinds, len(digits_tensors(0)[3])),
        "",
        "### The cost of gradient taps",
        "",
        "A `grad` tap on the student differentiates the task loss with `create_graph=True`, so the backward pass "
        "runs through the first-order gradient graph as well (double backpropagation); a `grad` tap on the "
        "teacher runs the teacher with autograd on (activations kept, parameters still frozen) and adds a "
        "teacher backward. One training step of the digits student (batch 64, one CPU thread, median of 40 "
        "interleaved steps; peak memory from the profiler's allocation timeline):",
        "",
        *cost,
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--init-epochs", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {line}", flush=True)

    runs = [run_seed(seed, args.epochs, args.init_epochs, log) for seed in range(args.seeds)]
    minutes = (time.perf_counter() - start) / 60
    cost = grad_tap_cost()
    steps_per_epoch = -(-len(digits_tensors(0)[1]) // BATCH)
    text = table([r for r, _ in runs], [t for _, t in runs], args.epochs, args.init_epochs, steps_per_epoch,
                 minutes, cost)
    print(text)
    if not args.no_write:
        path = Path(__file__).resolve().parent.parent / "docs" / "methods.md"
        write_section(path, "methods-digits", text)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
