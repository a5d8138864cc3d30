"""fsp, rkd, sp and pkt against their published formulas, written out with loops over samples."""
import math
from itertools import permutations

import pytest
import torch
import torch.nn.functional as F

import kdhooks
from _models import batch, pair
from kdhooks.plugins.relations import (fsp_loss, fsp_matrix, pkt_loss, rkd_angle_loss, rkd_distance_loss, rkd_loss,
                                       sp_loss)


def features(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


def huber(a, b):
    difference = abs(a - b)
    return 0.5 * difference**2 if difference < 1 else difference - 0.5


def test_fsp_matrix_and_loss_by_hand():
    first, second = features((2, 3, 4, 4), (2, 5, 2, 2))
    pooled = first.reshape(2, 3, 2, 2, 2, 2).mean((3, 5))  # the larger map averaged to the 2x2 grid
    matrix = fsp_matrix(first, second)
    for n in range(2):
        for i in range(3):
            for j in range(5):
                by_hand = sum(float(pooled[n, i, s, t] * second[n, j, s, t]) for s in range(2) for t in range(2)) / 4
                assert matrix[n, i, j].item() == pytest.approx(by_hand, rel=1e-5)
    tokens_a, tokens_b = features((2, 6, 3), (2, 6, 4), seed=1)
    assert fsp_matrix(tokens_a, tokens_b)[1, 2, 3].item() == pytest.approx(
        float((tokens_a[1, :, 2] * tokens_b[1, :, 3]).sum()) / 6, rel=1e-5)
    s1, s2, t1, t2 = features((3, 2, 4), (3, 2, 4), (3, 2, 4), (3, 2, 4), seed=2)
    expected = sum(float((t - s).pow(2).sum()) for pair_s, pair_t in ((s1, t1), (s2, t2)) for s, t in zip(pair_s, pair_t)) / 3
    assert fsp_loss([s1, s2], [t1, t2]).item() == pytest.approx(expected, rel=1e-5)


def distance_potentials(x):
    n = len(x)
    distances = {(i, j): float((x[i] - x[j]).norm()) for i in range(n) for j in range(n) if i != j}
    mu = sum(distances.values()) / len(distances)
    return {k: v / mu for k, v in distances.items()}


def angle_potentials(x):
    n = len(x)
    angles = {}
    for i, j, k in permutations(range(n), 3):
        e_ij, e_kj = x[i] - x[j], x[k] - x[j]
        angles[(i, j, k)] = float(e_ij @ e_kj / (e_ij.norm() * e_kj.norm()))
    return angles


def test_rkd_distance_and_angle_by_hand():
    student, teacher = features((5, 3, 2, 2), (5, 7), seed=3)
    flat = student.flatten(1)
    d_s, d_t = distance_potentials(flat), distance_potentials(teacher)
    distance = sum(huber(d_s[k], d_t[k]) for k in d_s) / len(d_s)
    a_s, a_t = angle_potentials(flat), angle_potentials(teacher)
    angle = sum(huber(a_s[k], a_t[k]) for k in a_s) / len(a_s)
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(distance, rel=1e-4)
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(angle, rel=1e-4)
    assert rkd_loss(student, teacher).item() == pytest.approx(25 * distance + 50 * angle, rel=1e-4)
    # a large gap between potentials is in the Huber's linear part
    assert rkd_distance_loss(student * torch.tensor([1, 1, 1, 1, 30.0])[:, None, None, None], teacher).item() > 0.3


def test_sp_by_hand():
    student, teacher = features((4, 3, 2, 2), (4, 10), seed=4)

    def normalized_similarities(x):
        flat = x.flatten(1)
        g = flat @ flat.T
        return [[float(g[i, j]) / math.sqrt(sum(float(v) ** 2 for v in g[i])) for j in range(4)] for i in range(4)]

    g_s, g_t = normalized_similarities(student), normalized_similarities(teacher)
    expected = 3000 / 16 * sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(4) for j in range(4))
    assert sp_loss(student, teacher).item() == pytest.approx(expected, rel=1e-4)
    assert sp_loss([student, student], [teacher, teacher], gamma=1.0).item() == pytest.approx(2 * expected / 3000, rel=1e-4)


