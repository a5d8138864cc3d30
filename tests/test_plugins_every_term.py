"""Every registered term kind, generated from the registry (as timm tests every registered model).

For each kind that a built-in plugin (plugins/) registers, a Distiller is attached with the kind's
example from EXAMPLES (or, for a kind with no required options, the default:
the demo's CNNs on 8x8 digit-like images), trains two steps, and is checked for
what every term owes its user: a finite loss with the term's part in it,
gradients in the student and in the Distiller's own trainable parts, a teacher
left as it was, a state_dict that loads into a fresh Distiller, and nothing left
on the models after close(). A new term with no required options is covered
without writing a line here; one that needs options, models or extras gets an
entry in EXAMPLES (test_every_kind_has_an_example says which).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdhooks
from _detection import ToyDetector, anchors_for
from _models import batch, pair
from kdhooks._manager import plugin_manager
from kdhooks.demo import student_cnn, teacher_cnn

_, REGISTRY = plugin_manager()
# the kinds this package's plugins register; a third-party plugin installed next to it is its own to test
# kinds that add no loss of their own (they serve the other terms), each tested in its own file
SERVICES = {"teacher_cache": "tests/test_plugins_cache.py"}
KINDS = sorted(kind for kind, term in REGISTRY.terms.items()
               if term.__module__.startswith("kdhooks.plugins.") and kind not in SERVICES)


@dataclasses.dataclass(frozen=True)
class Example:
    """How to distill with one kind: the models, the term's options, a batch, its task loss, the step's extras."""

    models: Callable[[], tuple[nn.Module, nn.Module | None]]  # fresh (student, teacher); teacher None: self-distillation
    options: dict[str, Any]
    batch: Callable[[], Any]  # what the student is called on: a tensor, or a dict of keyword arguments
    task_loss: Callable[[Any, Any], torch.Tensor]  # (student output, batch) -> the task loss
    extras: Callable[[Any], dict[str, Any]]  # batch -> the keywords of kd(task_loss, **extras)
    dry_run: bool = True  # attach with example_inputs (two samples of the batch), or with none


# --- the model families -------------------------------------------------------------------

def cnn_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return student_cnn(), teacher_cnn()


def cnn_alone() -> tuple[nn.Module, None]:
    torch.manual_seed(0)
    return student_cnn(), None


def digits(options: dict[str, Any], models=cnn_pair, dry_run: bool = True) -> Example:
    """The demo's CNNs on 16 digit-like 8x8 images, cross-entropy as the task loss, labels as the extras."""
    return Example(models, options, lambda: batch(16), lambda out, xy: F.cross_entropy(out, xy[1]),
                   lambda xy: {"labels": xy[1]}, dry_run)


def bert_pair() -> tuple[nn.Module, nn.Module]:
    pytest.importorskip("transformers")
    from _hf import tiny_bert

    return tiny_bert(2, 16, seed=2), tiny_bert(4, 32, seed=1)


def bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.randint(3, 40, (3, 10), generator=g),
              "attention_mask": torch.ones(3, 10, dtype=torch.long), "labels": torch.tensor([0, 1, 1])}
    inputs["attention_mask"][1, 6:] = 0
    return inputs


def llama_pair() -> tuple[nn.Module, nn.Module]:
    pytest.importorskip("transformers")
    from _hf import tiny_llama

    return tiny_llama(1, 16, seed=2), tiny_llama(2, 32, seed=1)


def llama_batch() -> dict[str, torch.Tensor]:
    from _hf import lm_data

    items = lm_data(4, seed=5)
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def hf(options: dict[str, Any], models, inputs) -> Example:
    """Tiny HF models built from configs (no download); the model's own loss; the batch as the extras."""
    return Example(models, options, inputs, lambda out, _: out.loss, dict)


