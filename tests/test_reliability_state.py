"""State and lifetime (#10): a model given twice, a second Distiller, per-module modes, copies and pickles.

Every refusal is checked for its exact class and for a message that names the place and the fix;
every refusal at attach is checked to leave the models exactly as they were given.
"""
import copy
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from _models import batch, pair
from kdhooks.demo import DigitsCNN

KD = {"terms": [{"kind": "kd", "temperature": 4}]}
KD_FITNETS = {"terms": [{"kind": "kd", "temperature": 4},
                        {"kind": "fitnets", "student": "stage2", "teacher": "stage2"}]}


# --- what a model looks like from outside: hooks, requires_grad, modes ----------------------

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_state_dict_hooks", "_load_state_dict_pre_hooks")


def hooks_on(*models: nn.Module) -> list[str]:
    """Every hook on any submodule of ``models``, as 'path.dict' (empty when nothing is attached)."""
    found = []
    for i, model in enumerate(models):
        for name, module in model.named_modules():
            for attr in HOOK_DICTS:
                if getattr(module, attr, None):
                    found.append(f"model{i}:{name or '(root)'}.{attr}")
    return found


def snapshot(*models: nn.Module) -> list[tuple]:
    """(requires_grad of each parameter, training of each module), per model."""
    return [({n: p.requires_grad for n, p in m.named_parameters()},
             {n: sub.training for n, sub in m.named_modules()}) for m in models]


def mixed(model: nn.Module) -> nn.Module:
    """``model`` in train mode with one BatchNorm in eval and one conv frozen: every default differs somewhere."""
    model.train()
    model.stage2[1][1].eval()
    model.stage1[0].weight.requires_grad_(False)
    return model


# --- a model given twice ------------------------------------------------------------------

def test_the_student_as_its_own_teacher_is_a_config_error_not_a_recursion():
    student, _ = pair()
    mixed(student)
    before = snapshot(student)
    with pytest.raises(kdhooks.ConfigError) as info:
        kdhooks.Distiller(student, student, KD, example_inputs=batch(2)[0])
    error = info.value
    assert error.location == "teacher"
    assert "the teacher is the same module as the student" in str(error)
    assert "copy.deepcopy(model)" in error.fix and "teacher=None" in error.fix
    assert hooks_on(student) == [] and snapshot(student) == before
    assert kdhooks.attached(student) is None
    # the student is free: a correct Distiller attaches
    with kdhooks.Distiller(student, copy.deepcopy(student), KD) as kd:
        assert kdhooks.attached(student) is kd


def test_a_teacher_sharing_a_batchnorm_stage_with_the_student_is_refused():
    student, teacher = DigitsCNN(width=4), DigitsCNN(width=4)
    teacher.stage1 = student.stage1                     # conv + BatchNorm: parameters and running statistics
    mixed(student), mixed(teacher)
    before = snapshot(student, teacher)
    with pytest.raises(kdhooks.ConfigError) as info:
        kdhooks.Distiller(student, teacher, KD, example_inputs=batch(2)[0])
    error = info.value
    assert error.location == "teacher"
    assert "the teacher's 'stage1' is the student's 'stage1'" in str(error)
    assert "BatchNorm" in error.problem
    assert error.fix == "give the teacher its own copy: teacher.stage1 = copy.deepcopy(student.stage1)"
    assert hooks_on(student, teacher) == [] and snapshot(student, teacher) == before
    assert kdhooks.attached(student) is None


def test_a_shared_batchnorm_alone_is_named_by_both_paths():
    student, teacher = DigitsCNN(width=4), DigitsCNN(width=4)
    teacher.stage3[1][1] = student.stage3[1][1]         # only buffers and affine parameters in common
    before = snapshot(student, teacher)
    with pytest.raises(kdhooks.ConfigError) as info:
        kdhooks.Distiller(student, teacher, KD)
    assert "the teacher's 'stage3.1.1' is the student's 'stage3.1.1'" in str(info.value)
    assert "copy.deepcopy(student.stage3.1.1)" in info.value.fix
    assert hooks_on(student, teacher) == [] and snapshot(student, teacher) == before


def test_a_shared_parameter_outside_a_shared_module_is_refused():
    student, teacher = DigitsCNN(width=4), DigitsCNN(width=4)
    teacher.fc.weight = student.fc.weight                # tied weights, separate modules
    with pytest.raises(kdhooks.ConfigError, match=r"the teacher's parameter 'fc\.weight' is the student's "
                                                  r"'fc\.weight'") as info:
        kdhooks.Distiller(student, teacher, KD)
    assert "its own copy" in info.value.fix
    assert student.fc.weight.requires_grad and hooks_on(student, teacher) == []


