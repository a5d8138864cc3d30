"""Token-level divergences between a teacher's and a student's next-token distributions, and their eager passes.

The reference forms (``token_divergence``, ``divergence_of``,
``top_k_log_probs``) on full tensors, and the eager in-place passes that
``lm_kd_loss`` (``_fused_linear_divergence``) runs over a block of rows where
compiled kernels cannot serve: with z = s/T, q = softmax(z), p = softmax(t/T),
each writes ∂D/∂z in closed form over the student's block:

    forward KL   ∂D/∂z = q − p
    reverse KL   ∂D/∂z = q ⊙ (log q − log p − KL(q‖p))
    JSD(β)       ∂D/∂z = q ⊙ (g − Σ q g),  g = (1−β)·log(q/m),  m = βp + (1−β)q
    TV           ∂D/∂z = q ⊙ (g − Σ q g),  g = ½·sign(q − p)

and top-k through the teacher's k largest and a tail bucket.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


# log-probabilities are floored here: a zero probability then adds 0·(finite) to a sum, never nan
LOG_FLOOR = -1e30


class LinearHead(NamedTuple):
    """The final hidden states (..., D) and the output layer: logits = hidden · weightᵀ + bias."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def lm_token_mask(tokens: tuple[int, ...], labels: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None, causal: bool = True,
                  ignore_index: int = -100, device: torch.device | None = None) -> torch.Tensor:
    """Which positions (B, L) take part: real tokens whose target is not ``ignore_index``.

    ``causal``: position i predicts token i+1 (the HF shift), so i counts when
    tokens i and i+1 are real and label i+1 is kept; the last position never
    counts. The logits are never sliced, so no (tokens × vocab) copy is made.
    """
    device = device or (labels.device if labels is not None else
                        attention_mask.device if attention_mask is not None else None)
    keep = torch.ones(tokens, dtype=torch.bool, device=device)
    if labels is not None:
        keep &= labels.reshape(tokens) != ignore_index
    if attention_mask is not None:
        keep &= attention_mask.reshape(tokens).bool()
    if not causal:
        return keep
    shifted = torch.zeros_like(keep)
    shifted[..., :-1] = keep[..., 1:]
    if attention_mask is not None:
        shifted &= attention_mask.reshape(tokens).bool()
    return shifted