def detectors(**kwargs) -> Callable[[], tuple[nn.Module, nn.Module]]:
    def make():
        torch.manual_seed(0)
        return ToyDetector(4, **kwargs), ToyDetector(8, **kwargs)
    return make


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


LOCATIONS = [64, 16]  # per image: 8·8 at stride 4, 4·4 at stride 8


def regression_extras(_) -> dict[str, Any]:
    g = torch.Generator().manual_seed(4)
    return {"reg_targets": [torch.randn(2, n * 2, 4, generator=g) for n in LOCATIONS],
            "reg_weights": [(torch.rand(2, n * 2, 1, generator=g) > 0.7).float().expand(-1, -1, 4)
                            for n in LOCATIONS]}


def imitation_extras(_) -> dict[str, Any]:
    return {"priors": [anchors_for(8, 4, [(8, 8), (16, 8)]), anchors_for(4, 8, [(16, 16), (32, 16)])],
            "gt_boxes": [torch.tensor([[4.0, 4.0, 14.0, 16.0]]), torch.tensor([[10.0, 12.0, 30.0, 28.0]])]}


def positive_extras(_) -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    return {"positives": [torch.rand(2, n, generator=g) > 0.6 for n in LOCATIONS]}


def detection(options: dict[str, Any], extras=lambda _: {}, models=None) -> Example:
    """ToyDetector (no mmdet): two levels of class and box maps; the extras an mmdet adapter would pass."""
    return Example(models or detectors(), options, images, lambda out, _: out[0][0].pow(2).mean(), extras)


def segmentation(options: dict[str, Any]) -> Example:
    """torchvision's LR-ASPP (student) and DeepLabV3 (teacher) MobileNetV3 at 32x32, masks as labels."""
    from _segmentation import mobile_pair, seg_batch

    return Example(mobile_pair, options, seg_batch,
                   lambda out, xy: F.cross_entropy(out["out"], xy[1], ignore_index=255), lambda xy: {"labels": xy[1]})


STAGES = ["stage1", "stage2", "stage3"]
RELUS = ["stage1.2", "stage2.1.2", "stage3.1.2"]

# kinds that need options, other models or extras; every other kind runs DEFAULT
EXAMPLES: dict[str, Example] = {
    "ab": digits({"student": RELUS, "teacher": RELUS}),
    "at": digits({"student": STAGES, "teacher": STAGES}),
    "fitnets": digits({"student": "stage2", "teacher": "stage2"}),
    "fsp": digits({"student": [["stage1", "stage2"]], "teacher": [["stage1", "stage2"]]}),
    "ft": digits({"student": "stage3", "teacher": "stage3", "paraphraser_steps": 1}),
    "mmd": digits({"student": STAGES, "teacher": STAGES}),
    "pkt": digits({"student": "pool", "teacher": "pool"}),
    "rkd": digits({"student": "pool", "teacher": "pool"}),
    "sp": digits({"student": "stage3", "teacher": "stage3"}),
    "weights": digits({"student": "stage3.1.0.weight", "teacher": "stage3.1.0.weight"}, dry_run=False),
    "dml": digits({"copies": 1}, models=cnn_alone),
    "one": digits({"split": "stage2", "heads": ["stage3", "fc"]}, models=cnn_alone),
    "byot": digits({"stages": ["stage1", "stage2"], "classifier": "fc"}, models=cnn_alone),
    # widths > 1 only: at width 1.0 the augmented model is the tiny one and its extra blocks get no gradient
    "netaug": digits({"widths": [1.6, 2.8]}, models=cnn_alone),
    "hidden_states": hf({"embeddings": True}, bert_pair, bert_batch),
    "attention_maps": hf({}, bert_pair, bert_batch),
    "lm_kd": hf({"chunk_size": 9}, llama_pair, llama_batch),
    "det_cls_kd": detection({}),
    "det_bounded_reg": detection({"margin": 0.1}, regression_extras),
    "det_feature_imitation": detection({}, imitation_extras),
    "ld": detection({}, positive_extras, detectors(priors=1, values=4 * 5)),
    "seg_pixel_kd": segmentation({}),
    "seg_pairwise": segmentation({"student": "backbone:high", "teacher": "backbone:out"}),
    "cwd": segmentation({"teacher": ":aux"}),
    # the critic's Wasserstein estimate, positive once it tells the maps apart (3 updates at 1e-3 by step 2)
    "seg_adversarial": segmentation({"depth": 2, "width": 16, "discriminator_lr": 1e-3, "discriminator_steps": 3}),
}
DEFAULT = digits({})


