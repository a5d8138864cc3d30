"""Each built-in term against its reference code, re-stated here in a few lines (docs/conventions.md).

Every ``ref_*`` function below is a short re-statement of the reference formula
(the repository and function are named in its docstring), written for this
test from the formula, not imported from that code. A test compares kdhooks'
function or term with it on small fixed tensors, in value and in gradient (with
respect to the student's side) to 1e-5, through the constant that
docs/conventions.md gives; where a term has two forms, both are checked.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import kdhooks
from _models import batch, pair
from kdhooks.plugins._layers import resolve_layer_weights
from kdhooks.plugins.attention import at_loss
from kdhooks.plugins.features import factor_transfer_loss, fitnets_loss, mmd_loss
from kdhooks.plugins.gradients import grad_at_loss
from kdhooks.plugins.logits import dkd_loss, kd_loss, logits_l2_loss
from kdhooks.plugins.nlp import attention_maps_loss, hidden_states_loss
from kdhooks.plugins.relations import fsp_loss, fsp_matrix, pkt_loss, rkd_angle_loss, rkd_distance_loss, sp_loss
from kdhooks.plugins.sparsity import ab_loss


def tensors(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


def same_value_and_gradient(ours, reference, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
    """ours(*student, *teacher) == reference(*student, *teacher) and d/d student, to 1e-5 (relative to the scale)."""
    values, gradients = [], []
    for fn in (ours, reference):
        leaves = [s.clone().requires_grad_(True) for s in student]
        value = fn(*leaves, *[t.clone() for t in teacher])
        values.append(value)
        gradients.append(torch.autograd.grad(value, leaves))
    ours_value, reference_value = values
    assert ours_value.shape == () and reference_value.numel() == 1
    torch.testing.assert_close(ours_value, reference_value.reshape(()), rtol=1e-5, atol=1e-8)
    for mine, theirs in zip(*gradients):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()) + 1e-12)


# --- logits --------------------------------------------------------------------------------


def ref_distill_kl(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """RepDistiller distiller_zoo/KD.py DistillKL (= mdistiller kd_loss): Σ KL(p_t ‖ p_s) · T² / batch."""
    p_t = torch.softmax(t / T, 1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum() * T * T / s.shape[0]


def test_kd_is_repdistillers_distill_kl():
    s, t = tensors((6, 10), (6, 10))
    same_value_and_gradient(lambda s, t: kd_loss(s, t, 4.0), lambda s, t: ref_distill_kl(s, t, 4.0), [s], [t])


def ref_dkd(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
            T: float) -> torch.Tensor:
    """mdistiller distillers/DKD.py dkd_loss: target/non-target binary KL and the non-target KL (−1000 masking), × T²."""
    gt = F.one_hot(labels, s.shape[1]).float()

    def binary(p):
        return torch.stack([(p * gt).sum(1), (p * (1 - gt)).sum(1)], 1)

    b_s, b_t = binary(torch.softmax(s / T, 1)), binary(torch.softmax(t / T, 1))
    tckd = (b_t * (torch.log(b_t) - torch.log(b_s))).sum() * T**2 / len(s)
    q_t = torch.softmax(t / T - 1000.0 * gt, 1)
    log_q_s = torch.log_softmax(s / T - 1000.0 * gt, 1)
    nckd = (torch.xlogy(q_t, q_t) - q_t * log_q_s).sum() * T**2 / len(s)
    return alpha * tckd + beta * nckd


def test_dkd_is_mdistillers_dkd_loss():
    s, t = tensors((6, 10), (6, 10))
    labels = torch.tensor([0, 3, 9, 3, 1, 7])
    same_value_and_gradient(lambda s, t: dkd_loss(s, t, labels, 1.0, 8.0, 4.0),
                            lambda s, t: ref_dkd(s, t, labels, 1.0, 8.0, 4.0), [s], [t])


def test_logits_l2_is_the_papers_half_sum_times_two_over_classes():
    """Ba & Caruana 2014: ½ Σ_c (z_s − z_t)² per sample; kdhooks' element mean is it × 2/C."""
    s, t = tensors((6, 10), (6, 10))
    same_value_and_gradient(logits_l2_loss, lambda s, t: 0.5 * (s - t).pow(2).sum(1).mean() * 2 / 10, [s], [t])


