"""lm_kd_loss's closed-form chunked gradients against autograd through the naive full-tensor form."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import kdhooks.plugins._compiled_divergence as compiled_module
import kdhooks.plugins._fused_linear_divergence as fused_module
import kdhooks.plugins._token_divergence as token_divergence_module
from kdhooks.plugins.nlp import LinearHead, lm_kd_loss, token_divergence

TOKENS, HIDDEN, TEACHER_HIDDEN, VOCAB = 23, 12, 10, 60
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0), ("tv", 0.5)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 3 rows, so a chunk of 4 spans two blocks and the last chunk a part of one."""
    monkeypatch.setattr(fused_module, "BLOCK_ELEMENTS", 3 * VOCAB)


def inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"hidden": torch.randn(TOKENS, HIDDEN, generator=g), "weight": torch.randn(VOCAB, HIDDEN, generator=g),
               "bias": torch.randn(VOCAB, generator=g),
               "teacher_hidden": torch.randn(TOKENS, TEACHER_HIDDEN, generator=g),
               "teacher_weight": torch.randn(VOCAB, TEACHER_HIDDEN, generator=g)}
    tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    tensors["mask"] = torch.rand(TOKENS, generator=g) > 0.3
    return tensors


def naive_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, divergence: str,
               beta: float, temperature: float, top_k: int | None) -> torch.Tensor:
    """Mean over kept tokens × T² of token_divergence, with autograd through the full tensors."""
    per_token = token_divergence(student_logits, teacher_logits, divergence, beta, temperature, top_k)
    kept = mask.to(per_token.dtype)
    return (per_token * kept).sum() / kept.sum() * temperature**2


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Largest difference within ``tolerance`` × the largest entry of ``expected``."""
    error = float((actual.double() - expected.double()).abs().max())
    scale = float(expected.double().abs().max())
    assert error <= tolerance * scale, f"{error:.2e} > {tolerance} × {scale:.2e}"


@pytest.mark.parametrize("chunk_size", [None, 4, 100])
@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_from_the_output_layer_equals_the_naive_form(divergence, beta, top_k, chunk_size, compile):
    x = inputs()
    leaves = [x[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")]
    teacher = LinearHead(x["teacher_hidden"], x["teacher_weight"])
    loss = lm_kd_loss(LinearHead(*leaves), teacher, mask=x["mask"], divergence=divergence, beta=beta,
                      temperature=1.7, top_k=top_k, chunk_size=chunk_size, compile=compile)
    loss.backward()
    reference_leaves = [x[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")]
    reference = naive_loss(F.linear(*reference_leaves), F.linear(x["teacher_hidden"], x["teacher_weight"]),
                           x["mask"], divergence, beta, 1.7, top_k)
    reference.backward()
    assert_close(loss.detach(), reference.detach(), 1e-5)
    for leaf, reference_leaf in zip(leaves, reference_leaves):
        assert_close(leaf.grad, reference_leaf.grad, 1e-5)


@pytest.mark.parametrize("chunk_size", [None, 4, 100])
@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_from_logits_equals_the_naive_form(divergence, beta, top_k, chunk_size, compile):
    x = inputs()
    student_logits = F.linear(x["hidden"], x["weight"], x["bias"]).reshape(1, TOKENS, VOCAB)
    teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"]).reshape(1, TOKENS, VOCAB)
    teacher_logits[0, 2, :5] = float("-inf")                # a vocabulary the teacher rules out
    leaf = student_logits.clone().requires_grad_()
    loss = lm_kd_loss(leaf, teacher_logits, mask=x["mask"].reshape(1, TOKENS), divergence=divergence, beta=beta,
                      temperature=0.8, top_k=top_k, chunk_size=chunk_size, compile=compile)
    (loss * 3).backward()                                   # grad_output ≠ 1 scales the stored gradient
    reference_leaf = student_logits.clone().requires_grad_()
    reference = naive_loss(reference_leaf, teacher_logits, x["mask"].reshape(1, TOKENS), divergence, beta, 0.8, top_k)
    (reference * 3).backward()
    assert torch.isfinite(loss)
    assert_close(loss.detach(), reference.detach(), 1e-5)
    assert_close(leaf.grad, reference_leaf.grad, 1e-5)


@pytest.mark.parametrize("wants", [(True, False, False), (False, True, True), (False, False, True)])
def test_only_the_inputs_that_require_grad_get_one(wants):
    x = inputs()
    leaves = [x[name].clone().requires_grad_(want) for name, want in zip(("hidden", "weight", "bias"), wants)]
    loss = lm_kd_loss(LinearHead(*leaves), LinearHead(x["teacher_hidden"], x["teacher_weight"]), mask=x["mask"],
                      divergence="jsd", temperature=2.0, chunk_size=5)
    (loss * -0.5).backward()
    reference_leaves = [x[name].clone().requires_grad_(want) for name, want in zip(("hidden", "weight", "bias"), wants)]
    reference = naive_loss(F.linear(*reference_leaves), F.linear(x["teacher_hidden"], x["teacher_weight"]),
                           x["mask"], "jsd", 0.5, 2.0, None)
    (reference * -0.5).backward()
    for leaf, reference_leaf, want in zip(leaves, reference_leaves, wants):
        assert (leaf.grad is not None) == want
        if want:
            assert_close(leaf.grad, reference_leaf.grad, 1e-5)


def test_no_grad_gives_the_value_and_a_second_backward_is_refused():
    x = inputs()
    student = LinearHead(x["hidden"].requires_grad_(), x["weight"])
    teacher = LinearHead(x["teacher_hidden"], x["teacher_weight"])
    with torch.no_grad():
        value = lm_kd_loss(student, teacher, mask=x["mask"], chunk_size=4)
    loss = lm_kd_loss(student, teacher, mask=x["mask"], chunk_size=4)
    assert value.grad_fn is None and torch.equal(value, loss.detach())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="compute the loss again"):
        loss.backward()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3] + DIVERGENCES[-1:])
@pytest.mark.parametrize("from_head", [True, False])
def test_bfloat16_inputs_accumulate_in_float32(divergence, beta, from_head):
    """bf16 inputs against float64 on the same (bf16) values: the value to 1e-5 (float32 arithmetic), the
    gradients to 1e-2 of their largest entry (they come back in bf16, 2⁻⁸ relative rounding)."""
    x = inputs(torch.bfloat16, seed=1)
    teacher_logits = F.linear(x["teacher_hidden"].double(), x["teacher_weight"].double())
    if from_head:
        leaves = [x[name].clone().requires_grad_() for name in ("hidden", "weight", "bias")]
        student = LinearHead(*leaves)
        teacher = LinearHead(x["teacher_hidden"], x["teacher_weight"])
        exact_leaves = [x[name].double().requires_grad_() for name in ("hidden", "weight", "bias")]
        exact_student = F.linear(*exact_leaves)
    else:
        logits = F.linear(x["hidden"].double(), x["weight"].double(), x["bias"].double()).bfloat16()
        leaves = [logits.clone().requires_grad_()]
        student, teacher = leaves[0], teacher_logits.bfloat16()
        exact_leaves = [logits.double().requires_grad_()]
        exact_student, teacher_logits = exact_leaves[0], teacher_logits.bfloat16().double()
    loss = lm_kd_loss(student, teacher, mask=x["mask"], divergence=divergence, beta=beta, temperature=2.0,
                      chunk_size=4)
    loss.backward()
    log_q = F.log_softmax(exact_student / 2.0, -1)
    log_p = F.log_softmax(teacher_logits / 2.0, -1)
    exact = token_divergence_module.divergence_of(log_p, log_q, divergence, beta)
    exact = (exact * x["mask"].double()).sum() / x["mask"].sum() * 4.0
    exact.backward()
    assert loss.dtype == torch.float32
    assert_close(loss.detach(), exact.detach(), 1e-5)
    for leaf, exact_leaf in zip(leaves, exact_leaves):
        assert leaf.grad.dtype == torch.bfloat16
        assert_close(leaf.grad, exact_leaf.grad, 1e-2)


@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_the_inputs_are_left_as_they_were(divergence, beta, top_k):
    """The gradients are formed in place in lm_kd's own buffers: never in the logits or hidden states it is given,
    which the model's task loss (or the next term) reads too."""
    x = inputs()
    student_logits = F.linear(x["hidden"], x["weight"], x["bias"]).requires_grad_()
    teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"])
    given = {"hidden": x["hidden"].requires_grad_(), "weight": x["weight"].requires_grad_(), "bias": x["bias"],
             "teacher_hidden": x["teacher_hidden"], "teacher_weight": x["teacher_weight"],
             "student_logits": student_logits, "teacher_logits": teacher_logits}
    before = {name: tensor.detach().clone() for name, tensor in given.items()}
    options = {"mask": x["mask"], "divergence": divergence, "beta": beta, "temperature": 1.7, "top_k": top_k,
               "chunk_size": 4}
    lm_kd_loss(LinearHead(x["hidden"], x["weight"], x["bias"]),
               LinearHead(x["teacher_hidden"], x["teacher_weight"]), **options).backward()
    lm_kd_loss(student_logits, teacher_logits, **options).backward()
    with torch.no_grad():  # no gradient wanted: the student's rows go through a scratch buffer instead
        lm_kd_loss(student_logits, teacher_logits, **options)
    for name, tensor in given.items():
        assert torch.equal(tensor.detach(), before[name]), name