def test_a_shared_stateless_module_is_allowed_and_distills():
    student, teacher = DigitsCNN(width=4), DigitsCNN(width=4)
    teacher.pool = student.pool                          # AdaptiveAvgPool2d: no parameters, no buffers
    x, y = batch()
    with kdhooks.Distiller(student, teacher, KD, example_inputs=x[:2]) as kd:
        loss = kd(F.cross_entropy(student(x), y), labels=y)
        loss.backward()
    assert all(p.requires_grad for p in student.parameters())
    assert all(p.grad is not None for p in student.parameters())


# --- one live Distiller per student ---------------------------------------------------------

def test_a_second_distiller_names_the_live_one_and_how_to_close_it():
    student, teacher = pair()
    x, _ = batch(2)
    first = kdhooks.Distiller(student, teacher, KD, example_inputs=x)
    hooks = hooks_on(student, teacher)
    with pytest.raises(kdhooks.ConfigError) as info:
        kdhooks.Distiller(student, copy.deepcopy(teacher), KD_FITNETS, example_inputs=x)
    error = info.value
    assert error.location == "student"
    assert "already has a Distiller attached (step=0, terms=[kd(kd)])" in error.problem
    assert "close()" in error.fix and "with Distiller(...) as kd:" in error.fix
    assert "kdhooks.attached(student)" in error.fix
    # the refused one touched nothing: the first is still the one attached, with the same hooks
    assert kdhooks.attached(student) is first and hooks_on(student, teacher) == hooks
    first.close()
    assert kdhooks.attached(student) is None
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x) as second:
        assert kdhooks.attached(student) is second
    assert kdhooks.attached(student) is None


def test_the_first_distiller_still_runs_the_teacher_once_per_step_after_a_refused_second():
    student, teacher = pair()
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    x, y = batch()
    kd = kdhooks.Distiller(student, teacher, KD)
    with pytest.raises(kdhooks.ConfigError):
        kdhooks.Distiller(student, teacher, KD)
    kd(F.cross_entropy(student(x), y), labels=y)
    assert len(calls) == 1
    kd.close()


