"""weights (plugins/weights.py): L2 between the teacher's parameters and the student's mapped through learned axis maps."""
import pytest
import torch

import kdhooks
from _models import pair
from kdhooks.plugins.weights import weights_loss


def test_weights_is_l2_through_learned_maps_of_output_and_input_axes():
    student, teacher = pair()
    paths = ["stage2.1.0.weight", "fc.weight"]
    with kdhooks.Distiller(student, teacher, {"task_weight": 0, "terms": [
            {"kind": "weights", "student": paths, "teacher": paths}]}) as kd:
        conv_map, fc_map = kd.parts.values()
        out_map, in_map = (m.weight for m in conv_map.axis_maps)
        w_s, w_t = student.stage2[1][0].weight, teacher.stage2[1][0].weight
        # (A_out W A_inᵀ)[o, i, kh, kw] = Σ_{a,b} A_out[o, a] W[a, b, kh, kw] A_in[i, b]
        mapped = torch.einsum("oa,abhw,ib->oihw", out_map, w_s, in_map)
        assert mapped.shape == w_t.shape
        conv_expected = ((mapped - w_t) ** 2).mean()
        torch.testing.assert_close(weights_loss(conv_map(w_s), w_t), conv_expected)
        # the classifiers have 10 outputs each: only the input axis (16 -> 64 features) is mapped
        assert isinstance(fc_map.axis_maps[0], torch.nn.Identity)
        fc_expected = ((student.fc.weight @ fc_map.axis_maps[1].weight.T - teacher.fc.weight) ** 2).mean()
        total = kd(None)  # parameters need no forward pass
        torch.testing.assert_close(total, conv_expected + fc_expected)
        total.backward()
        assert student.stage2[1][0].weight.grad.abs().sum() > 0 and out_map.grad.abs().sum() > 0
        assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("student_param, teacher_param, problem", [
    ("stage2.1.0.weight", "fc.weight", "rank-4 parameter cannot be mapped to a rank-2"),
    ("stage1.0.weight", "stage2.0.weight", "is not a parameter"),
])
def test_weights_of_layers_that_cannot_be_matched_is_a_config_error(student_param, teacher_param, problem):
    student, teacher = pair()
    with pytest.raises(kdhooks.ConfigError, match=problem):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "weights", "student": student_param,
                                                        "teacher": teacher_param}]})