def test_pkt_by_hand():
    student, teacher = features((4, 6), (4, 2, 3), seed=5)

    def conditionals(x):
        flat = x.flatten(1)
        kernel = [[0.5 * (float(F.cosine_similarity(flat[i], flat[j], dim=0)) + 1) for j in range(4)] for i in range(4)]
        return [[kernel[i][j] / sum(kernel[i][k] for k in range(4) if k != i) for j in range(4)] for i in range(4)]

    p_s, p_t = conditionals(student), conditionals(teacher)
    expected = sum(p_t[i][j] * math.log(p_t[i][j] / p_s[i][j]) for i in range(4) for j in range(4) if j != i) / 4
    assert pkt_loss(student, teacher).item() == pytest.approx(expected, rel=1e-4)
    assert pkt_loss(teacher, teacher).item() == pytest.approx(0, abs=1e-6)


def test_relation_terms_in_a_distiller():
    student, teacher = pair()
    x, y = batch()
    config = {"task_weight": 0, "terms": [
        {"kind": "rkd", "student": "pool", "teacher": "pool"},
        {"kind": "sp", "student": ["stage2", "stage3"], "teacher": ["stage2", "stage3"]},
        {"kind": "pkt", "student": "pool", "teacher": "pool"},
        {"kind": "fsp", "student": [["stage1", "stage2"], ["stage2", "stage3"]],
         "teacher": [["stage1", "stage2"], ["stage2", "stage3"]]},
    ]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        student.train()
        kd(F.cross_entropy(student(x), y), labels=y)
        losses = kd.last_losses
        # channels differ (4/8/16 vs 8/16/32): FSP maps each student layer to the teacher's width, once per layer
        assert len(kd.connectors) == 3
        connectors = dict(zip(["stage1", "stage2", "stage3"], kd.connectors.values()))
        teacher.eval()
        with torch.no_grad():
            s1 = student.stage1(x)
            s2 = student.stage2(s1)
            s3 = student.stage3(s2)
            t1 = teacher.stage1(x)
            t2 = teacher.stage2(t1)
            t3 = teacher.stage3(t2)
            s_fsp = [fsp_matrix(connectors["stage1"](s1), connectors["stage2"](s2)),
                     fsp_matrix(connectors["stage2"](s2), connectors["stage3"](s3))]
            expected_fsp = fsp_loss(s_fsp, [fsp_matrix(t1, t2), fsp_matrix(t2, t3)])
    assert set(losses) == {"task", "rkd.distance", "rkd.angle", "sp", "pkt", "fsp", "total"}
    assert losses["rkd.distance"] == pytest.approx(25 * rkd_distance_loss(student.pool(s3), teacher.pool(t3)).item(), rel=1e-4)
    assert losses["sp"] == pytest.approx(sp_loss([s2, s3], [t2, t3]).item(), rel=1e-4)
    assert losses["fsp"] == pytest.approx(expected_fsp.item(), rel=1e-4)


def test_fsp_pairs_that_cannot_work_are_config_errors():
    student, teacher = pair()
    x = batch(2)[0]
    with pytest.raises(kdhooks.ConfigError, match="an FSP matrix needs two conv maps or two token features"):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "fsp", "student": [["stage3", "fc"]],
                                                        "teacher": [["stage3", "stage3"]]}]}, example_inputs=x)
    with pytest.raises(kdhooks.ConfigError, match="got 2 and 1"):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "fsp", "student": [["stage1", "stage2"]] * 2,
                                                        "teacher": [["stage1", "stage2"]]}]}, example_inputs=x)