def test_compiled_kernels_serve_a_non_leaf_without_a_warning():
    """The model's logits (a non-leaf that requires grad) go through the compiled kernels, not the fallback,
    and nothing warns: torch.compile is never shown a tensor whose .grad it would read."""
    x = inputs()
    student_logits = F.linear(x["hidden"].requires_grad_(), x["weight"], x["bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = lm_kd_loss(student_logits, F.linear(x["teacher_hidden"], x["teacher_weight"]), mask=x["mask"],
                          divergence="tv", chunk_size=4)
        loss.backward()
    assert compiled_module._unavailable is None
    assert "tv" in compiled_module._compiled


def test_a_failed_compilation_warns_once_and_the_eager_passes_give_the_same_loss(monkeypatch):
    def no_compiler(*args):
        raise RuntimeError("no C++ compiler found")

    x = inputs()
    student, teacher = LinearHead(x["hidden"].requires_grad_(), x["weight"]), LinearHead(x["teacher_hidden"],
                                                                                          x["teacher_weight"])
    expected = lm_kd_loss(student, teacher, mask=x["mask"], divergence="jsd", chunk_size=4, compile=False)
    expected_grad = torch.autograd.grad(expected, x["hidden"])[0]
    monkeypatch.setattr(compiled_module, "_unavailable", None)
    monkeypatch.setitem(compiled_module._compiled, "jsd", compiled_module.Kernels(no_compiler, no_compiler, no_compiler))
    with pytest.warns(RuntimeWarning, match="could not build its fused kernels .*no C\\+\\+ compiler"):
        loss = lm_kd_loss(student, teacher, mask=x["mask"], divergence="jsd", chunk_size=4)
    assert torch.equal(loss.detach(), expected.detach())
    assert torch.equal(torch.autograd.grad(loss, x["hidden"])[0], expected_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # said once: later calls go straight to the eager passes
        lm_kd_loss(student, teacher, mask=x["mask"], divergence="jsd", chunk_size=4)


@pytest.mark.parametrize("teacher_shape", [(TOKENS, VOCAB - 10), (TOKENS - 1, VOCAB)])
def test_a_teacher_of_another_shape_is_refused(teacher_shape):
    x = inputs()
    with pytest.raises(ValueError, match="both must score the same tokens over the same vocabulary"):
        lm_kd_loss(F.linear(x["hidden"], x["weight"]), torch.zeros(teacher_shape))
    with pytest.raises(ValueError, match="both must score"):
        lm_kd_loss(LinearHead(x["hidden"], x["weight"]),
                   LinearHead(torch.zeros(teacher_shape[0], TEACHER_HIDDEN), torch.zeros(teacher_shape[1],
                                                                                          TEACHER_HIDDEN)))


def test_an_error_the_eager_passes_raise_too_is_raised_not_taken_for_a_compilation_failure(monkeypatch):
    def failing(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(compiled_module, "_unavailable", None)
    monkeypatch.setitem(compiled_module._compiled, "forward_kl", compiled_module.Kernels(failing, failing, failing))
    monkeypatch.setattr(fused_module, "_divergence_and_gradient_", failing)
    x = inputs()
    with pytest.raises(RuntimeError, match="out of memory"):
        lm_kd_loss(F.linear(x["hidden"], x["weight"]), F.linear(x["teacher_hidden"], x["teacher_weight"]),
                   chunk_size=4)
    assert compiled_module._unavailable is None


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_masked_tokens_form_no_logits_from_the_output_layer(monkeypatch, compile):
    """Prompt and padding tokens add 0 to the loss: from the output layers no logits are formed for them, their
    hidden states get an exact 0 gradient, and a batch with no kept token gives 0, not nan."""
    formed_rows = []
    scaled_logits = fused_module._scaled_logits_
    monkeypatch.setattr(fused_module, "_scaled_logits_",
                        lambda hidden, *args, **kwargs: formed_rows.append(len(hidden)) or scaled_logits(
                            hidden, *args, **kwargs))
    x = inputs()
    hidden = x["hidden"].requires_grad_()
    student, teacher = LinearHead(hidden, x["weight"]), LinearHead(x["teacher_hidden"], x["teacher_weight"])
    loss = lm_kd_loss(student, teacher, mask=x["mask"], chunk_size=4, compile=compile)
    loss.backward()
    assert sum(formed_rows) == 2 * int(x["mask"].sum()) < 2 * TOKENS     # student and teacher, kept rows only
    assert torch.equal(hidden.grad[~x["mask"]], torch.zeros_like(hidden.grad[~x["mask"]]))
    assert hidden.grad[x["mask"]].abs().sum(-1).gt(0).all()
    hidden.grad = None
    nothing_kept = lm_kd_loss(student, teacher, mask=torch.zeros(TOKENS, dtype=torch.bool), chunk_size=4,
                              compile=compile)
    nothing_kept.backward()
    assert nothing_kept.item() == 0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3] + DIVERGENCES[-1:])
def test_from_logits_a_prompt_masked_batch_reads_only_the_kept_rows(divergence, beta):
    """Half the tokens a prompt (the kernels gather the kept rows), the other half kept: the naive form's loss
    and gradient, and an exact 0 gradient for the prompt, even where its logits are not finite."""
    x = inputs()
    mask = torch.arange(TOKENS) >= TOKENS // 2
    student_logits = F.linear(x["hidden"], x["weight"], x["bias"])
    student_logits[0] = float("-inf")                     # a prompt row no softmax is defined for
    leaf = student_logits.clone().requires_grad_()
    teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"])
    loss = lm_kd_loss(leaf, teacher_logits, mask=mask, divergence=divergence, beta=beta, temperature=1.3,
                      chunk_size=100)
    loss.backward()
    reference_leaf = student_logits[mask].clone().requires_grad_()
    reference = naive_loss(reference_leaf, teacher_logits[mask], torch.ones(int(mask.sum()), dtype=torch.bool),
                           divergence, beta, 1.3, None)
    reference.backward()
    assert_close(loss.detach(), reference.detach(), 1e-5)
    assert_close(leaf.grad[mask], reference_leaf.grad, 1e-5)
    assert torch.equal(leaf.grad[~mask], torch.zeros_like(leaf.grad[~mask]))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_from_logits_mostly_kept_rows_are_one_kernel_call(monkeypatch, divergence, beta):
    """Above GATHER_BELOW kept, from logits, every row goes to the compiled kernels in one call whatever the chunk
    size (the fused kernel, split at the logs for the KLs): the naive form's loss and gradient."""
    x = inputs()
    mask = torch.ones(TOKENS, dtype=torch.bool)
    mask[[3, 11]] = False
    student_logits = F.linear(x["hidden"], x["weight"], x["bias"])
    teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"])
    teacher_logits[5, :4] = float("-inf")
    calls = []
    compiled_block = fused_module._compiled_block
    monkeypatch.setattr(fused_module, "_compiled_block", lambda *args: calls.append(len(args[1])) or
                        compiled_block(*args))
    leaf = student_logits.clone().requires_grad_()
    loss = lm_kd_loss(leaf, teacher_logits, mask=mask, divergence=divergence, beta=beta, temperature=1.6,
                      chunk_size=4)
    (loss * 2).backward()
    reference_leaf = student_logits.clone().requires_grad_()
    reference = naive_loss(reference_leaf, teacher_logits, mask, divergence, beta, 1.6, None)
    (reference * 2).backward()
    assert calls == [TOKENS]
    assert compiled_module._unavailable is None
    assert_close(loss.detach(), reference.detach(), 1e-5)
    assert_close(leaf.grad, reference_leaf.grad, 1e-5)


@pytest.mark.parametrize("from_head", [False, True], ids=["logits", "output layer"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3] + DIVERGENCES[-1:])
@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_masked_rows_with_nan_or_infinite_logits_count_for_nothing(divergence, beta, compile, from_head):
    """Padding whose logits are nan (a fully masked attention row) or -inf, on a mostly kept batch (so not
    gathered away): the kept rows' loss and gradient, and an exact 0 gradient for the padding."""
    x = inputs()
    mask = torch.ones(TOKENS, dtype=torch.bool)
    mask[[3, 11]] = False
    student_logits = F.linear(x["hidden"], x["weight"], x["bias"])
    teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"])
    teacher_logits[3], teacher_logits[11] = float("nan"), float("-inf")
    student_logits[3], student_logits[11] = float("-inf"), float("nan")
    x["hidden"][3], x["hidden"][11] = float("nan"), float("inf")
    leaf = (x["hidden"] if from_head else student_logits).clone().requires_grad_()
    head = [x[name].clone().requires_grad_() for name in ("weight", "bias")]
    student = LinearHead(leaf, *head) if from_head else leaf
    loss = lm_kd_loss(student, teacher_logits, mask=mask, divergence=divergence, beta=beta, temperature=1.2,
                      chunk_size=4, compile=compile)
    loss.backward()
    reference_leaf = (x["hidden"] if from_head else student_logits)[mask].clone().requires_grad_()
    reference_head = [x[name].clone().requires_grad_() for name in ("weight", "bias")]
    reference_logits = F.linear(reference_leaf, *reference_head) if from_head else reference_leaf
    reference = naive_loss(reference_logits, teacher_logits[mask], torch.ones(int(mask.sum()), dtype=torch.bool),
                           divergence, beta, 1.2, None)
    reference.backward()
    assert_close(loss.detach(), reference.detach(), 1e-5)
    assert_close(leaf.grad[mask], reference_leaf.grad, 1e-5)
    assert torch.equal(leaf.grad[~mask], torch.zeros_like(leaf.grad[~mask]))
    for parameter, reference_parameter in zip(head, reference_head) if from_head else ():
        assert_close(parameter.grad, reference_parameter.grad, 1e-5)