# --- features ------------------------------------------------------------------------------


def test_fitnets_is_repdistillers_hint_loss():
    """RepDistiller distiller_zoo/FitNet.py HintLoss: nn.MSELoss (the element mean)."""
    s, t = tensors((4, 8, 4, 4), (4, 8, 4, 4))
    same_value_and_gradient(fitnets_loss, lambda s, t: ((s - t) ** 2).sum() / s.numel(), [s], [t])


def ref_nst(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller distiller_zoo/NST.py NSTLoss.nst_loss: pooled to the smaller map, MMD² with (xᵀy)² kernels."""
    if f_s.shape[2] > f_t.shape[2]:
        f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[2:])
    elif f_s.shape[2] < f_t.shape[2]:
        f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
    f_s = F.normalize(f_s.flatten(2), dim=2)
    f_t = F.normalize(f_t.flatten(2), dim=2)

    def kernel(a, b):  # every channel of a against every channel of b, per sample
        return torch.einsum("nik,njk->nij", a, b).pow(2)

    return kernel(f_t, f_t).mean() + kernel(f_s, f_s).mean() - 2 * kernel(f_s, f_t).mean()


def test_mmd_polynomial_is_repdistillers_nst_loss_also_on_maps_of_different_sizes():
    s, t = tensors((3, 4, 4, 4), (3, 6, 8, 8))
    same_value_and_gradient(mmd_loss, ref_nst, [s], [t])


def ref_factor_transfer_authors(factor_s: torch.Tensor, factor_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Jangho-Kim/Factor-Transfer-pytorch train_student.py: β · L1Loss(FT(F_S), FT(F_T)), FT = flattened, L2-normalized."""
    unit_s = factor_s.flatten(1) / factor_s.flatten(1).norm(dim=1, keepdim=True)
    unit_t = factor_t.flatten(1) / factor_t.flatten(1).norm(dim=1, keepdim=True)
    return beta * (unit_s - unit_t).abs().mean()


def ref_factor_transfer_repdistiller(factor_s: torch.Tensor, factor_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller distiller_zoo/FT.py FactorTransfer (p1 = 2, p2 = 1): the L1 mean of normalized mean_c F²."""
    return (F.normalize(factor_s.pow(2).mean(1).flatten(1)) - F.normalize(factor_t.pow(2).mean(1).flatten(1))).abs().mean()


def test_ft_is_the_authors_code_and_not_repdistillers():
    s, t = tensors((3, 4, 4, 4), (3, 4, 4, 4))
    same_value_and_gradient(lambda s, t: 500 * factor_transfer_loss(s, t),
                            lambda s, t: ref_factor_transfer_authors(s, t, 500.0), [s], [t])
    # RepDistiller's FactorTransfer is another formula (docs/conventions.md): no constant joins them
    ratios = [float(factor_transfer_loss(a, b) / ref_factor_transfer_repdistiller(a, b))
              for a, b in (tensors((3, 4, 4, 4), (3, 4, 4, 4), seed=seed) for seed in range(3))]
    assert max(ratios) / min(ratios) > 1.05


# --- attention -----------------------------------------------------------------------------


def ref_at_authors(g_s: list[torch.Tensor], g_t: list[torch.Tensor], beta: float) -> torch.Tensor:
    """szagoruyko/attention-transfer utils.py at_loss, summed over groups × β (cifar.py); maps of equal size."""
    def at(x):
        return F.normalize(x.pow(2).mean(1).flatten(1))
    return beta * sum((at(x) - at(y)).pow(2).mean() for x, y in zip(g_s, g_t))


def ref_at_repdistiller(g_s: list[torch.Tensor], g_t: list[torch.Tensor], beta: float) -> torch.Tensor:
    """RepDistiller distiller_zoo/AT.py Attention.at_loss: the larger feature pooled to the smaller, then the map; × β."""
    total = 0.0
    for f_s, f_t in zip(g_s, g_t):
        if f_s.shape[2] > f_t.shape[2]:
            f_s = F.adaptive_avg_pool2d(f_s, (f_t.shape[2], f_t.shape[2]))
        elif f_s.shape[2] < f_t.shape[2]:
            f_t = F.adaptive_avg_pool2d(f_t, (f_s.shape[2], f_s.shape[2]))
        total = total + (F.normalize(f_s.pow(2).mean(1).flatten(1))
                         - F.normalize(f_t.pow(2).mean(1).flatten(1))).pow(2).mean()
    return beta * total


def ref_at_paper_pooled(g_s: list[torch.Tensor], g_t: list[torch.Tensor], beta: float) -> torch.Tensor:
    """The paper's β/2 Σ_j mean (Q_S/‖Q_S‖ − Q_T/‖Q_T‖)², Q = mean_c |f|², the larger Q average-pooled to the smaller."""
    total = 0.0
    for f_s, f_t in zip(g_s, g_t):
        q_s, q_t = f_s.abs().pow(2).mean(1, keepdim=True), f_t.abs().pow(2).mean(1, keepdim=True)
        size = min(q_s.shape[2], q_t.shape[2])
        q_s, q_t = F.adaptive_avg_pool2d(q_s, size), F.adaptive_avg_pool2d(q_t, size)
        total = total + (F.normalize(q_s.flatten(1)) - F.normalize(q_t.flatten(1))).pow(2).mean()
    return beta / 2 * total


def test_at_beta_2000_is_the_authors_and_repdistillers_beta_1000():
    s1, s2, t1, t2 = tensors((3, 4, 8, 8), (3, 8, 4, 4), (3, 16, 8, 8), (3, 32, 4, 4))
    for form in ("paper", "reference"):  # equal map sizes: the forms agree
        same_value_and_gradient(lambda a, b, c, d, form=form: at_loss([a, b], [c, d], beta=2000.0, form=form),
                                lambda a, b, c, d: ref_at_authors([a, b], [c, d], 1000.0), [s1, s2], [t1, t2])


def test_at_forms_on_maps_of_different_sizes():
    s1, s2, t1, t2 = tensors((3, 4, 8, 8), (3, 8, 4, 4), (3, 16, 4, 4), (3, 32, 2, 2))
    same_value_and_gradient(lambda a, b, c, d: at_loss([a, b], [c, d], beta=2000.0, form="reference"),
                            lambda a, b, c, d: ref_at_repdistiller([a, b], [c, d], 1000.0), [s1, s2], [t1, t2])
    same_value_and_gradient(lambda a, b, c, d: at_loss([a, b], [c, d], beta=1000.0, form="paper"),
                            lambda a, b, c, d: ref_at_paper_pooled([a, b], [c, d], 1000.0), [s1, s2], [t1, t2])
    paper = at_loss([s1, s2], [t1, t2], form="paper")
    reference = at_loss([s1, s2], [t1, t2], form="reference")
    assert abs(float(paper / reference) - 1) > 0.01  # pooling before or after squaring is not the same map


def test_at_layer_weights_weigh_each_pair():
    s1, s2, t1, t2 = tensors((3, 4, 8, 8), (3, 8, 4, 4), (3, 16, 8, 8), (3, 32, 4, 4))
    same_value_and_gradient(lambda a, b, c, d: at_loss([a, b], [c, d], layer_weights=[0.5, 1.0]),
                            lambda a, b, c, d: 0.5 * at_loss(a, c) + at_loss(b, d), [s1, s2], [t1, t2])


# --- gradients -----------------------------------------------------------------------------


def test_grad_at_paper_form_is_beta_half_squared_distance_of_raw_gradients():
    """Zagoruyko & Komodakis 2017, eq. 3 (squared, as eq. 4 differentiates it): β/2 ‖J_S − J_T‖²₂."""
    j_s, j_t = tensors((3, 1, 8, 8), (3, 1, 8, 8))
    j_s, j_t = 1e-2 * j_s, 1e-2 * j_t  # the size of a batch-mean loss's input gradients
    same_value_and_gradient(lambda s, t: grad_at_loss(s, t, beta=3.0),
                            lambda s, t: 3.0 / 2 * sum(((a - b) ** 2).sum() for a, b in zip(s, t)), [j_s], [j_t])


def test_grad_at_normalized_form_is_kdhooks_own_unsquared_distance_of_unit_gradients():
    j_s, j_t = tensors((3, 1, 8, 8), (3, 1, 8, 8))

    def by_sample(s, t):
        return sum((a.flatten() / a.norm() - b.flatten() / b.norm()).norm() for a, b in zip(s, t)) / len(s)

    same_value_and_gradient(lambda s, t: grad_at_loss(s, t, beta=3.0, form="normalized"),
                            lambda s, t: 1.5 * by_sample(s, t), [j_s], [j_t])


def test_grad_at_paper_form_on_a_model_is_the_batch_gradients_distance():
    """Through the Distiller: J_S of the task loss kd() gets and J_T of the teacher's cross-entropy."""
    student, teacher = pair()
    x, y = batch(8)
    with kdhooks.Distiller(student, teacher, {"task_weight": 0, "terms": [{"kind": "grad_at", "beta": 2.0}]},
                           example_inputs=x[:2]) as kd:
        student.train()
        loss = kd(F.cross_entropy(student(x), y), labels=y)
    leaf_t, leaf_s = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (j_t,) = torch.autograd.grad(F.cross_entropy(teacher.eval()(leaf_t), y), leaf_t)
    (j_s,) = torch.autograd.grad(F.cross_entropy(student.train()(leaf_s), y), leaf_s)
    assert loss.item() == pytest.approx(float(((j_s - j_t) ** 2).sum()), rel=1e-5)


# --- sparsity ------------------------------------------------------------------------------


def ref_ab_authors(pre_s: list[torch.Tensor], pre_t: list[torch.Tensor], margin: float = 1.0) -> torch.Tensor:
    """bhheo/AB_distillation cifar10_AB_distillation.py (= RepDistiller ABLoss): layers ¼, ½, 1 shallow to deep,
    each Σ (s ± μ)² where the teacher's sign is not matched by a margin, / batch, all × 3/1000."""
    total = 0.0
    for depth, (s, t) in enumerate(zip(pre_s, pre_t)):
        off = ((s > -margin) & (t <= 0)).float() * (s + margin) ** 2
        on = ((s <= margin) & (t > 0)).float() * (s - margin) ** 2
        total = total + (off + on).sum() / len(s) / 2 ** (len(pre_s) - 1 - depth)
    return total / 1000 * 3


def test_ab_with_halving_and_weight_0_003_is_the_authors_loss():
    pre_s, pre_t = tensors((4, 4, 8, 8), (4, 8, 4, 4), (4, 16, 2, 2)), tensors((4, 4, 8, 8), (4, 8, 4, 4),
                                                                              (4, 16, 2, 2), seed=1)
    weights = resolve_layer_weights(None, "halving", 3)
    assert weights == [0.25, 0.5, 1.0]
    same_value_and_gradient(
        lambda a, b, c, d, e, f: 0.003 * sum(w * ab_loss(s, t) for w, s, t in zip(weights, (a, b, c), (d, e, f))),
        lambda a, b, c, d, e, f: ref_ab_authors([a, b, c], [d, e, f]), pre_s, pre_t)


# --- relations -----------------------------------------------------------------------------


def ref_fsp_repdistiller(g_s: list[torch.Tensor], g_t: list[torch.Tensor]) -> torch.Tensor:
    """RepDistiller distiller_zoo/FSP.py: per consecutive pair, G = mean over positions of bottom ⊗ top (the larger
    pooled to the smaller), loss = (G_S − G_T)² averaged over samples and entries; summed over pairs."""
    def fsp(bottom, top):
        size = min(bottom.shape[2], top.shape[2])
        bottom, top = F.adaptive_avg_pool2d(bottom, size), F.adaptive_avg_pool2d(top, size)
        return (bottom.flatten(2)[:, None] * top.flatten(2)[:, :, None]).mean(-1)
    return sum((fsp(a, b) - fsp(c, d)).pow(2).mean() for a, b, c, d in zip(g_s, g_s[1:], g_t, g_t[1:]))


def test_fsp_forms():
    g_s = tensors((3, 4, 8, 8), (3, 6, 4, 4), (3, 8, 2, 2))
    g_t = tensors((3, 4, 8, 8), (3, 6, 4, 4), (3, 8, 2, 2), seed=1)

    def ours(form):
        def loss(a, b, c, d, e, f):
            return fsp_loss([fsp_matrix(a, b), fsp_matrix(b, c)], [fsp_matrix(d, e), fsp_matrix(e, f)], form)
        return loss

    same_value_and_gradient(ours("reference"), lambda a, b, c, d, e, f: ref_fsp_repdistiller([a, b, c], [d, e, f]),
                            g_s, g_t)

    def paper(a, b, c, d, e, f):  # Yim et al. 2017: 1/N Σ_x Σ_i ‖G_i^T − G_i^S‖²₂, equal λ_i
        return sum(((fsp_matrix(p, q) - fsp_matrix(r, u)) ** 2).sum() / len(a)
                   for p, q, r, u in ((a, b, d, e), (b, c, e, f)))
    same_value_and_gradient(ours("paper"), paper, g_s, g_t)
    # pair i of the paper's form is the reference's × C1·C2 (4·6 and 6·8 entries here)
    same_value_and_gradient(
        lambda a, b, c, d, e, f: fsp_loss([fsp_matrix(a, b), fsp_matrix(b, c)], [fsp_matrix(d, e), fsp_matrix(e, f)],
                                          "paper", layer_weights=[1 / 24, 1 / 48]),
        lambda a, b, c, d, e, f: ref_fsp_repdistiller([a, b, c], [d, e, f]), g_s, g_t)


def ref_rkd_repdistiller(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller distiller_zoo/RKD.py RKDLoss (= lenscloth/RKD): distances over all N² entries (μ over d > 0),
    angles over all N³ entries, smooth-L1 means; returns (distance loss, angle loss)."""
    def distances(e):
        d = (e[:, None] - e[None]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
        d = d * (1 - torch.eye(len(e)))
        return d / d[d > 0].mean()

    def angles(e):
        unit = F.normalize(e[None] - e[:, None], dim=2)
        return torch.bmm(unit, unit.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(distances(s), distances(t)), F.smooth_l1_loss(angles(s), angles(t))


def ref_rkd_paper(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Park et al. 2019 with means over distinct pairs (i ≠ j) and distinct triplets, written as loops."""
    n = len(s)

    def dist(e, i, j):
        return (e[i] - e[j]).norm()

    pairs = [(i, j) for i, j in itertools.product(range(n), repeat=2) if i != j]
    mu_s = sum(dist(s, i, j) for i, j in pairs) / len(pairs)
    mu_t = sum(dist(t, i, j) for i, j in pairs) / len(pairs)
    distance = sum(F.smooth_l1_loss(dist(s, i, j) / mu_s, dist(t, i, j) / mu_t) for i, j in pairs) / len(pairs)

    def cos(e, i, j, k):
        return F.cosine_similarity(e[i] - e[j], e[k] - e[j], dim=0)

    triplets = [(i, j, k) for i, j, k in itertools.product(range(n), repeat=3) if len({i, j, k}) == 3]
    angle = sum(F.smooth_l1_loss(cos(s, i, j, k), cos(t, i, j, k)) for i, j, k in triplets) / len(triplets)
    return distance, angle


@pytest.mark.parametrize("form", ["paper", "reference"])
def test_rkd_forms(form):
    s, t = tensors((5, 6), (5, 9))
    reference = ref_rkd_paper if form == "paper" else ref_rkd_repdistiller
    same_value_and_gradient(lambda s, t: rkd_distance_loss(s, t, form), lambda s, t: reference(s, t)[0], [s], [t])
    same_value_and_gradient(lambda s, t: rkd_angle_loss(s, t, form), lambda s, t: reference(s, t)[1], [s], [t])


def test_rkd_reference_is_the_paper_form_times_the_documented_constants():
    n = 5
    s, t = tensors((n, 6), (n, 9))
    assert float(rkd_distance_loss(s, t, "reference")) == pytest.approx(
        float(rkd_distance_loss(s, t)) * (n - 1) / n, rel=1e-5)
    assert float(rkd_angle_loss(s, t, "reference")) == pytest.approx(
        float(rkd_angle_loss(s, t)) * (n - 1) * (n - 2) / n**2, rel=1e-5)


def ref_sp_repdistiller(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller distiller_zoo/SP.py Similarity.similarity_loss: ‖normalize(G_T) − normalize(G_S)‖²_F / b²."""
    g_s = F.normalize(f_s.flatten(1) @ f_s.flatten(1).T)
    g_t = F.normalize(f_t.flatten(1) @ f_t.flatten(1).T)
    return ((g_t - g_s) ** 2).sum() / len(f_s) ** 2


def test_sp_is_repdistillers_similarity_times_gamma():
    s, t = tensors((5, 4, 2, 2), (5, 16, 2, 2))
    same_value_and_gradient(lambda s, t: sp_loss(s, t, gamma=3000.0),
                            lambda s, t: 3000.0 * ref_sp_repdistiller(s, t), [s], [t])


def ref_pkt_authors(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """passalis/probabilistic_kt cosine_similarity_loss (= RepDistiller PKT): (cos + 1)/2 kernels, rows normalized
    with j = i kept, mean over all N² entries of p_t log((p_t + ε)/(p_s + ε))."""
    def probabilities(f):
        unit = f / (f.norm(dim=1, keepdim=True) + eps)
        kernel = (unit @ unit.T + 1) / 2
        return kernel / kernel.sum(1, keepdim=True)

    p_s, p_t = probabilities(f_s), probabilities(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def ref_pkt_paper(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Passalis & Tefas 2018: Σ_i Σ_{j≠i} p^t_{j|i} log(p^t_{j|i}/p^s_{j|i}), averaged over i, as loops."""
    n = len(f_s)

    def kernel(f, i, j):
        return (F.cosine_similarity(f[i], f[j], dim=0) + 1) / 2

    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        z_s, z_t = sum(kernel(f_s, i, j) for j in others), sum(kernel(f_t, i, j) for j in others)
        for j in others:
            p_s, p_t = kernel(f_s, i, j) / z_s, kernel(f_t, i, j) / z_t
            total = total + p_t * (torch.log(p_t + eps) - torch.log(p_s + eps))
    return total / n


@pytest.mark.parametrize("form", ["paper", "reference"])
def test_pkt_forms(form):
    s, t = tensors((6, 5), (6, 12))
    reference = ref_pkt_paper if form == "paper" else ref_pkt_authors
    same_value_and_gradient(lambda s, t: pkt_loss(s, t, form=form), reference, [s], [t])


# --- layer weights through the terms ----------------------------------------------------


STAGES = ["stage1", "stage2", "stage3"]
RELUS = ["stage1.2", "stage2.1.2", "stage3.1.2"]
MULTI_LAYER = {
    "at": {"kind": "at", "student": STAGES, "teacher": STAGES},
    "ab": {"kind": "ab", "student": RELUS, "teacher": RELUS},
    "mmd": {"kind": "mmd", "student": STAGES, "teacher": STAGES},
    "sp": {"kind": "sp", "student": STAGES, "teacher": STAGES},
    "fsp": {"kind": "fsp", "student": [["stage1", "stage2"], ["stage2", "stage3"], ["stage1", "stage3"]],
            "teacher": [["stage1", "stage2"], ["stage2", "stage3"], ["stage1", "stage3"]]},
}


def term_loss(term: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    student, teacher = pair()
    torch.manual_seed(7)  # the same connectors in every Distiller
    with kdhooks.Distiller(student, teacher, {"task_weight": 0, "terms": [term]}, example_inputs=x[:2]) as kd:
        student.train()
        kd(F.cross_entropy(student(x), y), labels=y)
        return kd.last_losses["total"]


@pytest.mark.parametrize("kind", list(MULTI_LAYER))
def test_halving_layer_weights_are_the_weighted_sum_of_each_pair(kind):
    x, y = batch(8)
    term = MULTI_LAYER[kind]
    halving = term_loss({**term, "layer_weights": "halving"}, x, y)
    alone = [term_loss({**term, "layer_weights": [float(i == k) for i in range(3)]}, x, y) for k in range(3)]
    assert halving == pytest.approx(0.25 * alone[0] + 0.5 * alone[1] + alone[2], rel=1e-5)
    assert term_loss(term, x, y) == pytest.approx(sum(alone), rel=1e-5)  # `equal`, the default


def test_layer_weights_of_the_wrong_length_are_a_config_error():
    student, teacher = pair()
    with pytest.raises(kdhooks.ConfigError, match="3 layer pairs and 2 layer_weights"):
        kdhooks.Distiller(student, teacher, {"terms": [{**MULTI_LAYER["at"], "layer_weights": [1.0, 2.0]}]},
                          example_inputs=batch(2)[0])
    with pytest.raises(kdhooks.ConfigError, match="layer_weights"):
        kdhooks.Distiller(student, teacher, {"terms": [{**MULTI_LAYER["at"], "layer_weights": [1.0, -1.0, 1.0]}]},
                          example_inputs=batch(2)[0])


def test_forms_are_options_with_their_names_checked():
    student, teacher = pair()
    with pytest.raises(kdhooks.ConfigError, match="form"):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "pkt", "student": "pool", "teacher": "pool",
                                                        "form": "repdistiller"}]}, example_inputs=batch(2)[0])


# --- NLP ---------------------------------------------------------------------------------


def ref_hid_mse(state_s: torch.Tensor, state_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TextBrewer losses.py hid_mse_loss with a mask: squared errors at real tokens / (real tokens × width)."""
    keep = mask[..., None].float()
    return (((state_s - state_t) ** 2) * keep).sum() / (keep.sum() * state_s.shape[-1])


def ref_att_mse(att_s: torch.Tensor, att_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TextBrewer losses.py att_mse_loss with a mask: squared errors over real (query, key) pairs, head by head."""
    keep = mask.float()[:, None, :, None] * mask.float()[:, None, None, :]
    return (((att_s - att_t) ** 2) * keep).sum() / (keep.sum() * att_s.shape[1])


def test_hidden_states_and_matched_attention_mse_are_textbrewers_masked_losses():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    h_s, h_t = tensors((2, 5, 6), (2, 5, 6))
    same_value_and_gradient(lambda s, t: hidden_states_loss(s, t, mask), lambda s, t: ref_hid_mse(s, t, mask),
                            [h_s], [h_t])
    a_s, a_t = (torch.softmax(a, -1) for a in tensors((2, 3, 5, 5), (2, 3, 5, 5)))
    same_value_and_gradient(lambda s, t: attention_maps_loss(s, t, mask, heads="matched"),
                            lambda s, t: ref_att_mse(s, t, mask), [a_s], [a_t])


def test_hidden_states_and_attention_maps_sum_over_layer_pairs_as_tinybert_and_textbrewer():
    from _hf import tiny_bert
    batch_ = {"input_ids": torch.randint(3, 40, (2, 8), generator=torch.Generator().manual_seed(0)),
              "attention_mask": torch.ones(2, 8, dtype=torch.long), "labels": torch.tensor([0, 1])}
    batch_["attention_mask"][1, 5:] = 0
    losses = {}
    for reduction in ("mean", "sum"):
        teacher, student = tiny_bert(4, 32, seed=1), tiny_bert(2, 16, seed=2)
        torch.manual_seed(3)
        config = {"task_weight": 0, "terms": [
            {"kind": "hidden_states", "embeddings": True, "reduction": reduction},
            {"kind": "attention_maps", "heads": "matched", "reduction": reduction}]}
        with kdhooks.Distiller(student, teacher, config, example_inputs=batch_) as kd:
            student.train()
            kd(student(**batch_).loss, labels=batch_["labels"], attention_mask=batch_["attention_mask"])
            losses[reduction] = kd.last_losses
    assert losses["sum"]["hidden_states"] == pytest.approx(3 * losses["mean"]["hidden_states"], rel=1e-5)
    assert losses["sum"]["attention_maps"] == pytest.approx(2 * losses["mean"]["attention_maps"], rel=1e-5)


def ref_trl_gkd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, beta: float,
                temperature: float) -> torch.Tensor:
    """TRL GKDTrainer.generalized_jsd_loss (reduction batchmean, labels masked): the mixture m = β·p_T + (1−β)·p_S,
    β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m) summed over the vocabulary, averaged over kept tokens; no T²."""
    log_s = torch.log_softmax(student_logits / temperature, -1)
    log_t = torch.log_softmax(teacher_logits / temperature, -1)
    log_m = torch.log(beta * log_t.exp() + (1 - beta) * log_s.exp())
    per_token = (beta * log_t.exp() * (log_t - log_m) + (1 - beta) * log_s.exp() * (log_s - log_m)).sum(-1)
    keep = labels != -100
    return per_token[keep].sum() / keep.sum()


def test_lm_kd_without_temperature_squared_is_trls_gkd_loss():
    from _hf import tiny_llama
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (2, 8), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    step = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    gradients = {}
    for convention in ("kdhooks", "trl"):
        teacher, student = tiny_llama(2, 32, seed=1), tiny_llama(1, 16, seed=2)
        with torch.no_grad():  # a sharp teacher: a divergence well above float32 rounding (near-uniform ones cancel)
            teacher.lm_head.weight.mul_(20)
        student.train()
        if convention == "kdhooks":
            config = {"task_weight": 0, "terms": [{"kind": "lm_kd", "divergence": "jsd", "beta": 0.3,
                                                   "temperature": 2.0, "temperature_squared": False}]}
            with kdhooks.Distiller(student, teacher, config, example_inputs={"input_ids": ids}) as kd:
                loss = kd(student(**step).loss, labels=labels, attention_mask=step["attention_mask"])
        else:  # TRL shifts the logits against the labels: position i predicts token i + 1
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits[:, :-1]
            loss = ref_trl_gkd(student(input_ids=ids).logits[:, :-1], teacher_logits, labels[:, 1:], 0.3, 2.0)
        loss.backward()
        gradients[convention] = (loss.item(), [p.grad.clone() for p in student.parameters()])
    assert gradients["kdhooks"][0] == pytest.approx(gradients["trl"][0], rel=1e-5)
    for mine, theirs in zip(gradients["kdhooks"][1], gradients["trl"][1]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()) + 1e-12)
