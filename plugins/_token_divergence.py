"""Token-level divergences between a teacher's and a student's next-token distributions, in chunks.

``lm_kd_loss`` is a fused linear loss (as in the fused linear–cross-entropy
kernels of Wijmans et al. 2024 "Cut Your Losses", Liger-Kernel's fused linear
losses): it walks the tokens a chunk at a time, forms the chunk's logits (from
the output layer, ``LinearHead``, or from given logits), and writes the
gradient of the divergence with respect to them in closed form into the same
buffer, in the forward pass. With z = s/T, q = softmax(z), p = softmax(t/T):

    forward KL   ∂D/∂z = q − p
    reverse KL   ∂D/∂z = q ⊙ (log q − log p − KL(q‖p))
    JSD(β)       ∂D/∂z = q ⊙ (g − Σ q g),  g = (1−β)·log(q/m),  m = βp + (1−β)q
    TV           ∂D/∂z = q ⊙ (g − Σ q g),  g = ½·sign(q − p)

From the output layer that gradient is pushed at once into the hidden states
(dz·W) and the weight (dzᵀ·h), so no (tokens × vocab) tensor exists and no
autograd graph is built; the backward pass only scales the stored gradients.
What is held above the gradients: the chunk's student and teacher logits (the
first becoming its gradient) and a few small blocks of scratch; from logits,
the logits' gradient itself is the buffer the student's rows are written into.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._compiled_divergence import Kernels, compiled_kernels, give_up_compiling, mark_rows_dynamic

# log-probabilities are floored here: a zero probability then adds 0·(finite) to a sum, never nan
LOG_FLOOR = -1e30
# values per block of rows in the divergence's passes (4 MiB in float32): its few buffers stay in cache
BLOCK_ELEMENTS = 2**20


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


def _chunked_loss_and_gradients(options: dict, weights: torch.Tensor, student_x: torch.Tensor,
                                student_w: torch.Tensor | None, student_b: torch.Tensor | None,
                                teacher: torch.Tensor | LinearHead) -> tuple[torch.Tensor, list]:
    """Σ_tokens weight · D(teacher, student) and its gradient with respect to each input that wants one.

    The divergence's passes run as compiled kernels where torch.compile can
    build them (not for top-k), else eagerly. A compiled attempt that fails is
    computed again eagerly: the inputs are never written, so nothing is lost;
    only when the eager passes succeed was compilation the fault, and it is
    then given up for the process.
    """
    # the gradients are formed here, not by autograd; a view of a non-leaf that requires grad would also make
    # torch.compile read its .grad (a warning)
    student_x, student_w, student_b = (None if t is None else t.detach() for t in (student_x, student_w, student_b))
    if student_w is not None and isinstance(teacher, LinearHead) and not bool(weights.all()):
        return _kept_rows_only(options, weights, student_x, student_w, student_b, teacher)
    kernels = (compiled_kernels(options["divergence"]) if options["compile"] and options["top_k"] is None
               else None)
    if kernels is None:
        return _chunks(options, None, weights, student_x, student_w, student_b, teacher)
    try:
        return _chunks(options, kernels, weights, student_x, student_w, student_b, teacher)
    except Exception as error:  # noqa: BLE001 — judged below by whether the eager passes succeed
        result = _chunks(options, None, weights, student_x, student_w, student_b, teacher)
        give_up_compiling(error)
        return result


def _kept_rows_only(options: dict, weights: torch.Tensor, student_x: torch.Tensor, student_w: torch.Tensor,
                    student_b: torch.Tensor | None, teacher: LinearHead) -> tuple[torch.Tensor, list]:
    """From the output layers, only the tokens that count: masked ones (prompt, padding) add 0 and get a 0 gradient.

    Their hidden states are gathered (tokens × hidden, small), so no logits are
    formed for them, and the hidden states' gradient is scattered back.
    """
    kept = weights.nonzero().squeeze(1)
    teacher = LinearHead(teacher.hidden.index_select(0, kept), teacher.weight, teacher.bias)
    total, (grad_x, *grads) = _chunked_loss_and_gradients(options, weights[kept], student_x.index_select(0, kept),
                                                          student_w, student_b, teacher)
    if grad_x is not None:
        grad_x = torch.zeros_like(student_x).index_copy_(0, kept, grad_x)
    return total, [grad_x, *grads]


def _chunks(options: dict, kernels: Kernels | None, weights: torch.Tensor, student_x: torch.Tensor,
            student_w: torch.Tensor | None, student_b: torch.Tensor | None, teacher: torch.Tensor | LinearHead
            ) -> tuple[torch.Tensor, list]:
    """The loss and gradients, a chunk and, within it, a block at a time, with ``kernels`` or the eager passes.

    Two sizes: a chunk of ``chunk_size`` tokens is what one matrix product of
    the output layer forms (large, so the product runs at full speed); the
    divergence then runs over blocks of a few rows (about BLOCK_ELEMENTS
    values), whose passes stay in the CPU's cache or the GPU's L2, with small
    scratch buffers. From logits there is no chunk: the student's rows are
    written, block by block, into the logits' gradient, which becomes their
    gradient (compiled kernels take a whole chunk of rows there, as one pass).
    """
    wants_x, wants_w, wants_b = options["wants_grad"]
    chunk, temperature, top_k = options["chunk_size"], options["temperature"], options["top_k"]
    divergence, beta = options["divergence"], options["beta"]
    if divergence == "jsd" and beta in (0, 1):             # the ends of GKD's JSD, as in divergence_of
        divergence = "forward_kl" if beta == 0 else "reverse_kl"
        kernels = kernels and compiled_kernels(divergence)
    from_head, teacher_head = student_w is not None, isinstance(teacher, LinearHead)
    tokens, vocab = student_x.shape[0], student_w.shape[0] if from_head else student_x.shape[1]
    block_rows = max(1, min(chunk, BLOCK_ELEMENTS // vocab))
    if kernels is not None and not from_head and not teacher_head:
        block_rows = chunk

    def buffer(rows: int) -> torch.Tensor:
        return torch.empty(min(rows, tokens), vocab, dtype=torch.float32, device=student_x.device)

    grad_x = torch.empty(student_x.shape, dtype=student_x.dtype, device=student_x.device) if wants_x else None
    # float32 logits become their own gradient: the logits' gradient is then the only (tokens × vocab) tensor
    in_gradient = not from_head and wants_x and student_x.dtype == torch.float32
    student_buffer = None if in_gradient or (kernels and not from_head) else buffer(chunk if from_head else block_rows)
    teacher_buffer = buffer(chunk) if teacher_head else None if kernels else buffer(block_rows)
    scratch = [] if kernels else [buffer(block_rows) for _ in range(3)]
    weight, bias = _float32(student_w), _float32(student_b)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if wants_b else None
    if teacher_head:
        teacher = LinearHead(teacher.hidden, _float32(teacher.weight), _float32(teacher.bias))
    per_token = torch.empty(tokens, dtype=torch.float32, device=student_x.device)
    row_weights = weights[:, None] / temperature           # ∂(Σ weight·D)/∂s = weight · ∂D/∂z / T
    for start in range(0, tokens, chunk):
        size = min(chunk, tokens - start)
        if from_head:
            hidden = student_x[start:start + size].float()
            z = _scaled_logits_(hidden, weight, bias, temperature, out=student_buffer[:size])
        if teacher_head:
            t = _scaled_logits_(teacher.hidden[start:start + size].float(), teacher.weight, teacher.bias,
                                temperature, out=teacher_buffer[:size])
        for first in range(0, size, block_rows):
            rows = slice(first, min(first + block_rows, size))
            token_rows = slice(start + rows.start, start + rows.stop)
            n = rows.stop - rows.start
            if kernels is not None:
                student_rows = z[rows] if from_head else student_x[token_rows]
                out = (None if not any(options["wants_grad"]) else student_rows if from_head
                       else grad_x[token_rows] if wants_x else None)
                per_token[token_rows] = _compiled_block(
                    kernels, student_rows, t[rows] if teacher_head else teacher[token_rows],
                    1.0 if from_head else 1 / temperature, 1.0 if teacher_head else 1 / temperature, beta,
                    row_weights[token_rows, 0], out)
                continue
            if from_head:
                z_block = z[rows]
            else:
                z_block = _divided(student_x[token_rows], temperature,
                                   out=grad_x[token_rows] if in_gradient else student_buffer[:n])
            t_block = t[rows] if teacher_head else _divided(teacher[token_rows], temperature, out=teacher_buffer[:n])
            block_scratch = [scratch_buffer[:n] for scratch_buffer in scratch]
            if top_k is None:
                per_token[token_rows] = _divergence_and_gradient_(z_block, t_block, block_scratch, divergence, beta)
            else:
                per_token[token_rows] = _top_k_divergence_and_gradient_(z_block, t_block, block_scratch,
                                                                        divergence, beta, top_k)
            if not from_head and wants_x:
                grad_s = z_block.mul_(row_weights[token_rows])
                if not in_gradient:
                    grad_x[token_rows] = grad_s
        if from_head:
            # the compiled kernels have weighted the rows already
            grad_s = z if kernels is not None else z.mul_(row_weights[start:start + size])
            if wants_x and grad_x.dtype == torch.float32:
                torch.mm(grad_s, weight, out=grad_x[start:start + size])
            elif wants_x:
                grad_x[start:start + size] = grad_s @ weight
            if wants_w:
                grad_w.addmm_(grad_s.T, hidden)
            if wants_b:
                grad_b += grad_s.sum(0)
    grads = [grad_x, *[None if g is None else g.to(t.dtype) for g, t in ((grad_w, student_w), (grad_b, student_b))]]
    return torch.dot(per_token, weights), grads


def _compiled_block(kernels: Kernels, student: torch.Tensor, teacher: torch.Tensor, student_scale: float,
                    teacher_scale: float, beta: float, row_weights: torch.Tensor, out: torch.Tensor | None
                    ) -> torch.Tensor:
    """D per row of a block with the compiled kernels; with ``out``, its weighted gradient written there."""
    mark_rows_dynamic(student, teacher, row_weights)
    value, q_g, normalisers = kernels.statistics(student, teacher, student_scale, teacher_scale, beta)
    if out is not None:
        mark_rows_dynamic(out, q_g, *normalisers)
        kernels.gradient(student, teacher, student_scale, teacher_scale, beta, normalisers, q_g, row_weights, out)
    return value


class _FusedLinearDivergence(torch.autograd.Function):
    """Σ_tokens weight · D(teacher, student) with its gradients formed in the forward pass; backward scales them."""

    @staticmethod
    def forward(ctx, options: dict, weights: torch.Tensor, student_x: torch.Tensor, student_w: torch.Tensor | None,
                student_b: torch.Tensor | None, teacher: torch.Tensor | LinearHead) -> torch.Tensor:
        with torch.autocast(student_x.device.type, enabled=False):
            total, ctx.grads = _chunked_loss_and_gradients(options, weights, student_x, student_w, student_b,
                                                           teacher)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        # handed over, not kept: autograd can then take a gradient as .grad without copying it
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("lm_kd_loss's stored gradients were used by an earlier backward; "
                               "compute the loss again to backpropagate through it again")
        if bool(grad_total != 1):
            grads = [None if g is None else g.mul_(grad_total) for g in grads]
        return None, None, *grads, None


def lm_kd_loss(student: torch.Tensor | LinearHead, teacher: torch.Tensor | LinearHead,
               mask: torch.Tensor | None = None, divergence: str = "forward_kl", beta: float = 0.5,
               temperature: float = 1.0, top_k: int | None = None, chunk_size: int | None = 256,
               compile: bool = True) -> torch.Tensor:
    """Mean over kept tokens of D(softmax(t/T), softmax(s/T)) · T², a chunk of ``chunk_size`` tokens at a time.

    ``student``/``teacher``: logits (..., V) or a LinearHead (hidden states and
    output layer). ``mask`` (...) marks the tokens that count (see
    ``lm_token_mask``). ``chunk_size=None`` computes on the full tensors with
    autograd (the reference form; it also allows double backward). The
    chunked loss's gradients are formed in the forward pass and handed to one
    backward pass; ``compile`` runs the divergence's passes as kernels built by
    torch.compile (the eager passes where it cannot, and for ``top_k``).
    """
    if divergence not in ("forward_kl", "reverse_kl", "jsd", "tv"):
        raise ValueError(f"unknown divergence {divergence!r}: forward_kl, reverse_kl, jsd or tv")
    student, teacher = _flat(student), _flat(teacher)
    if isinstance(teacher, LinearHead):
        teacher = LinearHead(teacher.hidden.detach(), teacher.weight.detach(),
                             None if teacher.bias is None else teacher.bias.detach())
    else:
        teacher = teacher.detach()
    student_x = student.hidden if isinstance(student, LinearHead) else student
    tokens = student_x.shape[0]
    shapes = [(side.hidden.shape[0], side.weight.shape[0]) if isinstance(side, LinearHead) else tuple(side.shape)
              for side in (student, teacher)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"lm_kd_loss: the student gives {shapes[0][0]} tokens × {shapes[0][1]} vocabulary entries, "
                         f"the teacher {shapes[1][0]} × {shapes[1][1]}: both must score the same tokens over the "
                         "same vocabulary")
    weights = (torch.ones(tokens, device=student_x.device) if mask is None
               else mask.reshape(tokens).to(device=student_x.device, dtype=torch.float32))
    weights = weights * temperature**2 / weights.sum().clamp_min(1)     # the mean over kept tokens, × T²
    if chunk_size is None:
        with torch.autocast(student_x.device.type, enabled=False):
            per_token = token_divergence(_logits(student, slice(None)), _logits(teacher, slice(None)),
                                         divergence, beta, temperature, top_k)
        return (per_token * weights).sum()
    student_w, student_b = (student.weight, student.bias) if isinstance(student, LinearHead) else (None, None)
    wants = [t is not None and t.requires_grad and torch.is_grad_enabled() for t in (student_x, student_w, student_b)]
    options = {"wants_grad": wants, "chunk_size": max(1, min(chunk_size, tokens)), "divergence": divergence,
               "beta": beta, "temperature": temperature, "top_k": top_k, "compile": compile}
    if not any(wants):
        with torch.autocast(student_x.device.type, enabled=False):
            return _chunked_loss_and_gradients(options, weights, student_x, student_w, student_b, teacher)[0]
    return _FusedLinearDivergence.apply(options, weights, student_x, student_w, student_b, teacher)