# --- checks -------------------------------------------------------------------------------

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooks_on(model: nn.Module) -> dict[str, int]:
    return {f"{name or '(root)'}.{attr}": len(getattr(module, attr)) for name, module in model.named_modules()
            for attr in HOOKS if len(getattr(module, attr))}


def first_two(inputs: Any) -> Any:
    if isinstance(inputs, tuple):  # (images, labels): the student is called on the images
        inputs = inputs[0]
    return {k: v[:2] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:2]


def run(student: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, tuple):
        inputs = inputs[0]
    return student(**inputs) if isinstance(inputs, dict) else student(inputs)


def required_options(kind: str) -> list[str]:
    return [f.name for f in dataclasses.fields(REGISTRY.terms[kind]) if f.init
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def test_every_kind_has_an_example():
    """A kind runs the default example unless it needs options or extras; then it needs an entry in EXAMPLES."""
    problems = []
    for kind in KINDS:
        if kind in EXAMPLES:
            continue
        if required_options(kind):
            problems.append(f"{kind!r} ({REGISTRY.terms[kind].__module__}) needs the options "
                            f"{required_options(kind)}")
        elif REGISTRY.terms[kind]().extras_needed():
            problems.append(f"{kind!r} ({REGISTRY.terms[kind].__module__}) reads the extras "
                            f"{sorted(REGISTRY.terms[kind]().extras_needed())} at each step")
    if problems:
        problems.append("add an entry to EXAMPLES in tests/test_plugins_every_term.py: EXAMPLES[kind] = "
                        "digits({options}) for the demo CNNs, or an Example(models, options, batch, task_loss, "
                        "extras) for other models or extras")
    problems += [f"EXAMPLES names {kind!r}, which no plugin registers: remove it or correct the kind"
                 for kind in sorted(set(EXAMPLES) - set(KINDS))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", KINDS)
def test_every_term_attaches_trains_saves_and_closes(kind):
    example = EXAMPLES.get(kind, DEFAULT)
    config = {"task_weight": 0, "terms": [{"kind": kind, **example.options}]}
    student, teacher = example.models()
    models = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    hooks_before = {role: hooks_on(model) for role, model in models.items()}
    requires_grad = {role: [p.requires_grad for p in model.parameters()] for role, model in models.items()}
    student_keys = list(student.state_dict())
    teacher_state = copy.deepcopy(teacher.state_dict()) if teacher is not None else None
    inputs = example.batch()
    example_inputs = first_two(inputs) if example.dry_run else None

    kd = kdhooks.Distiller(student, teacher, config, example_inputs=example_inputs)
    try:
        optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.01)
        for step in (1, 2):  # FT transfers from its second step on
            optimizer.zero_grad()
            student.train()
            out = run(student, inputs)
            loss = kd(example.task_loss(out, inputs), **example.extras(inputs))
            assert torch.isfinite(loss), f"{kind}: loss {loss.item()} at step {step}"
            parts = [t.name for t in kd.terms
                     if not any(k == t.name or k.startswith(f"{t.name}.") for k in kd.last_losses)]
            assert not parts, f"{kind}: no part of {parts} in kd.last_losses {sorted(kd.last_losses)}"
            loss.backward()
            optimizer.step()
        assert loss.item() > 0, f"{kind}: the term adds nothing (loss 0 with task_weight 0) at step 2"
        reached = [name for name, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert reached, f"{kind}: no gradient reached the student"
        untrained = [name for name, p in kd.named_parameters()
                     if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
        assert not untrained, f"{kind}: the Distiller's trainable parameters {untrained} got no gradient"
        if teacher is not None:
            assert not any(p.requires_grad for p in teacher.parameters()), f"{kind}: the teacher is not frozen"
            assert all(p.grad is None for p in teacher.parameters()), f"{kind}: the teacher has gradients"
            changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, teacher_state[k])]
            assert not changed, f"{kind}: the teacher's {changed} changed"

        state = kd.state_dict()
        fresh_student, fresh_teacher = example.models()
        with kdhooks.Distiller(fresh_student, fresh_teacher, config, example_inputs=example_inputs) as fresh:
            assert list(fresh.state_dict()) == list(state), f"{kind}: a fresh Distiller has other state_dict keys"
            fresh.load_state_dict(state)  # strict
            loaded = fresh.state_dict()
            differ = [k for k, v in state.items() if not torch.equal(loaded[k], v)]
            assert not differ, f"{kind}: {differ} differ after load_state_dict"
            assert fresh.step == kd.step == 2
    finally:
        kd.close()

    for role, model in models.items():
        left = {k: v for k, v in hooks_on(model).items() if hooks_before[role].get(k) != v}
        assert not left, f"{kind}: hooks left on the {role} after close(): {left}"
        given_back = [p.requires_grad for p in model.parameters()]
        assert given_back == requires_grad[role], f"{kind}: the {role}'s requires_grad not restored"
    assert list(student.state_dict()) == student_keys, f"{kind}: the student's state_dict keys changed"


# --- the hand-listed precursor of the test above, moved from the gradients tests (subsumed by it) ---

EVERY_TERM = {
    "kd": {"kind": "kd"},
    "logits_l2": {"kind": "logits_l2"},
    "dkd": {"kind": "dkd"},
    "weights": {"kind": "weights", "student": "stage3.1.0.weight", "teacher": "stage3.1.0.weight"},
    "fitnets": {"kind": "fitnets", "student": "stage2", "teacher": "stage2"},
    "mmd": {"kind": "mmd", "student": STAGES, "teacher": STAGES},
    "ft": {"kind": "ft", "student": "stage3", "teacher": "stage3", "paraphraser_steps": 1},
    "grad_at": {"kind": "grad_at"},
    "at": {"kind": "at", "student": STAGES, "teacher": STAGES},
    "ab": {"kind": "ab", "student": RELUS, "teacher": RELUS},
    "fsp": {"kind": "fsp", "student": [["stage1", "stage2"]], "teacher": [["stage1", "stage2"]]},
    "rkd": {"kind": "rkd", "student": "pool", "teacher": "pool"},
    "sp": {"kind": "sp", "student": "stage3", "teacher": "stage3"},
    "pkt": {"kind": "pkt", "student": "pool", "teacher": "pool"},
}


@pytest.mark.parametrize("kind", list(EVERY_TERM))
def test_gradients_reach_student_and_connectors_never_the_teacher(kind):
    student, teacher = pair()
    x, y = batch(16)
    before = copy.deepcopy(teacher.state_dict())
    with kdhooks.Distiller(student, teacher, {"task_weight": 0, "terms": [EVERY_TERM[kind]]},
                           example_inputs=x[:2]) as kd:
        student.train()
        for _ in range(2):  # FT transfers from its second step on
            student.zero_grad()
            kd.zero_grad()
            total = kd(F.cross_entropy(student(x), y), labels=y)
            total.backward()
        assert total.item() > 0
        trained = [p for p in kd.parameters() if p.requires_grad]  # FT's paraphraser trains itself
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
        reached = [name for name, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert reached, f"{kind}: no gradient reached the student"
        assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
