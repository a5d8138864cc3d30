"""lm_kd vs a naive full-softmax loss: peak memory of loss + backward, step time, same value.

    python benchmarks/lm_kd_memory.py            # writes its table into docs/benchmarks.md

2048 tokens, vocabulary 32000, hidden size 256 (the defaults). Two ways in:
from the output layer (``LinearHead``: hidden states and the LM head, logits
formed a chunk at a time) and from logits already computed by the model (the
memory above those logits). The naive loss is the hand-written
``log_softmax`` / ``kl_div`` over the full (tokens × vocab) tensors.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kdhooks.plugins.nlp import LinearHead, lm_kd_loss

sys.path.insert(0, str(Path(__file__).parent))
from _measure import interleaved_medians, peak_bytes, write_section  # noqa: E402


def naive_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                     divergence: str, temperature: float, beta: float = 0.5) -> torch.Tensor:
    """The textbook loss on full tensors (as TRL's GKD writes it)."""
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
    return per_token[mask].mean() * temperature**2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=None, help="lm_kd's chunk_size (default: its default)")
    parser.add_argument("--divergences", nargs="+", default=["forward_kl", "reverse_kl", "jsd", "tv"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chunk = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    temperature = 2.0

    g = torch.Generator().manual_seed(0)
    n, v, h = args.tokens, args.vocab, args.hidden
    student_hidden = (torch.randn(n, h, generator=g) / h**0.5).to(device).requires_grad_()
    student_head = (torch.randn(v, h, generator=g)).to(device).requires_grad_()
    teacher_hidden = (torch.randn(n, h, generator=g) / h**0.5).to(device)
    teacher_head = torch.randn(v, h, generator=g).to(device)
    mask = (torch.rand(n, generator=g) > 0.1).to(device)  # ~10% prompt/padding positions
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_head.T
        fixed_student_logits = student_hidden @ student_head.T
    student_logits = fixed_student_logits.clone().requires_grad_()

    rows = []
    for divergence in args.divergences:
        def naive_head() -> torch.Tensor:
            with torch.no_grad():
                teacher = teacher_hidden @ teacher_head.T
            loss = naive_divergence(student_hidden @ student_head.T, teacher, mask, divergence, temperature)
            loss.backward()
            return loss

        def chunked_head() -> torch.Tensor:
            loss = lm_kd_loss(LinearHead(student_hidden, student_head), LinearHead(teacher_hidden, teacher_head),
                              mask=mask, divergence=divergence, temperature=temperature, **chunk)
            loss.backward()
            return loss

        def naive_logits() -> torch.Tensor:
            loss = naive_divergence(student_logits, teacher_logits, mask, divergence, temperature)
            loss.backward()
            return loss

        def chunked_logits() -> torch.Tensor:
            loss = lm_kd_loss(student_logits, teacher_logits, mask=mask, divergence=divergence,
                              temperature=temperature, **chunk)
            loss.backward()
            return loss

        for way, naive, chunked, leaves in (("output layer", naive_head, chunked_head, (student_hidden, student_head)),
                                            ("logits", naive_logits, chunked_logits, (student_logits,))):
            values, grads = [], []
            for step in (naive, chunked):
                for leaf in leaves:
                    leaf.grad = None
                values.append(float(step()))
                grads.append([leaf.grad.clone() for leaf in leaves])
            gradient_error = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                                 for a, b in zip(grads[1], grads[0]))

            def clearing(step):
                def run() -> None:
                    for leaf in leaves:
                        leaf.grad = None
                    step()
                return run
            peaks = {name: peak_bytes(clearing(step)) for name, step in (("naive", naive), ("lm_kd", chunked))}
            times = interleaved_medians({"naive": clearing(naive), "lm_kd": clearing(chunked)},
                                        repeats=args.repeats, warmup=1)
            for leaf in leaves:
                leaf.grad = None
            rows.append((divergence, way, peaks["naive"] / 2**20, peaks["lm_kd"] / 2**20,
                         peaks["lm_kd"] / peaks["naive"], abs(values[1] - values[0]) / abs(values[0]),
                         gradient_error, times["lm_kd"] / times["naive"]))
            print(f"{divergence:10s} {way:12s} naive {rows[-1][2]:8.0f} MiB  lm_kd {rows[-1][3]:7.0f} MiB  "
                  f"ratio {rows[-1][4]:.3f}  value rel. diff {rows[-1][5]:.1e}  grad rel. diff {rows[-1][6]:.1e}  "
                  f"time ratio {rows[-1][7]:.2f}", flush=True)

    from kdhooks.plugins.nlp import LMKD
    chunk_size = args.chunk_size or LMKD.__dataclass_fields__["chunk_size"].default
    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))")
    lines = [
        "## lm_kd: peak memory of loss + backward vs a naive full softmax",
        "",
        f"`python benchmarks/lm_kd_memory.py` — {n} tokens, vocabulary {v}, hidden {h}, chunk_size {chunk_size}, "
        f"temperature {temperature}, ~10% of tokens masked; {where}, torch {torch.__version__}. Peak bytes allocated "
        "while the loss and its backward run, above what existed before (the hidden states and output layers, or "
        "the logits). *Output layer*: `lm_kd` given `LinearHead(hidden, lm_head.weight)` (`student_head: lm_head` in "
        "a config) vs `log_softmax(hidden @ W.T)`; *logits*: both given the model's logits. Value and gradient: "
        "relative difference to the naive loss; time: median step time ratio lm_kd / naive "
        f"({args.repeats} interleaved repeats).",
        "",
        "| divergence | from | naive peak (MiB) | lm_kd peak (MiB) | memory ratio | value rel. diff "
        "| grad rel. diff | time ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {d} | {w} | {a:.0f} | {b:.0f} | **{r:.3f}** | {e:.1e} | {ge:.1e} | {t:.2f} |"
          for d, w, a, b, r, e, ge, t in rows],
        "",
        "From logits, lm_kd's peak is mostly the gradient of the logits themselves (tokens × vocab, needed by any "
        "backward); from the output layer, nothing of that size exists.",
    ]
    if not args.no_write:
        write_section(Path(__file__).parent.parent / "docs" / "benchmarks.md", "lm_kd_memory", "\n".join(lines))
        print("written to docs/benchmarks.md")


if __name__ == "__main__":
    main()
