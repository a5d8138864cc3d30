"""at (activation attention, plugins/attention.py) against its formula, written out sample by sample."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdhooks.plugins.attention import at_loss


def attention_by_hand(feature, p=2):
    """Q = Σ_c |A_c|^p / C over positions, divided by its L2 norm (the paper's F^p_mean, normalized)."""
    maps = []
    for sample in feature:
        q = [sum(abs(float(sample[c].flatten()[k])) ** p for c in range(sample.shape[0])) / sample.shape[0]
             for k in range(sample[0].numel())]
        norm = math.sqrt(sum(v * v for v in q))
        maps.append([v / norm for v in q])
    return maps


def test_at_is_beta_half_times_mean_squared_map_difference_summed_over_pairs():
    g = torch.Generator().manual_seed(0)
    s1, t1 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    s2, t2 = torch.randn(2, 2, 2, 2, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    expected = 0.0
    for s, t in ((s1, t1), (s2, t2)):
        q_s, q_t = attention_by_hand(s), attention_by_hand(t)
        squares = [(a - b) ** 2 for row_s, row_t in zip(q_s, q_t) for a, b in zip(row_s, row_t)]
        expected += sum(squares) / len(squares)
    assert at_loss([s1, s2], [t1, t2]).item() == pytest.approx(1000 / 2 * expected, rel=1e-5)
    # tokens (N, L, D): the map is over the L tokens
    tokens_s, tokens_t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 8, generator=g)
    q_s, q_t = attention_by_hand(tokens_s.transpose(1, 2)), attention_by_hand(tokens_t.transpose(1, 2))
    squares = [(a - b) ** 2 for row_s, row_t in zip(q_s, q_t) for a, b in zip(row_s, row_t)]
    assert at_loss(tokens_s, tokens_t, beta=2.0).item() == pytest.approx(sum(squares) / len(squares), rel=1e-5)


def test_at_compares_maps_of_different_resolution_on_the_smaller_grid():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    teacher_map = teacher.pow(2).mean(1).reshape(2, 2, 2, 2, 2).mean((2, 4))  # mean of |f|², then 2x2 pooling
    expected = (F.normalize(student.pow(2).mean(1).flatten(1)) - F.normalize(teacher_map.flatten(1))).pow(2).mean()
    assert at_loss(student, teacher, beta=2.0).item() == pytest.approx(expected.item(), rel=1e-5)
