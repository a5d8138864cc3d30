"""Token-level divergences between a teacher's and a student's next-token distributions, in chunks.

The (tokens × vocab) probability tensors are formed one chunk of tokens at a
time, in forward and in backward: a custom autograd Function computes each
chunk's loss and its gradient in the same pass (as fused linear–cross-entropy
kernels do) and keeps only the gradient of its inputs. Given the final hidden
states and the output layer (``LinearHead``) instead of logits, not even the
logits exist in full.
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


class _ChunkedDivergence(torch.autograd.Function):
    """Σ_tokens weight · D(teacher, student), a chunk of tokens at a time; the gradient is formed on the way."""

    @staticmethod
    def forward(ctx, options: dict, weights: torch.Tensor, student_x: torch.Tensor, student_w: torch.Tensor | None,
                student_b: torch.Tensor | None, teacher: torch.Tensor | LinearHead) -> torch.Tensor:
        wants = options["wants_grad"]
        leaves = [None if t is None else t.detach().requires_grad_(w) for t, w in
                  zip((student_x, student_w, student_b), wants)]
        grad_x = torch.empty_like(student_x) if wants[0] else None
        grad_params = [torch.zeros_like(t, dtype=torch.float32) if t is not None and w else None
                       for t, w in zip((student_w, student_b), wants[1:])]
        total = torch.zeros((), dtype=torch.float32, device=student_x.device)
        chunk = options["chunk_size"]
        with torch.autocast(student_x.device.type, enabled=False):
            for start in range(0, student_x.shape[0], chunk):
                rows = slice(start, start + chunk)
                with torch.enable_grad():
                    x_rows = leaves[0][rows].detach().requires_grad_(wants[0])
                    if student_w is None:
                        student_logits = x_rows.float()
                    else:
                        bias = None if leaves[2] is None else leaves[2].float()
                        student_logits = F.linear(x_rows.float(), leaves[1].float(), bias)
                    with torch.no_grad():
                        teacher_logits = _logits(teacher, rows)
                    per_token = token_divergence(student_logits, teacher_logits, options["divergence"],
                                                 options["beta"], options["temperature"], options["top_k"])
                    chunk_loss = (per_token * weights[rows]).sum()
                inputs = [t for t, w in zip((x_rows, leaves[1], leaves[2]), wants) if t is not None and w]
                if inputs:
                    grads = iter(torch.autograd.grad(chunk_loss, inputs))
                    if wants[0]:
                        grad_x[rows] = next(grads)
                    for accumulated in grad_params:
                        if accumulated is not None:
                            accumulated += next(grads)
                total += chunk_loss.detach()
        grads = [grad_x, *[None if g is None else g.to(t.dtype) for g, t in zip(grad_params, (student_w, student_b))]]
        ctx.has = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if has else None for has in ctx.has]
        return None, None, *grads, None


def lm_kd_loss(student: torch.Tensor | LinearHead, teacher: torch.Tensor | LinearHead,
               mask: torch.Tensor | None = None, divergence: str = "forward_kl", beta: float = 0.5,
               temperature: float = 1.0, top_k: int | None = None, chunk_size: int | None = 256) -> torch.Tensor:
    """Mean over kept tokens of D(softmax(t/T), softmax(s/T)) · T², a chunk of ``chunk_size`` tokens at a time.

    ``student``/``teacher``: logits (..., V) or a LinearHead (hidden states and
    output layer). ``mask`` (...) marks the tokens that count (see
    ``lm_token_mask``). ``chunk_size=None`` computes on the full tensors.
    """
    student, teacher = _flat(student), _flat(teacher)
    if isinstance(teacher, LinearHead):
        teacher = LinearHead(teacher.hidden.detach(), teacher.weight.detach(),
                             None if teacher.bias is None else teacher.bias.detach())
    else:
        teacher = teacher.detach()
    student_x = student.hidden if isinstance(student, LinearHead) else student
    tokens = student_x.shape[0]
    weights = (torch.ones(tokens, device=student_x.device) if mask is None
               else mask.reshape(tokens).to(device=student_x.device, dtype=torch.float32))
    weights = weights * temperature**2 / weights.sum().clamp_min(1)
    if chunk_size is None or chunk_size >= tokens:
        with torch.autocast(student_x.device.type, enabled=False):
            per_token = token_divergence(_logits(student, slice(None)), _logits(teacher, slice(None)),
                                         divergence, beta, temperature, top_k)
        return (per_token * weights).sum()
    student_w, student_b = (student.weight, student.bias) if isinstance(student, LinearHead) else (None, None)
    wants = [t is not None and t.requires_grad and torch.is_grad_enabled() for t in (student_x, student_w, student_b)]
    options = {"wants_grad": wants, "chunk_size": chunk_size or tokens, "divergence": divergence, "beta": beta,
               "temperature": temperature, "top_k": top_k}
    return _ChunkedDivergence.apply(options, weights, student_x, student_w, student_b, teacher)
