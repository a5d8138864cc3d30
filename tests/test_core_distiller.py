"""The Distiller: what it records, what it trains, what it leaves behind."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import kdhooks
from _models import TwoHeads, batch, pair
from kdhooks.demo import DigitsCNN
from kdhooks.plugins.logits import kd_loss

KD_FITNETS = {"task_weight": 0.5, "terms": [
    {"kind": "kd", "weight": 0.5, "temperature": 4},
    {"kind": "fitnets", "weight": 2.0, "student": "stage2", "teacher": "stage2"},
]}


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_captures_equal_the_modules_real_outputs_and_inputs():
    student, teacher = pair()
    x, _ = batch()
    taps = {"s_out": kdhooks.Tap("student", "stage2"), "s_in": kdhooks.Tap("student", "fc", kind="input"),
            "t_out": kdhooks.Tap("teacher", "stage3"), "t_logits": kdhooks.Tap("teacher", "logits")}
    with kdhooks.Distiller(student, teacher, {}) as kd:
        for where, tap in taps.items():
            kd.add_tap(tap, where)
        student.train()
        student(x)
        captures = dict(kd.captures)
    teacher.eval()  # the teacher ran in eval mode; the student in training mode (batch statistics)
    with torch.no_grad():
        s1 = student.stage1(x)
        stage2 = student.stage2(s1)
        fc_in = student.pool(student.stage3(stage2)).flatten(1)
        t3 = teacher.stage3(teacher.stage2(teacher.stage1(x)))
        t_logits = teacher.fc(teacher.pool(t3).flatten(1))
    torch.testing.assert_close(captures[taps["s_out"]], stage2, rtol=0, atol=1e-6)
    torch.testing.assert_close(captures[taps["s_in"]], fc_in, rtol=0, atol=1e-6)
    torch.testing.assert_close(captures[taps["t_out"]], t3, rtol=0, atol=1e-6)
    torch.testing.assert_close(captures[taps["t_logits"]], t_logits, rtol=0, atol=1e-6)
    assert captures[taps["s_out"]].requires_grad and not captures[taps["t_out"]].requires_grad


def test_selectors_and_capture_policy_for_a_module_called_twice():
    student, teacher = TwoHeads(), TwoHeads()
    x = torch.randn(4, 6)
    last, every = kdhooks.Tap("student", "trunk"), kdhooks.Tap("student", "trunk", policy="all")
    picked, logits = kdhooks.Tap("student", ":pair:1"), kdhooks.Tap("teacher", "logits")
    with kdhooks.Distiller(student, teacher, {}) as kd:
        for tap in (last, every, picked, logits):
            kd.add_tap(tap)
        out = student(x)
        captures = dict(kd.captures)
    assert len(captures[every]) == 2
    torch.testing.assert_close(captures[every][0], out["pair"][0])
    torch.testing.assert_close(captures[last], out["pair"][1])
    torch.testing.assert_close(captures[picked], out["pair"][1])
    torch.testing.assert_close(captures[logits], teacher(x)["logits"])


def test_gradients_reach_student_and_connector_never_teacher():
    student, teacher = pair()
    x, y = batch()
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        loss = kd(F.cross_entropy(student(x), y), labels=y)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in kd.connectors.parameters())
        assert student.stage1[0].weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in teacher.parameters())
        assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # given back as it was


def test_teacher_bit_identical_after_20_steps_batchnorm_included():
    student, teacher = pair()
    teacher.train()  # even a teacher left in training mode must not move its BatchNorm statistics
    before = copy.deepcopy(teacher.state_dict())
    x, y = batch(32)
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.1)
        for _ in range(20):
            loss = kd(F.cross_entropy(student(x), y), labels=y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert teacher.training  # its mode is given back too


def test_no_hook_left_after_close_or_an_exception():
    student, teacher = pair()
    x, y = batch()
    clean = hook_count(student), hook_count(teacher)
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]):
        assert hook_count(student) > clean[0]
    assert (hook_count(student), hook_count(teacher)) == clean
    with pytest.raises(RuntimeError, match="boom"):
        with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]):
            student(x)
            raise RuntimeError("boom")
    assert (hook_count(student), hook_count(teacher)) == clean
    with pytest.raises(kdhooks.ConfigError):
        kdhooks.Distiller(student, teacher, {"terms": [{"kind": "fitnets", "student": "stage2", "teacher": "nope"}]},
                          example_inputs=x[:2])
    assert (hook_count(student), hook_count(teacher)) == clean
    assert all(p.requires_grad for p in teacher.parameters())


def test_teacher_runs_only_while_the_student_trains_and_teacher_call_overrides():
    student, teacher = pair()
    x, _ = batch()
    calls = []

    def call(model, args, kwargs):
        calls.append(model.training)
        return model(*args, **kwargs)

    with kdhooks.Distiller(student, teacher, {"terms": [{"kind": "kd"}]}, teacher_call=call) as kd:
        student.eval()
        student(x)
        assert calls == [] and not kd.captures
        student.train()
        student(x)
        assert calls == [False]


def test_state_dict_round_trip_resumes_identical_losses():
    x, y = batch(16)
    config = {"terms": [{"kind": "kd", "temperature": {"schedule": "linear", "start": 6, "end": 2, "steps": 6}},
                        {"kind": "fitnets", "student": "stage2", "teacher": "stage2"}]}

    def run(steps, student, teacher, kd, optimizer):
        losses = []
        for _ in range(steps):
            loss = kd(F.cross_entropy(student(x), y), labels=y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(kd.last_losses)
        return losses

    student, teacher = pair()
    kd = kdhooks.Distiller(student, teacher, config, example_inputs=x[:2])
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.05, momentum=0.9)
    run(3, student, teacher, kd, optimizer)
    saved = copy.deepcopy((student.state_dict(), kd.state_dict(), optimizer.state_dict()))
    straight = run(3, student, teacher, kd, optimizer)
    kd.close()

    student2, teacher2 = pair()
    teacher2.load_state_dict(teacher.state_dict())
    kd2 = kdhooks.Distiller(student2, teacher2, config, example_inputs=x[:2])
    optimizer2 = torch.optim.SGD([*student2.parameters(), *kd2.parameters()], lr=0.05, momentum=0.9)
    student2.load_state_dict(saved[0])
    kd2.load_state_dict(saved[1])
    optimizer2.load_state_dict(saved[2])
    assert kd2.step == 3
    resumed = run(3, student2, teacher2, kd2, optimizer2)
    kd2.close()
    assert resumed == straight


def test_activation_checkpointing_does_not_overwrite_captures():
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(5, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=False))

    student, teacher = Checkpointed(), Checkpointed()
    x = torch.randn(4, 5)
    tap = kdhooks.Tap("student", "block")
    with kdhooks.Distiller(student, teacher, {}) as kd:
        kd.add_tap(tap)
        out = student(x)
        first = kd.captures[tap]
        out.sum().backward()  # the recomputation runs block's hooks again
        assert kd.captures[tap] is first


def test_wrapped_models_accept_the_unwrapped_names():
    student, teacher = pair()
    x, y = batch()
    wrapped = nn.DataParallel(student)  # on CPU it just calls the module; its paths start with 'module.'
    with kdhooks.Distiller(wrapped, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        loss = kd(F.cross_entropy(wrapped(x), y), labels=y)
        assert torch.isfinite(loss) and kd.last_losses["fitnets"] > 0


def test_nan_term_raises_loss_error_naming_term_and_step():
    student, teacher = pair()
    x, y = batch()
    with kdhooks.Distiller(student, teacher, {"terms": [{"kind": "kd"}]}) as kd:
        kd(F.cross_entropy(student(x), y))
        with pytest.raises(kdhooks.LossError, match=r"'kd' is nan at step 1"):
            kd(F.cross_entropy(student(x * float("nan")), y))
        student(x)
        with pytest.raises(kdhooks.LossError, match=r"'task' is inf at step 1"):
            kd(torch.tensor(float("inf")))  # the terms are finite: the task loss is named
    config = {"terms": [{"kind": "kd"}], "disable_plugins": ["guards"]}
    with kdhooks.Distiller(student, teacher, config) as kd:
        student(x)
        assert torch.isinf(kd(torch.tensor(float("inf"))))


def test_a_term_switched_off_keeps_its_connector_in_the_graph():
    student, teacher = pair()
    x, y = batch()
    config = {"terms": [{"kind": "fitnets", "student": "stage2", "teacher": "stage2",
                         "weight": {"schedule": "step", "milestones": [1], "values": [1.0, 0.0]}}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        kd(F.cross_entropy(student(x), y))
        assert kd.last_losses["fitnets"] > 0
        loss = kd(F.cross_entropy(student(x), y))
        assert kd.last_losses["fitnets"] == 0.0
        loss.backward()
        assert all(p.grad is not None for p in kd.connectors.parameters())


@pytest.mark.parametrize("terms", [KD_FITNETS["terms"],
                                   [{"kind": "one", "split": "stage2", "heads": ["stage3", "fc"], "branches": 2}]])
def test_a_copy_of_a_distilled_model_is_a_plain_model(terms, tmp_path):
    # EMA/SWA averages and born-again teachers deepcopy the model; torch.save(model) pickles it
    student, teacher = pair()
    x, y = batch()
    with kdhooks.Distiller(student, teacher, {"terms": terms}, example_inputs=x[:2]) as kd:
        average = torch.optim.swa_utils.AveragedModel(student)
        copied = copy.deepcopy(student)
        torch.save(student, tmp_path / "student.pt")
        pickled = torch.load(tmp_path / "student.pt", weights_only=False)
        for model in (copied, pickled, average.module):
            plain = DigitsCNN(width=4)  # the same weights, never hooked
            plain.load_state_dict(model.state_dict())
            plain.train(), model.train()
            torch.testing.assert_close(model(x), plain(x))
            assert not kd.captures  # the copy records nothing into the Distiller
        student.train()
        kd(F.cross_entropy(student(x), y), labels=y)  # the original still distills
        assert set(kd.last_losses) - {"task", "total"}


def test_a_compiled_student_distills_as_the_plain_one():
    # torch.compile wraps the model (paths gain '_orig_mod.') and dynamo traces the hooks; aot_eager
    # exercises both without inductor's minute of C++ compilation
    student, teacher = pair()
    x, y = batch()
    plain = copy.deepcopy(student)
    with kdhooks.Distiller(plain, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        plain.train()
        expected = kd(F.cross_entropy(plain(x), y), labels=y)
        connectors = kd.state_dict()
    compiled = torch.compile(student, backend="aot_eager")
    with kdhooks.Distiller(compiled, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        kd.load_state_dict(connectors)
        compiled.train()
        loss = kd(F.cross_entropy(compiled(x), y), labels=y)
        loss.backward()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert all(p.grad is not None for p in kd.parameters())
        assert all(p.grad is not None for p in student.parameters())
    assert hook_count(student) == 0
    compiled(x)  # after close: recompiled without the hooks, nothing recorded
    assert not kd.captures


def test_several_teachers_each_term_reading_its_own():
    student, wide = pair()
    torch.manual_seed(3)
    other = DigitsCNN(width=16)
    x, y = batch()
    config = {"task_weight": 0.0, "terms": [
        {"kind": "kd", "name": "kd_wide", "teacher_role": "wide", "weight": 0.3},
        {"kind": "kd", "name": "kd_other", "teacher_role": "other", "weight": 0.7},
        {"kind": "fitnets", "teacher_role": "other", "student": "stage2", "teacher": "stage2"}]}
    with kdhooks.Distiller(student, {"wide": wide, "other": other}, config, example_inputs=x[:2]) as kd:
        assert kd.connectors["fitnets"][0].out_channels == 32  # sized on the 'other' teacher (16 · 2)
        student.train()
        logits = student(x)
        kd(F.cross_entropy(logits, y), labels=y)
        with torch.no_grad():
            by_hand = {name: kd_loss(logits, teacher(x), 4.0).item() * weight
                       for name, teacher, weight in (("kd_wide", wide, 0.3), ("kd_other", other, 0.7))}
        assert kd.last_losses["kd_wide"] == pytest.approx(by_hand["kd_wide"], rel=1e-5)
        assert kd.last_losses["kd_other"] == pytest.approx(by_hand["kd_other"], rel=1e-5)
        assert not wide.training and not other.training
    config["terms"][0]["teacher_role"] = "wid"
    with pytest.raises(kdhooks.ConfigError) as error:
        kdhooks.Distiller(student, {"wide": wide, "other": other}, config, example_inputs=x[:2])
    assert error.value.location == "terms[0].teacher_role" and "'wide'" in str(error.value)
    assert hook_count(student) == hook_count(wide) == hook_count(other) == 0


# --- evaluation (issue #13) ---------------------------------------------------------------------


def train_steps(student, kd, x, y, steps, evaluate_between=None):
    """Losses of ``steps`` SGD steps; ``evaluate_between(kd)`` runs after each step."""
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.1)
    losses = []
    for _ in range(steps):
        student.train()
        loss = kd(F.cross_entropy(student(x), y), labels=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if evaluate_between is not None:
            evaluate_between(kd)
    return losses


def test_evaluating_gives_the_terms_on_eval_batches_without_changing_training():
    x, y = batch(16)
    x_eval, y_eval = x.flip(0) * 0.5, y.flip(0)
    student, teacher = pair()
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        plain = train_steps(student, kd, x, y, 3)
    measured = []

    def evaluate(kd):
        last, step = kd.last_losses, kd.step
        kd.student.eval()
        with torch.no_grad(), kd.evaluating():
            assert kd.is_evaluating and not kd.connectors.training
            logits = kd.student(x_eval)
            total = kd(F.cross_entropy(logits, y_eval), labels=y_eval)
            by_hand = kd_loss(logits, teacher(x_eval), 4.0).item()
            assert kd.last_raw_losses["kd"] == pytest.approx(by_hand, rel=1e-5)
            assert kd.last_losses["kd"] == pytest.approx(0.5 * by_hand, rel=1e-5)
            assert kd.last_losses["fitnets"] == pytest.approx(2.0 * kd.last_raw_losses["fitnets"], rel=1e-6)
            assert total.item() == pytest.approx(sum(v for k, v in kd.last_losses.items() if k != "total"), rel=1e-6)
            assert kd.step == step
            measured.append(kd.last_losses)
        assert not kd.is_evaluating and kd.connectors.training
        assert kd.step == step and kd.last_losses == last  # the training step's state is back

    student, teacher = pair()
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        assert train_steps(student, kd, x, y, 3, evaluate_between=evaluate) == plain
    assert len(measured) == 3 and measured[0] != measured[-1]


def test_evaluation_skips_the_step_end_and_keeps_a_training_forward_waiting_for_its_loss():
    x, y = batch(16)
    student, teacher = pair()
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        student.train()
        expected = kd(F.cross_entropy(student(x), y), labels=y).item()
        kd.step = 0
        logits = student(x)  # a training forward: its loss is asked for after the evaluation below
        student.eval()
        with torch.no_grad(), kd.evaluating():
            student(x * float("nan"))
            nan = kd(torch.tensor(0.0))  # the NaN guard is a step-end hook: evaluation reports, never raises
            assert torch.isnan(nan)
        student.train()
        assert kd(F.cross_entropy(logits, y), labels=y).item() == pytest.approx(expected, rel=1e-6)
        assert kd.step == 1


def test_a_failure_inside_evaluating_leaves_the_distiller_ready_to_train():
    x, y = batch(16)
    student, teacher = pair()
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        plain = train_steps(student, kd, x, y, 2)
    student, teacher = pair()
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        first = train_steps(student, kd, x, y, 1)
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), kd.evaluating():
            student.eval()
            student(x)
            raise RuntimeError("boom")
        with pytest.raises(kdhooks.LossError, match="cannot be concatenated"), torch.no_grad(), kd.evaluating():
            student(x)
            kd(F.cross_entropy(student(x[..., :4]), y), labels=y)  # two forwards whose features differ in size
        assert not kd.is_evaluating and kd.step == 1 and not kd.captures and kd.connectors.training
        assert first + train_steps(student, kd, x, y, 1) == plain


def test_terms_that_cannot_be_evaluated_are_left_out_with_one_note():
    x, y = batch(16)
    student, teacher = pair()
    config = {"terms": [{"kind": "kd"}, {"kind": "grad_at", "student": "", "teacher": ""},
                        {"kind": "fitnets", "student": "stage2", "teacher": "stage2",
                         "weight": {"schedule": "step", "milestones": [1], "values": [0.0, 1.0]}}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        student.train()
        kd(F.cross_entropy(student(x), y), labels=y).backward()
        assert "grad_at" in kd.last_raw_losses and "fitnets" not in kd.last_raw_losses  # weight 0: not computed
        student.eval()
        with pytest.warns(UserWarning, match=r"'grad_at' .* left out of evaluation: it reads gradients "
                                             r"\(dL/dx\) at the student's input and the teacher's input") as notes:
            for _ in range(2):
                with torch.no_grad(), kd.evaluating():
                    parts = kd.loss_parts(F.cross_entropy(student(x), y), labels=y)
                    raw = kd.last_raw_losses
        assert len([n for n in notes if "left out of evaluation" in str(n.message)]) == 1
        assert set(parts) == {"task", "kd", "fitnets"} and set(raw) == {"kd", "fitnets"}  # at step 1: weight 1
        student.train()
        kd(F.cross_entropy(student(x), y), labels=y)
        assert {"grad_at", "fitnets"} <= set(kd.last_raw_losses)


def test_teacher_cache_in_evaluation_runs_the_teacher_and_stores_nothing(tmp_path):
    x, y = batch(16)
    student, teacher = pair()
    runs = []
    teacher.register_forward_hook(lambda module, args, output: runs.append(True))
    config = {"terms": [{"kind": "kd"}, {"kind": "teacher_cache", "path": str(tmp_path)}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        for _ in range(2):
            student.train()
            kd(F.cross_entropy(student(x), y), labels=y)
        assert len(runs) == 2 and kd.last_metrics["teacher_cache.hit_rate"] == 1.0  # dry pass, epoch 1
        samples, metrics = kd.last_metrics["teacher_cache.samples"], dict(kd.last_metrics)
        student.eval()
        with torch.no_grad(), kd.evaluating():
            logits = student(x)
            kd(F.cross_entropy(logits, y), labels=y)
            assert kd.last_raw_losses["kd"] == pytest.approx(kd_loss(logits, teacher(x), 4.0).item(), rel=1e-5)
        assert len(runs) == 4  # the teacher ran on the eval batch (and once by hand)
        assert kd.last_metrics == metrics
        student.train()
        kd(F.cross_entropy(student(x), y), labels=y)
        assert kd.last_metrics["teacher_cache.samples"] == samples and len(runs) == 4  # served, nothing new stored


def test_a_not_evaluable_term_is_left_out_and_still_trains():
    x, y = batch(16)
    student, teacher = pair()
    config = {"terms": [{"kind": "one", "split": "stage2", "heads": ["stage3", "fc"], "branches": 2}]}
    with kdhooks.Distiller(student, None, config, example_inputs=x[:2]) as kd:
        student.eval()
        with pytest.warns(UserWarning, match="'one' .* left out of evaluation: its branches run only in training"):
            with torch.no_grad(), kd.evaluating():
                assert set(kd.loss_parts(F.cross_entropy(student(x), y), labels=y)) == {"task"}
        student.train()
        kd(F.cross_entropy(student(x), y), labels=y)
        assert set(kd.last_raw_losses) == {"one.ce", "one.kd"}


def test_on_policy_in_a_loop_that_does_not_generate_is_an_error_not_off_policy_training():
    student, teacher = pair()
    x, y = batch()
    config = {"on_policy": {"lmbda": 1.0}, "terms": [{"kind": "kd"}]}
    with kdhooks.Distiller(student, teacher, config, example_inputs=x[:2]) as kd:
        student.train()
        out = student(x)
        with pytest.raises(kdhooks.ConfigError, match="does not generate them") as error:
            kd(F.cross_entropy(out, y), labels=y)
        assert error.value.location == "on_policy" and "applies_on_policy" in error.value.fix
        kd.applies_on_policy = True  # a loop that generates the batches itself says so
        out = student(x)
        assert kd(F.cross_entropy(out, y), labels=y).requires_grad
