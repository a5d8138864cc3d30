"""lm_kd_loss: a fused linear loss (as in the fused linear–cross-entropy kernels
of Wijmans et al. 2024 "Cut Your Losses", Liger-Kernel's fused linear losses).

It walks the tokens a chunk at a time, forms the chunk's logits (from the
output layer, ``LinearHead``, or from given logits), and writes the gradient of
the divergence with respect to them in closed form into the same buffer, in
the forward pass: with two compiled kernels per block of rows
(``_compiled_divergence``), or the eager passes (``_token_divergence``). From
the output layer that gradient is pushed at once into the hidden states (dz·W)
and the weight (dzᵀ·h), so no (tokens × vocab) tensor exists and no autograd
graph is built; the backward pass only scales the stored gradients. What is
held above the gradients: the chunk's student and teacher logits (the first
becoming its gradient); from logits, the logits' gradient itself.
"""
from __future__ import annotations

import torch

from ._compiled_divergence import Kernels, compiled_kernels, give_up_compiling, mark_rows_dynamic, room_for_variants
from ._token_divergence import (LinearHead, _divergence_and_gradient_, _divided, _flat, _float32, _logits,
                                _scaled_logits_, _top_k_divergence_and_gradient_, token_divergence)

# values per block of rows in the divergence's passes (4 MiB in float32): its few buffers stay in cache
BLOCK_ELEMENTS = 2**20
# from logits, the kept share of a chunk's rows at or below which the kernels read only those rows: gathered
# loads cost (and reverse KL's one graph then stores a gathered chunk); measured 1.45x faster with half the rows
# dropped, no faster with a tenth
GATHER_BELOW = 0.75


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
    if student_w is not None and not bool(weights.all()):
        return _kept_rows_only(options, weights, student_x, student_w, student_b, teacher)
    kernels = (compiled_kernels(options["divergence"]) if options["compile"] and options["top_k"] is None
               else None)
    if kernels is None:
        return _chunks(options, None, weights, student_x, student_w, student_b, teacher)
    try:
        with room_for_variants():
            return _chunks(options, kernels, weights, student_x, student_w, student_b, teacher)
    except Exception as error:  # noqa: BLE001 — judged below by whether the eager passes succeed
        result = _chunks(options, None, weights, student_x, student_w, student_b, teacher)
        give_up_compiling(error)
        return result


def _kept_rows_only(options: dict, weights: torch.Tensor, student_x: torch.Tensor, student_w: torch.Tensor,
                    student_b: torch.Tensor | None, teacher: torch.Tensor | LinearHead) -> tuple[torch.Tensor, list]:
    """From the output layer, only the tokens that count: masked ones (prompt, padding) add 0 and get a 0 gradient.

    Their hidden states are gathered (tokens × hidden, small), so no logits are
    formed for them (and padding's hidden states, nan after a fully masked
    attention row, never reach the weight's gradient), and the hidden states'
    gradient is scattered back.
    """
    kept = weights.nonzero().squeeze(1)
    teacher = (LinearHead(teacher.hidden.index_select(0, kept), teacher.weight, teacher.bias)
               if isinstance(teacher, LinearHead) else teacher.index_select(0, kept))
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
    # from logits, which rows count: the kernels read only those (from the output layer they alone are given)
    keep = (weights != 0).cpu() if kernels is not None and not from_head else None
    if kernels is not None and not (from_head or teacher_head) and float(keep.float().mean()) > GATHER_BELOW:
        # from logits nothing is formed chunk by chunk: one call for all rows (the kernels hold no row-sized
        # temporary), which spares each chunk's call its fixed cost (measured: 4% of a 4096-token step at
        # 256-token chunks). Where rows are gathered, chunks bound the gathered rows reverse KL's graph stores.
        chunk = tokens
    block_rows = max(1, min(chunk, BLOCK_ELEMENTS // vocab))
    if kernels is not None and (student_x.device.type != "cpu" or not (from_head or teacher_head)):
        # one call per chunk: a GPU kernel reads each row once in any case, and from logits on the CPU the
        # rows come from memory whatever the block (measured: a chunk per call beats cache-sized blocks)
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
    scalars = torch.tensor([1.0 if from_head else 1 / temperature, 1.0 if teacher_head else 1 / temperature, beta],
                           device=student_x.device)
    row_weights = weights[:, None] / temperature           # ∂(Σ weight·D)/∂s = weight · ∂D/∂z / T
    # from logits, rows weighted 0 get an exact 0 (the compiled kernels select it): their logits may be nan or
    # -inf (padding); from the output layer such rows never get here (_kept_rows_only)
    zero_rows = None if kernels is not None or bool(weights.all()) else row_weights == 0
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
                    None if from_head else keep[token_rows], scalars, row_weights[token_rows, 0], out)
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
                if zero_rows is not None:
                    grad_s.masked_fill_(zero_rows[token_rows], 0.0)
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
    return torch.dot(per_token.masked_fill_(weights == 0, 0.0), weights), grads


def _compiled_block(kernels: Kernels, student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor | None,
                    scalars: torch.Tensor, row_weights: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """D per row of a block with the compiled kernels; with ``out``, its weighted gradient written there.

    ``scalars``: the student's and the teacher's scale (1/T, or 1 where the
    product already divided) and β.
    ``keep`` (on the CPU): the rows that count. Where at most GATHER_BELOW of
    the block's rows count, the others (prompt, padding) are left out of the
    kernels, which read only the kept rows and write 0 into the others'
    gradient; above, every row is computed, the dropped ones weighted 0.
    """
    kept = dropped = None
    if keep is not None and not bool(keep.any()):
        if out is not None:
            out.zero_()
        return torch.zeros(len(keep), dtype=torch.float32, device=student.device)
    if keep is not None and float(keep.float().mean()) <= GATHER_BELOW:
        kept, dropped = (rows.nonzero().squeeze(1).to(student.device, non_blocking=True) for rows in (keep, ~keep))
        mark_rows_dynamic(kept, dropped)
    mark_rows_dynamic(student, teacher, row_weights)
    if out is not None and out is not student and kernels.fused is not None:
        mark_rows_dynamic(out)
        value = kernels.fused(student, teacher, kept, dropped, scalars, row_weights, out)
    else:
        value, q_g, normalisers = kernels.statistics(student, teacher, kept, scalars)
        if out is not None:
            mark_rows_dynamic(out, q_g, *normalisers)
            kernels.gradient(student, teacher, kept, dropped, scalars, normalisers, q_g, row_weights, out)
    if kept is None:
        return value
    return torch.zeros(len(keep), dtype=value.dtype, device=value.device).index_copy_(0, kept, value)


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