def top_k_log_probs(log_probs: torch.Tensor, k: int, indices: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probabilities and the tail's log-mass as a (k+1)-th entry, with their indices.

    The tail keeps the mass outside the top k, so the result is still a
    distribution (over k+1 outcomes) and every divergence stays defined. Pass
    ``indices`` to read another distribution (the student's) at the teacher's top k.
    """
    if k >= log_probs.shape[-1]:
        raise ValueError(f"top_k={k} must be smaller than the vocabulary ({log_probs.shape[-1]})")
    if indices is None:
        indices = log_probs.topk(k, dim=-1).indices
    top = log_probs.gather(-1, indices)
    tail = log_probs.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, tail], dim=-1), indices


def divergence_of(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor,
                  divergence: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """D(p_teacher, q_student) along the last dimension, from log-probabilities.

    forward_kl = KL(p‖q); reverse_kl = KL(q‖p); jsd = β·KL(p‖m) + (1−β)·KL(q‖m)
    with m = β·p + (1−β)·q (GKD; β = 0 is KL(p‖q), β = 1 is KL(q‖p), as in TRL);
    tv = ½·Σ|p − q|.
    """
    log_p, log_q = teacher_log_probs.clamp_min(LOG_FLOOR), student_log_probs.clamp_min(LOG_FLOOR)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "jsd" and beta == 0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    if divergence == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    if divergence == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}: forward_kl, reverse_kl, jsd or tv")


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str = "forward_kl",
                     beta: float = 0.5, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """Per-token D(softmax(t/T), softmax(s/T)) over the vocabulary (last dim), in float32; optionally top-k."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if top_k is not None:
        teacher_log_probs, indices = top_k_log_probs(teacher_log_probs, top_k)
        student_log_probs, _ = top_k_log_probs(student_log_probs, top_k, indices)
    return divergence_of(teacher_log_probs, student_log_probs, divergence, beta)


def _logits(side: torch.Tensor | LinearHead, rows: slice) -> torch.Tensor:
    """Float32 logits of some rows; a LinearHead forms them here, without autocast."""
    if not isinstance(side, LinearHead):
        return side[rows].float()
    bias = None if side.bias is None else side.bias.float()
    return F.linear(side.hidden[rows].float(), side.weight.float(), bias)


def _flat(side: torch.Tensor | LinearHead) -> torch.Tensor | LinearHead:
    if isinstance(side, LinearHead):
        return LinearHead(side.hidden.reshape(-1, side.hidden.shape[-1]), side.weight, side.bias)
    return side.reshape(-1, side.shape[-1])


def _float32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor in float32, converted once (outside the chunk loop) and only when it is not already."""
    return tensor if tensor is None or tensor.dtype == torch.float32 else tensor.float()


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b for every row, without the (rows × vocab) product in memory."""
    return torch.einsum("ij,ij->i", a, b)


def _log_softmax_(logits: torch.Tensor, log_probs: torch.Tensor) -> None:
    """``log_probs`` ← log-softmax of ``logits`` (already divided by T), floored; ``logits`` ← softmax."""
    torch._log_softmax(logits, -1, False, out=log_probs)  # one fused pass, as F.log_softmax, into a given buffer
    torch.exp(log_probs.clamp_min_(LOG_FLOOR), out=logits)


def _through_softmax_(g: torch.Tensor, q: torch.Tensor, q_g: torch.Tensor | None = None) -> torch.Tensor:
    """∂D/∂z = q ⊙ (g − Σ q g) for q = softmax(z), given ∂D/∂q (``g``, spent), written over ``q``."""
    q_g = _rowdot(q, g) if q_g is None else q_g
    return q.mul_(g.sub_(q_g[:, None]))


def _divergence_and_gradient_(student: torch.Tensor, teacher: torch.Tensor, scratch: list[torch.Tensor],
                              divergence: str, beta: float) -> torch.Tensor:
    """Per-row D(p, q) from z = s/T (``student``) and t/T (``teacher``), leaving ∂D/∂z in ``student``.

    Every buffer is reused in place (each step names what a buffer holds from
    then on); ``teacher`` and the three ``scratch`` buffers are spent.
    """
    log_q, log_p, extra = scratch
    _log_softmax_(student, log_q)
    _log_softmax_(teacher, log_p)
    q, p = student, teacher
    if divergence == "forward_kl":
        value = _rowdot(p, log_p.sub_(log_q))              # Σ p log(p/q)
        q.sub_(p)                                          # ∂D/∂z = q − p
        return value
    if divergence == "reverse_kl":
        log_ratio = log_q.sub_(log_p)                      # log(q/p)
        kl = _rowdot(q, log_ratio)
        _through_softmax_(log_ratio, q, kl)                # ∂D/∂z = q ⊙ (log(q/p) − KL)
        return kl
    if divergence == "jsd":
        log_m = torch.mul(p, beta, out=extra).add_(q, alpha=1 - beta).log_().clamp_min_(LOG_FLOOR)
        value = beta * _rowdot(p, log_p.sub_(log_m))       # β Σ p log(p/m)
        g = log_q.sub_(log_m).mul_(1 - beta)               # ∂D/∂q = (1−β) log(q/m)
        q_g = _rowdot(q, g)
        _through_softmax_(g, q, q_g)
        return value + q_g                                 # + (1−β) Σ q log(q/m)
    if divergence == "tv":
        difference = torch.sub(q, p, out=log_p)
        g = torch.sign(difference, out=extra).mul_(0.5)    # ∂D/∂q = ½ sign(q − p)
        value = _rowdot(difference, g)                     # ½ Σ |q − p|
        _through_softmax_(g, q)
        return value
    raise ValueError(f"unknown divergence {divergence!r}: forward_kl, reverse_kl, jsd or tv")


def _reduced_(log_probs: torch.Tensor, probs: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """log of the top entries and of the tail's mass (k+1 outcomes); ``probs`` is spent (its top set to 0)."""
    tail = probs.scatter_(-1, top, 0.0).sum(-1, keepdim=True).log().clamp_min_(LOG_FLOOR)
    return torch.cat([log_probs.gather(-1, top), tail], dim=-1)


def _reduced_gradient(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """∂D/∂q̃ (``g``) and q̃ ⊙ g on the k+1 outcomes; a constant in g drops out of q ⊙ (g − Σ q g)."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        return -p / q.clamp_min(torch.finfo(q.dtype).tiny), -p
    if divergence == "reverse_kl":
        g = log_q - log_p
    elif divergence == "jsd":
        g = (1 - beta) * (log_q - torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta)))
    else:
        g = 0.5 * torch.sign(q - p)
    return g, q * g


def _top_k_divergence_and_gradient_(student: torch.Tensor, teacher: torch.Tensor, scratch: list[torch.Tensor],
                                    divergence: str, beta: float, k: int) -> torch.Tensor:
    """As ``_divergence_and_gradient_`` on the teacher's top k and a tail bucket (``top_k_log_probs``).

    Every outcome outside the top k shares the tail's ∂D/∂q̃, so ∂D/∂z = q ⊙ (g − Σ q̃ g̃)
    with g the tail's everywhere but at the top k, where q ⊙ g is q̃ ⊙ g̃ itself.
    """
    if k >= student.shape[-1]:
        raise ValueError(f"top_k={k} must be smaller than the vocabulary ({student.shape[-1]})")
    log_q, log_p, tail = scratch
    _log_softmax_(student, log_q)
    _log_softmax_(teacher, log_p)
    q, p = student, teacher
    top = log_p.topk(k, dim=-1, sorted=False).indices
    reduced_log_p = _reduced_(log_p, p, top)
    reduced_log_q = _reduced_(log_q, tail.copy_(q), top)
    g, q_g = _reduced_gradient(reduced_log_p, reduced_log_q, divergence, beta)
    total = q_g.sum(-1, keepdim=True)                      # Σ q̃ g̃
    q_top = q.gather(-1, top)
    dz = q.mul_(g[:, -1:] - total)                         # every outcome as the tail ...
    dz.scatter_(-1, top, q_g[:, :-1] - q_top * total)      # ... but the top k
    return divergence_of(reduced_log_p, reduced_log_q, divergence, beta)


def _divided(logits: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """out = logits / T in float32: one pass when they are float32, else a conversion first."""
    if logits.dtype == torch.float32:
        return torch.div(logits, temperature, out=out)
    return out.copy_(logits).div_(temperature)


def _scaled_logits_(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
                    out: torch.Tensor) -> torch.Tensor:
    """out = (hidden · weightᵀ + bias) / T, the division folded into the matrix product."""
    if bias is None:
        return out.addmm_(hidden, weight.T, beta=0, alpha=1 / temperature)
    return torch.addmm(bias, hidden, weight.T, beta=1 / temperature, alpha=1 / temperature, out=out)
