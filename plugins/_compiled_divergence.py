"""lm_kd's divergence passes as two compiled kernels per block of rows: row statistics, then the gradient.

Eager PyTorch runs each of the dozen passes of ``_divergence_and_gradient_``
(in ``_token_divergence``) as its own kernel over the block. Under
``torch.compile`` (inductor: C++/OpenMP on the CPU, Triton on the GPU) the same
closed forms become two: one that reads the rows and reduces them (the two
log-normalisers, the divergence, Σ q·g), one that writes ∂D/∂z. With z = s·a,
t·b (a, b the inverse temperature, or 1 for logits already divided),
q = softmax(z), p = softmax(t):

    forward KL   D = Σ p log(p/q)                          ∂D/∂z = q − p
    reverse KL   D = Σ q log(q/p)                          ∂D/∂z = q ⊙ (log(q/p) − D)
    JSD(β)       D = β Σ p log(p/m) + (1−β) Σ q log(q/m)   ∂D/∂z = q ⊙ (g − Σ q g),  g = (1−β) log(q/m)
    TV           D = ½ Σ |q − p|                           ∂D/∂z = q ⊙ (g − Σ q g),  g = ½ sign(q − p)

The gradient kernel writes ``out`` (weighted per row); ``out`` may be the
student's own buffer, which it then overwrites in place. Where ``out`` is
another buffer (from logits), a ``fused`` kernel does both; for the two KLs
it is two compiled parts, the rows' max and Σ exp, then the rest. Where compilation is
unavailable or fails, ``compiled_kernels`` says so once and the eager passes run.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch

from ._token_divergence import LOG_FLOOR


class Kernels(NamedTuple):
    """A divergence's compiled kernels: ``statistics`` → (D, Σ q g, normalisers); ``gradient`` → ``out``;
    ``fused``: both in one kernel, → D with the gradient in ``out`` (which must not be the student's rows;
    None where one graph would hold a block-sized temporary)."""

    statistics: Callable
    gradient: Callable
    fused: Callable | None


def _scaled_rows(student: torch.Tensor, teacher: torch.Tensor, kept: torch.Tensor | None, scalars: torch.Tensor):
    """The kept rows as float32, each side times its scale."""
    if kept is not None:                                   # a gather inductor folds into its loads: no copy
        student, teacher = student[kept], teacher[kept]
    return student.float() * scalars[0], teacher.float() * scalars[1]


def _maxima_and_sums(z: torch.Tensor, t: torch.Tensor):
    """Each row's max and Σ exp(row − max), for both sides."""
    z_max, t_max = z.amax(-1, keepdim=True), t.amax(-1, keepdim=True)
    return z_max, torch.exp(z - z_max).sum(-1, keepdim=True), t_max, torch.exp(t - t_max).sum(-1, keepdim=True)


def _row_sums(student, teacher, kept, scalars):
    """The normalisers before their logs (taken outside the compiled kernel: see _split_at_logs)."""
    return _maxima_and_sums(*_scaled_rows(student, teacher, kept, scalars))


def _log_probs(student: torch.Tensor, teacher: torch.Tensor, kept: torch.Tensor | None, scalars: torch.Tensor,
               normalisers: tuple[torch.Tensor, ...] | None = None):
    """Floored log q and log p of the kept, scaled float32 rows, and their normalisers (computed when not given).

    As ATen's log_softmax: (z − max) − log Σ exp(z − max), never z − logsumexp(z),
    whose rounded max + log Σ puts an error of a unit in the last place of the
    larger into every log-probability alike: a small KL would be off by 1e-3.
    """
    z, t = _scaled_rows(student, teacher, kept, scalars)
    if normalisers is None:
        z_max, z_sum, t_max, t_sum = _maxima_and_sums(z, t)
        normalisers = (z_max, torch.log(z_sum), t_max, torch.log(t_sum))
    z_max, z_log_sum, t_max, t_log_sum = normalisers
    log_q = ((z - z_max) - z_log_sum).clamp_min(LOG_FLOOR)
    log_p = ((t - t_max) - t_log_sum).clamp_min(LOG_FLOOR)
    return log_q, log_p, normalisers


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp()).clamp_min(LOG_FLOOR)


