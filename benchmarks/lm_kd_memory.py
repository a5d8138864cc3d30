"""lm_kd vs the naive loss, its torch.compile'd form and Liger-Kernel's fused linear loss: memory, time, agreement.

    python benchmarks/lm_kd_memory.py            # writes its table into docs/benchmarks.md

Vocabulary 32000, hidden size 256, 2048 and 4096 tokens (the defaults). Two
ways in: from the output layer (the hidden states and the LM head; lm_kd forms
the logits a chunk at a time) and from logits already computed by the model
(the memory above those logits). The naive loss is the hand-written
``log_softmax`` / ``kl_div`` over the full (tokens × vocab) tensors (as TRL's
GKD writes it); "compiled" is that same function under ``torch.compile``;
Liger is ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (β = 0 and 1
are its forward and reverse KL; it has no TV and takes only the output layer),
when it imports (``pip install liger-kernel``: no dependency of kdhooks, so
the table says so where it is missing). The floor is what any loss + backward must hold: the input
gradients (hidden states and weight, or the logits) and one chunk's logits and
their gradient.
"""
from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kdhooks.plugins.nlp import LinearHead, lm_kd_loss

sys.path.insert(0, str(Path(__file__).parent))
from _measure import interleaved_medians, peak_bytes, write_section  # noqa: E402

BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}    # Liger's JSD(β) at the ends is the KL


