"""Self and online distillation: DML, ONE, BYOT and born-again networks (plugins/self_distillation.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from kdhooks.demo import KD_CONFIG, DigitsCNN, digits_tensors, train
from kdhooks.plugins.self_distillation import (BeYourOwnTeacher, DeepMutualLearning, OnTheFlyNativeEnsemble,
                                               born_again, byot_loss, dml_losses, early_exit, exit_logits,
                                               gated_ensemble, one_loss)
from _models import batch


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def kl_by_hand(student_logits, teacher_logits, T):
    """Σ_c p_t (log p_t − log p_s), mean over samples, times T²."""
    p_t = torch.softmax(teacher_logits / T, 1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(student_logits / T, 1))).sum(1).mean() * T * T


def touched(loss, modules):
    """Which of ``modules`` (by name) get a non-zero gradient from ``loss``."""
    names = list(modules)
    params = [list(m.parameters()) for m in modules.values()]
    grads = torch.autograd.grad(loss, [p for ps in params for p in ps], retain_graph=True, allow_unused=True)
    result, i = set(), 0
    for name, ps in zip(names, params):
        if any(g is not None and g.abs().sum() > 0 for g in grads[i:i + len(ps)]):
            result.add(name)
        i += len(ps)
    return result


def parts_of(kd, task_loss, labels):
    """The terms' weighted parts as tensors (kd() only keeps floats)."""
    ctx = kdhooks.LossContext(kd, task_loss, {"labels": labels})
    return {k: v for term in kd.terms for k, v in term.kdhooks_losses(ctx=ctx).items()}


# --- deep mutual learning ---------------------------------------------------------------