def _write(out: torch.Tensor, kept: torch.Tensor | None, dropped: torch.Tensor | None, gradient: torch.Tensor,
           row_weights: torch.Tensor) -> None:
    """out ← the weighted gradient; with ``kept``, into those rows, and 0 into the ``dropped`` ones."""
    if kept is None:
        # a row weighted 0 gets 0, not 0 · nan: padding's logits may be nan or -inf (a fully masked attention row)
        out.copy_(torch.where(row_weights[:, None] != 0, gradient * row_weights[:, None], 0.0))
        return
    out[kept] = gradient * row_weights[kept][:, None]
    out[dropped] = 0


# scalars = (student scale, teacher scale, β) as a tensor: floats would be compiled in, one graph per temperature


def _forward_kl_statistics(student, teacher, kept, scalars):
    log_q, log_p, normalisers = _log_probs(student, teacher, kept, scalars)
    value = (log_p.exp() * (log_p - log_q)).sum(-1)
    return value, value, normalisers


def _forward_kl_gradient(student, teacher, kept, dropped, scalars, normalisers, q_g, row_weights, out):
    log_q, log_p, _ = _log_probs(student, teacher, kept, scalars, normalisers)
    _write(out, kept, dropped, log_q.exp() - log_p.exp(), row_weights)


def _reverse_kl_statistics(student, teacher, kept, scalars):
    log_q, log_p, normalisers = _log_probs(student, teacher, kept, scalars)
    value = (log_q.exp() * (log_q - log_p)).sum(-1)
    return value, value, normalisers


def _reverse_kl_gradient(student, teacher, kept, dropped, scalars, normalisers, kl, row_weights, out):
    log_q, log_p, _ = _log_probs(student, teacher, kept, scalars, normalisers)
    _write(out, kept, dropped, log_q.exp() * (log_q - log_p - kl[:, None]), row_weights)