def test_del_without_close_warns_and_leaves_nothing_behind():
    student, teacher = pair()
    mixed(student), mixed(teacher)
    before = snapshot(student, teacher)
    x, y = batch()
    kd = kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2])
    kd(F.cross_entropy(student(x), y), labels=y).backward()
    assert hooks_on(student, teacher) != []
    assert not any(p.requires_grad for p in teacher.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del kd
        gc.collect()
    resource = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert len(resource) == 1, [str(w.message) for w in caught]
    message = str(resource[0].message)
    assert "garbage-collected without close()" in message
    assert "kd.close()" in message and "with Distiller(...) as kd:" in message
    assert hooks_on(student, teacher) == []
    assert snapshot(student, teacher) == before           # the teacher's requires_grad and modes as given
    assert kdhooks.attached(student) is None
    with kdhooks.Distiller(student, teacher, KD) as kd:    # a new one attaches
        assert kdhooks.attached(student) is kd


def test_a_rerun_cell_is_refused_and_after_del_a_new_one_attaches_without_gc_collect():
    """A notebook cell re-run: `kd = Distiller(...)` again while `kd` still holds the first one."""
    student, teacher = pair()
    teacher_calls = []
    teacher.register_forward_hook(lambda *_: teacher_calls.append(1))
    kd = kdhooks.Distiller(student, teacher, KD)
    first = kd
    with pytest.raises(kdhooks.ConfigError, match="already has a Distiller attached"):
        kd = kdhooks.Distiller(student, teacher, KD)
    assert kd is first and kdhooks.attached(student) is first
    del first
    # `del kd` without close(): the next attach collects it (with a ResourceWarning) instead of refusing
    with pytest.warns(ResourceWarning, match="without close"):  # noqa: PT031 (the del is what warns)
        del kd
        kd = kdhooks.Distiller(student, teacher, KD)
    assert kdhooks.attached(student) is kd
    x, _ = batch()
    student(x)
    kd(None)
    assert len(teacher_calls) == 1                        # one Distiller, one teacher forward per step
    kd.close()
    assert hooks_on(student) == [] and len(teacher._forward_hooks) == 1   # only the test's own hook


def test_attached_reports_the_live_distiller_or_none():
    student, teacher = pair()
    assert kdhooks.attached(student) is None
    assert kdhooks.attached(nn.Linear(2, 2)) is None
    with kdhooks.Distiller(student, teacher, KD) as kd:
        assert kdhooks.attached(student) is kd
        assert kdhooks.attached(teacher) is None          # the teacher is not a distilled student
    assert kdhooks.attached(student) is None


# --- per-module train/eval modes --------------------------------------------------------------

def test_a_submodule_in_eval_stays_in_eval_during_steps_and_close_restores_each_mode():
    student, teacher = pair()
    student.train()
    frozen_bn = student.stage1[1]
    frozen_bn.eval()                                      # a frozen BatchNorm in a training backbone
    teacher.train()
    teacher.stage3.eval()                                 # the teacher's modes are a mixture too
    before = snapshot(student, teacher)
    stats = frozen_bn.running_mean.clone(), frozen_bn.running_var.clone()
    x, y = batch()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with kdhooks.Distiller(student, teacher, KD, example_inputs=x[:2]) as kd:
        assert not frozen_bn.training and student.training
        for _ in range(3):
            loss = kd(F.cross_entropy(student(x), y), labels=y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert not frozen_bn.training and student.stage2[1][1].training
            assert not any(m.training for m in teacher.modules())   # the teacher runs in eval, every module
        assert torch.equal(frozen_bn.running_mean, stats[0]) and torch.equal(frozen_bn.running_var, stats[1])
    assert snapshot(student, teacher) == before


def test_close_restores_modes_the_user_set_while_attached_only_for_the_teacher():
    """close() gives the teacher back as it was given; the student's modes are the user's, left as they are."""
    student, teacher = pair()
    teacher.train()
    teacher.fc.eval()
    before_teacher = snapshot(teacher)
    kd = kdhooks.Distiller(student, teacher, KD)
    student.eval()                                        # the user evaluates while attached
    kd.close()
    assert snapshot(teacher) == before_teacher
    assert not any(m.training for m in student.modules())


# --- pickling and copying --------------------------------------------------------------------

@pytest.mark.parametrize("copier", [pickle.dumps, copy.deepcopy, copy.copy], ids=["pickle", "deepcopy", "copy"])
def test_a_distiller_cannot_be_pickled_or_copied_and_says_to_save_its_state_dict(copier):
    student, teacher = pair()
    x, y = batch()
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        with pytest.raises(TypeError) as info:
            copier(kd)
        assert "cannot be pickled or copied" in str(info.value) and "kd.state_dict()" in str(info.value)
        # the failed copy changed nothing: the Distiller still distills
        kd(F.cross_entropy(student(x), y), labels=y).backward()
        assert set(kd.last_losses) == {"task", "kd", "fitnets", "total"}


def test_torch_save_of_the_distiller_also_says_to_save_its_state_dict(tmp_path):
    student, teacher = pair()
    with kdhooks.Distiller(student, teacher, KD) as kd:
        with pytest.raises(TypeError, match=r"kd\.state_dict\(\)"):
            torch.save(kd, tmp_path / "kd.pt")
        torch.save(kd.state_dict(), tmp_path / "kd_state.pt")
    state = torch.load(tmp_path / "kd_state.pt", weights_only=True)
    assert int(state["_extra_state"]) == 0


MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    """A student defined outside kdhooks, so that loading it needs only this file and torch."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.stage2(self.stage1(x)).mean((2, 3)))
'''

LOAD_WITHOUT_KDHOOKS = '''
import os
import sys
sys.modules["kdhooks"] = None          # `import kdhooks` raises ImportError from here on
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # user_models (-I leaves the script's folder out)
try:
    import kdhooks  # noqa: F401
    raise SystemExit("kdhooks is importable: the test proves nothing")
except ImportError:
    pass
import torch
torch.set_num_threads(1)
model = torch.load(sys.argv[1], weights_only=False)
assert not any(name == "kdhooks" or name.startswith("kdhooks.") for name in sys.modules if sys.modules[name]), \\
    sorted(n for n in sys.modules if n.startswith("kdhooks"))
x = torch.load(sys.argv[2], weights_only=True)
model.eval()
torch.save(model(x), sys.argv[3])
model.train()
model(x)                               # the copied hooks are inert: no teacher, no recording, no error
print("ok")
'''


def test_a_student_saved_while_attached_loads_where_kdhooks_is_not_importable(tmp_path):
    (tmp_path / "user_models.py").write_text(MODELS)
    sys.path.insert(0, str(tmp_path))
    try:
        from user_models import Net

        student, teacher = Net(), Net()
        x, y = batch()
        with kdhooks.Distiller(student, teacher, {"terms": [{"kind": "kd"}, {"kind": "fitnets", "student": "stage2",
                                                              "teacher": "stage2"}]}, example_inputs=x[:2]) as kd:
            kd(F.cross_entropy(student(x), y), labels=y).backward()
            assert hooks_on(student) != []
            torch.save(student, tmp_path / "student.pt")             # hooks and all
            torch.save(x, tmp_path / "x.pt")
            student.eval()
            expected = student(x).detach()
            student.train()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("user_models", None)
    (tmp_path / "load.py").write_text(LOAD_WITHOUT_KDHOOKS)
    # -I: isolated (no PYTHONPATH, no user site, not the current folder); kdhooks stays reachable only through
    # the venv's editable install, which sys.modules["kdhooks"] = None blocks
    ran = subprocess.run([sys.executable, "-I", str(tmp_path / "load.py"), str(tmp_path / "student.pt"),
                          str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
                         cwd=tmp_path, check=False, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)


def test_the_saved_student_holds_no_kdhooks_class(tmp_path):
    """What makes the load above work: the pickled hooks reference the standard library only."""
    import pickletools
    import zipfile

    student, teacher = pair()
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=batch(2)[0]):
        torch.save(student, tmp_path / "student.pt")
    with zipfile.ZipFile(tmp_path / "student.pt") as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    strings, imported = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        if op.name == "STACK_GLOBAL":
            imported.append(tuple(strings[-2:]))
        if op.name == "GLOBAL":
            imported.append(tuple(arg.split(" ")))
    modules = {module for module, _ in imported}
    # the student's own class is kdhooks.demo.DigitsCNN here; nothing else may come from kdhooks
    assert {(m, n) for m, n in imported if m.startswith("kdhooks")} == {("kdhooks.demo", "DigitsCNN")}, modules


def test_deepcopy_of_an_attached_student_is_a_plain_model_and_the_original_keeps_distilling():
    student, teacher = pair()
    teacher_calls = []
    teacher.register_forward_hook(lambda *_: teacher_calls.append(1))
    x, y = batch()
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]) as kd:
        teacher_calls.clear()                              # the dry pass ran it once
        twin = copy.deepcopy(student)
        assert kdhooks.attached(twin) is None
        student.eval(), twin.eval()
        assert torch.equal(twin(x), student(x))
        student.train(), twin.train()
        twin(x)                                            # its hooks are inert: the teacher does not run
        assert teacher_calls == [] and kd.captures == {}
        kd(F.cross_entropy(student(x), y), labels=y).backward()
        assert len(teacher_calls) == 1 and kd.last_losses["fitnets"] > 0
        # the twin is distillable on its own
        with kdhooks.Distiller(twin, copy.deepcopy(teacher), KD) as kd_twin:
            assert kdhooks.attached(twin) is kd_twin and kdhooks.attached(student) is kd


def test_the_state_dict_of_an_attached_student_loads_with_weights_only(tmp_path):
    student, teacher = pair()
    x, _ = batch()
    with kdhooks.Distiller(student, teacher, KD_FITNETS, example_inputs=x[:2]):
        torch.save(student.state_dict(), tmp_path / "student.pt")
        torch.save(student, tmp_path / "full.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(tmp_path / "full.pt", weights_only=True)    # no full nn.Module loads so, attached or not
    fresh = DigitsCNN(width=4)
    fresh.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))
    student.eval(), fresh.eval()
    assert torch.equal(fresh(x), student(x))


# --- an empty config ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", [{}, {"terms": []}, "", "empty.yaml", "comments.yaml"])
def test_an_empty_config_warns_that_the_distiller_only_scales_the_task_loss(config, tmp_path):
    if config == "empty.yaml":
        (tmp_path / config).write_text("")
        config = tmp_path / config
    elif config == "comments.yaml":
        (tmp_path / config).write_text("# nothing configured yet\n")
        config = str(tmp_path / config)
    elif config == "":
        config = {"task_weight": 0.5}
    student, teacher = pair()
    with pytest.warns(UserWarning, match="the config has no terms: this Distiller only scales the task loss") as caught:
        kd = kdhooks.Distiller(student, teacher, config)
    assert "kind: kd" in str(caught[0].message)            # the fix
    x, y = batch()
    task = F.cross_entropy(student(x), y)
    weight = 0.5 if isinstance(config, dict) and "task_weight" in config else 1.0
    assert torch.equal(kd(task), weight * task)
    kd.close()


# --- a failure while attaching leaves the models as they were --------------------------------------

@pytest.mark.parametrize("case", ["bad tap path", "bad teacher role", "dry pass fails", "connector cannot join"])
def test_a_failure_while_attaching_leaves_no_hook_and_every_mode_and_flag_as_given(case):
    student, teacher = pair()
    mixed(student), mixed(teacher)
    before = snapshot(student, teacher)
    x = batch(2)[0]
    config, example, error = {
        "bad tap path": ({"terms": [{"kind": "fitnets", "student": "stage9", "teacher": "stage2"}]}, x,
                         kdhooks.ConfigError),
        "bad teacher role": ({"terms": [{"kind": "kd", "teacher_role": "vit"}]}, x, kdhooks.ConfigError),
        "dry pass fails": (KD_FITNETS, torch.rand(2, 3, 8, 8), RuntimeError),     # 3 channels for a 1-channel conv
        "connector cannot join": ({"terms": [{"kind": "fitnets", "student": "stage2", "teacher": "fc",
                                              "connector": "conv1x1"}]}, x, kdhooks.ConfigError),
    }[case]
    with pytest.raises(error) as info:
        kdhooks.Distiller(student, teacher, config, example_inputs=example)
    if error is kdhooks.ConfigError:
        assert info.value.location.startswith("terms[0]") and info.value.fix
    assert hooks_on(student, teacher) == []
    assert snapshot(student, teacher) == before
    assert kdhooks.attached(student) is None
    with kdhooks.Distiller(student, teacher, KD, example_inputs=x) as kd:   # and the student is free again
        assert kdhooks.attached(student) is kd


def test_a_trainable_peer_keeps_its_own_frozen_batchnorm_in_eval():
    """DML's peers follow the student into training, but a submodule the user froze in eval stays so."""
    from kdhooks.plugins.self_distillation import DeepMutualLearning

    student, _ = pair()
    peer = DigitsCNN(width=4)
    peer.train()
    peer.stage1[1].eval()
    x, y = batch()
    with kdhooks.Distiller(student, None, {"terms": [DeepMutualLearning(peers={"peer": peer})]},
                           example_inputs=x[:2]) as kd:
        for _ in range(2):
            kd(F.cross_entropy(student(x), y), labels=y).backward()
            assert peer.training and peer.stage2[1][1].training and not peer.stage1[1].training


@pytest.mark.parametrize("order", ["first attached closes first", "last attached closes first"])
def test_one_teacher_for_two_students_is_given_back_as_it_was_whatever_the_closing_order(order):
    student_a, teacher = pair()
    student_b = DigitsCNN(width=4)
    mixed(teacher)
    before = snapshot(teacher)
    x, y = batch()
    a = kdhooks.Distiller(student_a, teacher, KD_FITNETS, example_inputs=x[:2])
    b = kdhooks.Distiller(student_b, teacher, KD, example_inputs=x[:2])
    first, second = (a, b) if order.startswith("first") else (b, a)
    first.close()
    # the other Distiller still holds the teacher: frozen, in eval, every module
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    still = student_b if second is b else student_a
    second(F.cross_entropy(still(x), y), labels=y).backward()
    assert all(p.grad is None for p in teacher.parameters())
    second.close()
    assert snapshot(teacher) == before


def test_a_distiller_left_open_at_interpreter_exit_exits_quietly(tmp_path):
    script = tmp_path / "left_open.py"
    script.write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch, kdhooks
        from _models import pair
        student, teacher = pair()
        kd = kdhooks.Distiller(student, teacher, {{"terms": [{{"kind": "kd"}}]}})
        print("ok")
    '''))
    ran = subprocess.run([sys.executable, "-W", "always", str(script)], check=False, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok"
    assert "Exception ignored" not in ran.stderr and "Traceback" not in ran.stderr, ran.stderr


@pytest.mark.parametrize("inner", ["teacher", "student"])
def test_one_model_inside_the_other_is_refused_naming_the_attribute(inner):
    student, teacher = pair()
    if inner == "teacher":
        student.distill_from = teacher                    # a wrapper habit: the teacher as the student's attribute
    else:
        teacher.student = student
    before = snapshot(student, teacher)
    with pytest.raises(kdhooks.ConfigError) as info:
        kdhooks.Distiller(student, teacher, KD)
    error = info.value
    where = "student.distill_from" if inner == "teacher" else "teacher.student"
    assert error.location == "teacher"
    assert f"the {inner} is a submodule of the {where.split('.')[0]} ({where})" in error.problem
    assert f"remove {where}" in error.fix
    assert hooks_on(student, teacher) == [] and snapshot(student, teacher) == before
