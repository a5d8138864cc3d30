"""Any numeric option, and the task weight, follows its schedule step by step (kdhooks/_schedule.py)."""
import torch.nn.functional as F

import kdhooks
from _models import batch, pair


def test_any_numeric_option_and_the_task_weight_follow_their_schedule():
    student, teacher = pair()
    x, y = batch()
    config = {"task_weight": {"schedule": "step", "milestones": [2], "values": [0, 1]},
              "terms": [{"kind": "kd", "temperature": {"schedule": "linear", "start": 5, "end": 1, "steps": 4}}]}
    seen = []
    with kdhooks.Distiller(student, teacher, config) as kd:
        for _ in range(5):
            kd(F.cross_entropy(student(x), y))
            seen.append((kd.terms[0].temperature, kd.last_losses["task"]))
    assert [t for t, _ in seen] == [5, 4, 3, 2, 1]
    assert seen[0][1] == 0 and seen[1][1] == 0 and seen[2][1] > 0