def _jsd_statistics(student, teacher, kept, scalars):
    log_q, log_p, normalisers = _log_probs(student, teacher, kept, scalars)
    beta = scalars[2]
    log_m = _log_mixture(log_p, log_q, beta)
    q_g = (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + q_g, q_g, normalisers


def _jsd_gradient(student, teacher, kept, dropped, scalars, normalisers, q_g, row_weights, out):
    log_q, log_p, _ = _log_probs(student, teacher, kept, scalars, normalisers)
    g = (1 - scalars[2]) * (log_q - _log_mixture(log_p, log_q, scalars[2]))
    _write(out, kept, dropped, log_q.exp() * (g - q_g[:, None]), row_weights)


def _tv_statistics(student, teacher, kept, scalars):
    log_q, log_p, normalisers = _log_probs(student, teacher, kept, scalars)
    q, p = log_q.exp(), log_p.exp()
    return 0.5 * (q - p).abs().sum(-1), 0.5 * (q * torch.sign(q - p)).sum(-1), normalisers


def _tv_gradient(student, teacher, kept, dropped, scalars, normalisers, q_g, row_weights, out):
    log_q, log_p, _ = _log_probs(student, teacher, kept, scalars, normalisers)
    q = log_q.exp()
    _write(out, kept, dropped, q * (0.5 * torch.sign(q - log_p.exp()) - q_g[:, None]), row_weights)


# both kernels in one graph, for an ``out`` that is not the student's rows: inductor then writes each row's
# gradient while the row is still in cache from its last reduction


def _jsd_fused(student, teacher, kept, dropped, scalars, row_weights, out):
    value, q_g, normalisers = _jsd_statistics(student, teacher, kept, scalars)
    _jsd_gradient(student, teacher, kept, dropped, scalars, normalisers, q_g, row_weights, out)
    return value


# The KLs in one graph still make several passes over a block: the per-row log of Σ exp, a pointwise node over
# rows, keeps inductor's CPU code from fusing the row loops. Split at that log, each KL's second kernel is one
# loop per row (reduce, then write ∂D/∂z, the row still in cache). Measured from logits, 4096 tokens × 32000,
# time against compiled naive: reverse KL 0.59x (0.89x in one graph), forward KL 0.68x (0.99x). JSD so split
# stores block-sized temporaries (3x the memory) and TV runs 1.7x slower: they keep one graph, or two kernels.
# The second kernels compute q (or p) once for the value and the gradient: composed of the statistics and
# gradient kernels instead, they were measured 0.68x and 0.83x.


def _reverse_kl_from_normalisers(student, teacher, kept, dropped, scalars, normalisers, row_weights, out):
    log_q, log_p, _ = _log_probs(student, teacher, kept, scalars, normalisers)
    q = log_q.exp()
    kl = (q * (log_q - log_p)).sum(-1)
    _write(out, kept, dropped, q * (log_q - log_p - kl[:, None]), row_weights)
    return kl


def _forward_kl_from_normalisers(student, teacher, kept, dropped, scalars, normalisers, row_weights, out):
    log_q, log_p, _ = _log_probs(student, teacher, kept, scalars, normalisers)
    p = log_p.exp()
    _write(out, kept, dropped, log_q.exp() - p, row_weights)
    return (p * (log_p - log_q)).sum(-1)


def _split_at_logs(row_sums: Callable, divergence: Callable) -> Callable:
    """A fused kernel in two compiled parts, the two per-row logs taken eagerly between them."""

    def fused(student, teacher, kept, dropped, scalars, row_weights, out):
        z_max, z_sum, t_max, t_sum = row_sums(student, teacher, kept, scalars)
        normalisers = (z_max, z_sum.log_(), t_max, t_sum.log_())
        mark_rows_dynamic(*normalisers)
        return divergence(student, teacher, kept, dropped, scalars, normalisers, row_weights, out)

    return fused


# fused: one graph, or (row sums, the rest given the normalisers) split at the logs
_SOURCES = {"forward_kl": (_forward_kl_statistics, _forward_kl_gradient, (_row_sums, _forward_kl_from_normalisers)),
            "reverse_kl": (_reverse_kl_statistics, _reverse_kl_gradient, (_row_sums, _reverse_kl_from_normalisers)),
            "jsd": (_jsd_statistics, _jsd_gradient, _jsd_fused),
            # TV's q is read four times in one graph: inductor would store it, a block-sized temporary
            "tv": (_tv_statistics, _tv_gradient, None)}
_compiled: dict[str, Kernels] = {}
RECOMPILE_LIMIT = 64
# why compiled kernels are not used in this process, once they failed (the eager passes run instead)
_unavailable: str | None = None


def compiled_kernels(divergence: str) -> Kernels | None:
    """The divergence's compiled kernels, or None where torch.compile cannot serve (eager passes then run).

    Each kernel is its own function, so each keeps its own compilation cache:
    a run uses one divergence, one dtype and row counts that
    ``maybe_mark_dynamic`` makes one compilation (a 1-row block, and
    gathered rows or not, are others).
    """
    if _unavailable is not None or torch.compiler.is_compiling() or not torch._dynamo.is_dynamo_supported():
        return None
    if divergence not in _compiled:
        statistics, gradient, fused = _SOURCES[divergence]
        if isinstance(fused, tuple):
            fused = _split_at_logs(*(torch.compile(part, fullgraph=True) for part in fused))
        elif fused is not None:
            fused = torch.compile(fused, fullgraph=True)
        _compiled[divergence] = Kernels(torch.compile(statistics, fullgraph=True),
                                        torch.compile(gradient, fullgraph=True), fused)
    return _compiled[divergence]


def room_for_variants():
    """A context giving each kernel room for its variants (dtypes, gathered rows or not, in place or not, a
    1-row block): past dynamo's default limit of 8 per function a fullgraph kernel raises instead of compiling.
    Entered once per loss, not per kernel call: a config patch costs about a millisecond."""
    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)


def give_up_compiling(error: Exception) -> None:
    """Use the eager passes from now on, and say once why (the result is the same, only slower)."""
    global _unavailable
    _unavailable = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    warnings.warn(f"lm_kd: torch.compile could not build its fused kernels ({_unavailable}); the eager kernels run "
                  "instead (the same values, slower). Set `compile: false` on the lm_kd term to skip the attempt.",
                  RuntimeWarning, stacklevel=3)


def mark_rows_dynamic(*tensors: torch.Tensor) -> None:
    """The row count varies (the last block, each batch's tokens): one compilation serves every count."""
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