def test_dml_losses_are_the_mean_kl_to_the_other_detached_networks():
    logits = [torch.randn(6, 5, requires_grad=True) for _ in range(3)]
    losses = dml_losses(logits, temperature=2.0)
    for k in range(3):
        others = [kl_by_hand(logits[k], logits[j].detach(), 2.0) for j in range(3) if j != k]
        torch.testing.assert_close(losses[k], sum(others) / 2, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(losses[k], logits, allow_unused=True, retain_graph=True)
        assert [g is not None for g in grads] == [j == k for j in range(3)]


def test_dml_term_adds_each_peers_task_and_mimicry_and_only_its_own_gradient():
    torch.manual_seed(0)
    student, wide = DigitsCNN(width=4), DigitsCNN(width=8)
    keys = list(student.state_dict())
    x, y = batch(16)
    term = DeepMutualLearning(peers={"wide": wide}, copies=1, temperature=2.0)
    with kdhooks.Distiller(student, None, {"terms": [term]}, example_inputs=x[:2]) as kd:
        twin = kd.model("peer1")
        assert kd.is_trainable("wide") and kd.peers["peer1"] is twin
        assert {id(p) for p in kd.parameters()} == {id(p) for p in [*wide.parameters(), *twin.parameters()]}
        assert any((a != b).any() for a, b in zip(student.parameters(), twin.parameters()))  # a new init
        student.train()
        s_logits = student(x)
        task = F.cross_entropy(s_logits, y)
        parts = parts_of(kd, task, y)
        assert touched(parts["dml"], {"student": student, "wide": wide, "twin": twin}) == {"student"}
        assert touched(parts["dml.wide"], {"student": student, "wide": wide, "twin": twin}) == {"wide"}
        assert touched(parts["dml.peer1"], {"student": student, "wide": wide, "twin": twin}) == {"twin"}
        total = kd(task, labels=y)
        w_logits, t_logits = wide(x), twin(x)  # training mode: the same batch statistics as in the step
    nets = [s_logits.detach(), w_logits.detach(), t_logits.detach()]
    mimicry = [sum(kl_by_hand(nets[k], nets[j], 2.0) for j in range(3) if j != k) / 2 for k in range(3)]
    expected = {"dml": mimicry[0], "dml.wide": F.cross_entropy(nets[1], y) + mimicry[1],
                "dml.peer1": F.cross_entropy(nets[2], y) + mimicry[2]}
    for name, value in expected.items():
        assert kd.last_losses[name] == pytest.approx(value.item(), rel=1e-4)
    assert total.item() == pytest.approx(task.item() + sum(v.item() for v in expected.values()), rel=1e-4)
    assert hook_count(student) == 0 and list(student.state_dict()) == keys


def test_dml_from_yaml_needs_a_peer_and_trains_its_copies_with_the_users_optimizer():
    with pytest.raises(kdhooks.ConfigError, match="copies"):
        kdhooks.Distiller(DigitsCNN(width=4), None, "terms: [{kind: dml}]")
    x, y, _, _ = digits_tensors(0)
    student = DigitsCNN(width=4)
    kd = kdhooks.Distiller(student, None, "terms: [{kind: dml, copies: 2}]", example_inputs=x[:2])
    peer = kd.model("peer2")
    before = copy.deepcopy(peer.state_dict())
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.1)
    for start in range(0, 256, 64):
        xb, yb = x[start:start + 64], y[start:start + 64]
        loss = kd(F.cross_entropy(student(xb), yb), labels=yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    kd.close()
    assert set(kd.last_losses) == {"task", "dml", "dml.peer1", "dml.peer2", "total"}
    assert any((before[k] != v).any() for k, v in peer.state_dict().items())


# --- ONE ------------------------------------------------------------------------------

def one_by_hand(student, term, x, training):
    """Branch logits (m, N, K) and gate (N, m) computed without hooks, BN written out for the gate."""
    trunk = student.stage2(student.stage1(x))
    branches = [(student.stage3, student.fc), *term.branched.copies]
    logits = torch.stack([fc(student.pool(stage3(trunk)).flatten(1)) for stage3, fc in branches])
    linear, norm, _ = term.gate
    h = linear(trunk.mean((2, 3)))
    mean, var = (h.mean(0), h.var(0, unbiased=False)) if training else (norm.running_mean, norm.running_var)
    gate = torch.softmax(torch.relu((h - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias), 1)
    return logits, gate


def test_one_equals_a_hand_computation_and_the_model_answers_with_branch_zero():
    torch.manual_seed(0)
    student = DigitsCNN(width=4)
    x, y = batch(12)
    term = OnTheFlyNativeEnsemble(split="stage2", heads=["stage3", "fc"], branches=3, temperature=2.0)
    with kdhooks.Distiller(student, None, {"terms": [term]}, example_inputs=x[:2]) as kd:
        student.train()
        out = student(x)
        total = kd(F.cross_entropy(out, y), labels=y)
        with torch.no_grad():
            z, g = one_by_hand(student, term, x, training=True)
    torch.testing.assert_close(out.detach(), z[0], rtol=1e-5, atol=1e-6)
    ensemble = (g.T.unsqueeze(-1) * z).sum(0)
    torch.testing.assert_close(gated_ensemble(z, g), ensemble, rtol=1e-5, atol=1e-6)
    ce = F.cross_entropy(z[1], y) + F.cross_entropy(z[2], y) + F.cross_entropy(ensemble, y)
    kd_part = sum(kl_by_hand(z[i], ensemble, 2.0) for i in range(3))
    assert kd.last_losses["one.ce"] == pytest.approx(ce.item(), rel=1e-4)
    assert kd.last_losses["one.kd"] == pytest.approx(kd_part.item(), rel=1e-4)
    assert total.item() == pytest.approx(F.cross_entropy(z[0], y).item() + ce.item() + kd_part.item(), rel=1e-4)
    assert total.item() == pytest.approx(one_loss(z, g, y, 2.0).item(), rel=1e-4)


def test_one_gradients_and_eval_modes_and_nothing_left_on_the_model():
    torch.manual_seed(0)
    student = DigitsCNN(width=4)
    own_hook = student.fc.register_forward_hook(lambda *a: None)  # the user's own hook must survive
    keys, hooks = list(student.state_dict()), hook_count(student)
    x, y = batch(12)
    term = OnTheFlyNativeEnsemble(split="stage2", heads=["stage3", "fc"], branches=3, inference="ensemble")
    kd = kdhooks.Distiller(student, None, {"terms": [term]}, example_inputs=x[:2])
    student.train()
    task = F.cross_entropy(student(x), y)
    parts = parts_of(kd, task, y)
    modules = {"trunk": student.stage1, "head": student.fc, "copies": term.branched.copies, "gate": term.gate}
    assert touched(task, modules) == {"trunk", "head"}
    assert touched(parts["one.kd"], modules) == {"trunk", "head", "copies"}  # the ensemble teacher is detached
    assert touched(parts["one.ce"], modules) == {"trunk", "head", "copies", "gate"}
    assert list(student.state_dict()) == keys
    student.eval()
    with torch.no_grad():
        answer = student(x)  # the copies and the gate follow the model into eval mode
        assert not term.gate.training and not term.branched.copies.training
        z, g = one_by_hand(student, term, x, training=False)
        torch.testing.assert_close(answer, gated_ensemble(z, g), rtol=1e-5, atol=1e-6)
        term.inference = "branch"
        torch.testing.assert_close(student(x), z[0], rtol=1e-5, atol=1e-6)
    kd.close()
    assert hook_count(student) == hooks and list(student.state_dict()) == keys
    student.train()
    assert student(x).shape == (12, 10)
    own_hook.remove()


@pytest.mark.parametrize("options, location", [
    ({"heads": ["stage3", "fcc"]}, "terms[0].heads"),
    ({"heads": ["stage3", "stage3.1"]}, "terms[0].heads"),
    ({"heads": ["fc"], "branches": 1}, "terms[0].branches"),
    ({"split": "stage9", "heads": ["fc"]}, "terms[0].split"),
])
def test_one_reports_bad_split_heads_and_branches(options, location):
    config = {"terms": [{"kind": "one", "split": "stage2", **options}]}
    student = DigitsCNN(width=4)
    with pytest.raises(kdhooks.ConfigError) as error:
        kdhooks.Distiller(student, None, config, example_inputs=batch(2)[0])
    assert error.value.location == location
    assert hook_count(student) == 0


# --- Be Your Own Teacher ------------------------------------------------------------------

def test_byot_equals_the_papers_formula_and_its_gradients_stay_shallow():
    torch.manual_seed(0)
    student = DigitsCNN(width=4)
    keys = list(student.state_dict())
    x, y = batch(12)
    term = BeYourOwnTeacher(stages=["stage1", "stage2"], classifier="fc", temperature=2.0, alpha=0.3,
                            hint_weight=0.5)
    with kdhooks.Distiller(student, None, {"terms": [term]}, example_inputs=x[:2]) as kd:
        assert [type(m) for m in kd.parts["byot"]] == [type(h) for h in term.exits().values()]
        student.train()
        task = F.cross_entropy(student(x), y)
        parts = parts_of(kd, task, y)
        modules = {"stage1": student.stage1, "stage2": student.stage2, "stage3": student.stage3,
                   "fc": student.fc, "head1": term.heads[0], "head2": term.heads[1]}
        assert touched(parts["byot.stage1"], modules) == {"stage1", "head1"}
        assert touched(parts["byot.stage2"], modules) == {"stage1", "stage2", "head2"}
        kd(task, labels=y)
        with torch.no_grad():
            f1 = student.stage1(x)
            f2 = student.stage2(f1)
            deepest_feature = student.pool(student.stage3(f2)).flatten(1)
            deepest = student.fc(deepest_feature)
            for path, f, head in (("stage1", f1, term.heads[0]), ("stage2", f2, term.heads[1])):
                feature = head.feature(f)
                logits = head.classifier(feature)
                expected = (0.7 * F.cross_entropy(logits, y) + 0.3 * kl_by_hand(logits, deepest, 2.0)
                            + 0.5 * ((feature - deepest_feature) ** 2).mean())
                assert kd.last_losses[f"byot.{path}"] == pytest.approx(expected.item(), rel=1e-4)
                assert byot_loss(logits, feature, deepest, deepest_feature, y, 2.0, 0.3, 0.5).item() == \
                    pytest.approx(expected.item(), rel=1e-5)
    assert hook_count(student) == 0 and list(student.state_dict()) == keys


def test_byot_heads_serve_early_exit_after_close():
    torch.manual_seed(0)
    student = DigitsCNN(width=4)
    x, y = batch(10)
    term = BeYourOwnTeacher(stages=["stage1", "stage2"], classifier="fc")
    kdhooks.Distiller(student, None, {"terms": [term]}, example_inputs=x[:2]).close()
    exits = term.exits()
    for module in (student, *exits.values()):
        module.eval()
    with torch.no_grad():
        f1 = student.stage1(x)
        expected = {"stage1": exits["stage1"](f1), "stage2": exits["stage2"](student.stage2(f1)), "": student(x)}
    found = exit_logits(student, exits, x)
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value)
    fc_calls = []
    counter = student.fc.register_forward_hook(lambda *a: fc_calls.append(1))
    prediction, index = early_exit(student, exits, x, threshold=0.0)  # every sample leaves at the first head
    assert (index == 0).all() and torch.equal(prediction, expected["stage1"].argmax(1)) and not fc_calls
    prediction, index = early_exit(student, exits, x, threshold=1.01)  # none does
    assert (index == 2).all() and torch.equal(prediction, expected[""].argmax(1)) and fc_calls
    threshold = expected["stage2"].softmax(1).amax(1).median().item()
    prediction, index = early_exit(student, exits, x, threshold=threshold)
    for i in range(len(x)):
        sure = [float(expected[p][i].softmax(0).max()) >= threshold for p in ("stage1", "stage2")] + [True]
        first = sure.index(True)
        assert index[i] == first
        assert prediction[i] == expected[["stage1", "stage2", ""][first]][i].argmax()
    counter.remove()
    assert hook_count(student) == 0


# --- born-again networks ------------------------------------------------------------------

def test_born_again_trains_each_generation_from_a_new_model_taught_by_the_last():
    x, y, x_test, y_test = digits_tensors(0)
    x, y = x[:192], y[:192]
    made, calls = [], []

    def make_model():
        model = DigitsCNN(width=4)
        made.append(copy.deepcopy(model.state_dict()))
        return model

    def train_generation(model, teacher):
        teacher_state = copy.deepcopy(teacher.state_dict()) if teacher is not None else None
        calls.append((model, teacher))
        trained = train(model, x, y, teacher=teacher, config=KD_CONFIG if teacher is not None else None, epochs=1)
        if teacher is not None:  # the teacher is used, never changed
            assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
        return trained

    result = born_again(make_model, train_generation, generations=2,
                        evaluate=lambda m: (m.eval()(x_test).argmax(1) == y_test).float().mean().item())
    assert len(result.models) == 3 and [t for _, t in calls] == [None, result.models[0], result.models[1]]
    assert all(not torch.equal(made[i]["fc.weight"], made[j]["fc.weight"]) for i in range(3) for j in range(i))
    assert set(result.scores) == {"S0", "S1", "S2", "ensemble"}
    ensemble = result.ensemble().eval()
    with torch.no_grad():
        probs = torch.stack([m.eval()(x_test).softmax(1) for m in result.models[1:]]).mean(0)
        torch.testing.assert_close(ensemble(x_test), probs.log())
    assert result.scores["ensemble"] == pytest.approx((probs.argmax(1) == y_test).float().mean().item())


def test_on_close_runs_plugin_cleanups_once():
    student = DigitsCNN(width=4)
    kd = kdhooks.Distiller(student, None, {})
    ran = []
    kd.on_close(lambda: ran.append("first"))
    kd.on_close(lambda: ran.append("second"))
    kd.close()
    kd.close()
    assert ran == ["second", "first"]
    with pytest.raises(RuntimeError, match="closed"):
        kd.on_close(lambda: None)


class DictOutput(nn.Module):
    """Token features (N, L, D), a head on the mean token, and a dict output with a non-batch entry."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU())
        self.classifier = nn.Linear(8, 4)

    def forward(self, tokens):
        hidden = self.block(self.embed(tokens))
        return {"logits": self.classifier(hidden.mean(1)), "hidden": hidden, "scale": torch.ones(2)}


def test_one_branches_a_token_model_with_a_dict_output():
    torch.manual_seed(0)
    model = DictOutput()
    tokens, y = torch.randn(6, 5, 3), torch.randint(0, 4, (6,))
    config = {"terms": [{"kind": "one", "split": "embed", "heads": ["block", "classifier"], "branches": 2}]}
    with kdhooks.Distiller(model, None, config, example_inputs=tokens[:2]) as kd:
        term = kd.terms[0]
        model.train()
        out = model(tokens)
        assert out["logits"].shape == (6, 4) and out["hidden"].shape == (6, 5, 8) and out["scale"].shape == (2,)
        kd(F.cross_entropy(out["logits"], y), labels=y).backward()
        copy_block, copy_classifier = term.branched.copies[0]
        assert copy_block[0].weight.grad is not None and term.gate[0].weight.grad is not None
        with torch.no_grad():
            torch.testing.assert_close(out["logits"], model.classifier(model.block(model.embed(tokens)).mean(1)))
    assert hook_count(model) == 0


def test_dml_switched_off_by_its_schedule_still_gives_every_peer_a_gradient():
    # DDP needs a gradient for every trainable parameter on every step
    import torch.nn.functional as F

    from kdhooks.demo import student_cnn

    student = student_cnn()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    config = {"terms": [{"kind": "dml", "copies": 1,
                         "weight": {"schedule": "step", "milestones": [1], "values": [1.0, 0.0]}}]}
    with kdhooks.Distiller(student, None, config, example_inputs=x[:2]) as kd:
        kd(F.cross_entropy(student(x), y), labels=y)
        loss = kd(F.cross_entropy(student(x), y), labels=y)
        assert kd.last_losses["dml"] == 0.0
        loss.backward()
        assert all(p.grad is not None for p in kd.peers.parameters())