def naive_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                     divergence: str, temperature: float, beta: float = 0.5) -> torch.Tensor:
    """The textbook loss on full tensors (as TRL's GKD writes it), mean over kept tokens × T²."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "forward_kl":
        per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif divergence == "reverse_kl":
        per_token = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    elif divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_q + torch.log(torch.tensor(1 - beta)),
                                             log_p + torch.log(torch.tensor(beta))]), dim=0)
        per_token = (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True)
                     + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True)).sum(-1)
    else:
        per_token = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    kept = mask.float()    # a weighted mean, not per_token[mask]: no data-dependent shape for torch.compile
    return (per_token * kept).sum() / kept.sum() * temperature**2


def naive_from_head(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_head: torch.Tensor, mask: torch.Tensor, divergence: str, temperature: float
                    ) -> torch.Tensor:
    with torch.no_grad():
        teacher = teacher_hidden @ teacher_head.T
    return naive_divergence(student_hidden @ student_head.T, teacher, mask, divergence, temperature)


def liger_loss(temperature: float, beta: float, chunk_size: int) -> Callable | str:
    """Liger-Kernel's fused linear JSD loss (its chunked path under torch.compile, its default), or why not."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as error:  # noqa: BLE001 — any import failure means "no Liger column", with the reason
        return f"liger_kernel does not import ({type(error).__name__}: {error})"
    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=temperature**2, beta=beta,
                                   temperature=temperature, compiled=True, chunk_size=chunk_size)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure_row(steps: dict[str, Callable[[], torch.Tensor]], leaves: tuple[torch.Tensor, ...],
                repeats: int) -> dict[str, dict]:
    """Per step: value and gradients (first call, also the warm-up and compilation), peak bytes with the
    gradients cleared before the window opens, and the median time of interleaved calls."""
    def clear() -> None:
        for leaf in leaves:
            leaf.grad = None

    def step_then_backward(step: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            step().backward()
        return run

    results = {}
    for name, step in list(steps.items()):
        clear()
        try:
            loss = step()
            loss.backward()
        except Exception as error:  # noqa: BLE001 — a peer that fails here is reported, not fatal
            print(f"  {name}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:120]})", flush=True)
            steps.pop(name)
            results[name] = {"skipped": f"{type(error).__name__}"}
            continue
        results[name] = {"value": float(loss.detach()), "grads": [leaf.grad.clone() for leaf in leaves]}
        clear()
        results[name]["peak"] = peak_bytes(step_then_backward(step))
    clear()

    def cleared(step: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            clear()
            step().backward()
        return run
    times = interleaved_medians({name: cleared(step) for name, step in steps.items()}, repeats=repeats, warmup=0)
    clear()
    naive = results["naive"]
    for name in steps:
        results[name]["time"] = times[name]
        results[name]["value_diff"] = abs(results[name]["value"] - naive["value"]) / abs(naive["value"])
        results[name]["grad_diff"] = max(relative_difference(a, b) for a, b in
                                         zip(results[name]["grads"], naive["grads"]))
    for name in steps:
        del results[name]["grads"]
    return results


def interpretation(rows: list[tuple]) -> str:
    """One sentence on what the table shows: lm_kd's peak against the floor, and against the best peer per row."""
    worst = max(r["lm_kd"]["peak"] / floor for _, _, _, floor, r in rows)
    parts = []
    for way in dict.fromkeys(way for _, _, way, _, _ in rows):
        ratios: dict[str, list[float]] = {"peak": [], "time": []}
        for _, _, row_way, _, results in rows:
            peers = [r for name, r in results.items() if name not in ("naive", "lm_kd") and "peak" in r]
            for key in ratios if row_way == way and peers else ():
                ratios[key].append(results["lm_kd"][key] / min(peer[key] for peer in peers))
        if ratios["peak"]:
            parts.append(f"from the {way} {min(ratios['peak']):.2f}–{max(ratios['peak']):.2f}× its peak and "
                         f"{min(ratios['time']):.2f}–{max(ratios['time']):.2f}× its time")
    return (f"lm_kd holds at most {worst:.2f}× the floor in every row; against the best peer of each row (below 1: "
            f"lm_kd does better) it takes {'; '.join(parts)}.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=None, help="lm_kd's chunk_size (default: its default)")
    parser.add_argument("--divergences", nargs="+", default=["forward_kl", "reverse_kl", "jsd", "tv"])
    parser.add_argument("--ways", nargs="+", default=["output layer", "logits"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd naive loss")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from kdhooks.plugins.nlp import LMKD
    chunk_size = args.chunk_size or LMKD.__dataclass_fields__["chunk_size"].default
    temperature = 2.0
    compiled_naive = None if args.no_compile else torch.compile(naive_divergence)
    compiled_head = None if args.no_compile else torch.compile(naive_from_head)
    notes: dict[str, str] = {}

    rows = []
    for n in args.tokens:
        g = torch.Generator().manual_seed(0)
        v, h = args.vocab, args.hidden
        student_hidden = (torch.randn(n, h, generator=g) / h**0.5).to(device).requires_grad_()
        student_head = (torch.randn(v, h, generator=g)).to(device).requires_grad_()
        teacher_hidden = (torch.randn(n, h, generator=g) / h**0.5).to(device)
        teacher_head = torch.randn(v, h, generator=g).to(device)
        mask = (torch.rand(n, generator=g) > 0.1).to(device)  # ~10% prompt/padding positions
        labels = torch.where(mask, 0, -100)                   # Liger reads the mask from ignore_index labels
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_head.T
            student_logits = (student_hidden @ student_head.T).requires_grad_()
        for divergence in args.divergences:
            head = (student_hidden, student_head, teacher_hidden, teacher_head, mask, divergence, temperature)
            logits = (student_logits, teacher_logits, mask, divergence, temperature)
            for way in args.ways:
                if way == "output layer":
                    leaves = (student_hidden, student_head)
                    steps = {"naive": lambda: naive_from_head(*head)}
                    if compiled_head is not None:
                        steps["compiled"] = lambda: compiled_head(*head)
                    liger = (liger_loss(temperature, BETA[divergence], chunk_size) if divergence in BETA
                             else "Liger has no TV")
                    if callable(liger):
                        steps["Liger"] = lambda: liger(student_hidden, student_head, teacher_hidden, teacher_head,
                                                       labels)
                    else:
                        notes.setdefault(liger, liger)
                    steps["lm_kd"] = lambda: lm_kd_loss(
                        LinearHead(student_hidden, student_head), LinearHead(teacher_hidden, teacher_head),
                        mask=mask, divergence=divergence, temperature=temperature, chunk_size=chunk_size)
                    floor = (student_hidden.numel() + student_head.numel() + 2 * chunk_size * v) * 4
                else:
                    leaves = (student_logits,)
                    steps = {"naive": lambda: naive_divergence(*logits)}
                    if compiled_naive is not None:
                        steps["compiled"] = lambda: compiled_naive(*logits)
                    steps["lm_kd"] = lambda: lm_kd_loss(student_logits, teacher_logits, mask=mask,
                                                        divergence=divergence, temperature=temperature,
                                                        chunk_size=chunk_size)
                    floor = (student_logits.numel() + 2 * chunk_size * v) * 4
                print(f"{n} tokens, {divergence}, from {way}:", flush=True)
                results = measure_row(steps, leaves, args.repeats)
                for name, result in results.items():
                    if "skipped" in result:
                        notes.setdefault(name, f"{name} skipped: {result['skipped']}")
                        continue
                    print(f"  {name:9s} peak {result['peak'] / 2**20:7.0f} MiB ({result['peak'] / floor:5.2f}× floor)"
                          f"  time {result['time']:6.2f} s ({result['time'] / results['naive']['time']:.2f}× naive)"
                          f"  value {result['value_diff']:.1e}  grad {result['grad_diff']:.1e}", flush=True)
                rows.append((n, divergence, way, floor, results))

    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))")
    names = ["naive", "compiled", "Liger", "lm_kd"]

    def memory(results: dict, name: str, floor: int) -> str:
        result = results.get(name, {})
        if "peak" not in result:
            return "—"
        text = f"{result['peak'] / 2**20:.0f} ({result['peak'] / floor:.2f}×)"
        return f"**{text}**" if name == "lm_kd" else text

    def speed(results: dict, name: str) -> str:
        result = results.get(name, {})
        if "time" not in result:
            return "—"
        text = f"{result['time'] / results['naive']['time']:.2f}"
        return f"**{text}**" if name == "lm_kd" else text

    def agreement(results: dict) -> str:
        peers = [r for name, r in results.items() if name != "naive" and "value_diff" in r]
        return (f"{max(r['value_diff'] for r in peers):.0e} / {max(r['grad_diff'] for r in peers):.0e}"
                if peers else "—")

    lines = [
        "## lm_kd vs the naive loss, torch.compile and Liger-Kernel: peak memory and time of loss + backward",
        "",
        f"`python benchmarks/lm_kd_memory.py` — vocabulary {args.vocab}, hidden {args.hidden}, chunk_size "
        f"{chunk_size} (Liger's too), temperature {temperature}, ~10% of tokens masked; {where}, torch "
        f"{torch.__version__}, on a machine shared with other jobs (time ratios are noisy). Peak: MiB allocated "
        "while the loss and its backward run, above what existed before (gradients cleared before the window "
        "opens), and in brackets as a multiple of the floor: the input gradients (hidden states + weight, or the "
        "logits) and one chunk's logits and their gradient. *Output layer*: given the hidden states and "
        "`lm_head.weight` (`student_head: lm_head` in a config) vs `log_softmax(hidden @ W.T)`; *logits*: given "
        "the model's logits. Naive: the textbook full-tensor loss; compiled: that function under "
        "`torch.compile`; Liger: `LigerFusedLinearJSDLoss` (β 0 / 1 / 0.5, its chunked torch path under "
        "`torch.compile`, its default; no TV, output layer only). Time: median step time / naive's "
        f"({args.repeats} interleaved repeats). Agreement: the largest relative difference of any of them to "
        "the naive loss, value / gradient.",
        "",
        "| tokens | divergence | from | floor (MiB) | naive peak | compiled peak | Liger peak | lm_kd peak "
        "| compiled time | Liger time | lm_kd time | value / grad diff |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {n} | {d} | {w} | {floor / 2**20:.0f} | " + " | ".join(memory(r, name, floor) for name in names)
          + " | " + " | ".join(speed(r, name) for name in names[1:]) + f" | {agreement(r)} |"
          for n, d, w, floor, r in rows],
        "",
        *[f"{note}." for note in notes.values()],
        "",
        interpretation(rows),
    ]
    if not args.no_write:
        write_section(Path(__file__).parent.parent / "docs" / "benchmarks.md", "lm_kd_memory", "\n".join(lines))
        print("written to docs/benchmarks.md")
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
