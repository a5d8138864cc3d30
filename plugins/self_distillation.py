"""Self and online distillation: the teacher is trained with, or is part of, the student.

Each formula as implemented, and what is kdhooks' reading of the paper: docs/conventions.md.

Deep mutual learning (peers as the Distiller's trainable models), ONE (the
student's head branched by hooks, a gated ensemble of the branches teaching
each), Be Your Own Teacher (auxiliary classifiers on shallow stages taught by
the deepest) and a driver for born-again generations. The born-again driver
lives here rather than in the core: it is one method's procedure (train k
generations, each from the last) and needs nothing private.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import kdhooks

from ._branches import BranchedHead, reinitialized
from ._layers import known
from .logits import kd_loss


def _labels(ctx: kdhooks.LossContext, term: kdhooks.Term) -> torch.Tensor:
    if ctx.labels is None:
        raise ValueError(f"term {term.name!r} ({term.kind}) trains on the labels: call kd(task_loss, labels=y)")
    return ctx.labels


# --- deep mutual learning ---------------------------------------------------------------


def dml_losses(logits: Sequence[torch.Tensor], temperature: float = 1.0) -> list[torch.Tensor]:
    """Each network's mimicry loss: the mean over the others l of KL(p_l ‖ p_k), the others detached."""
    others = len(logits) - 1
    return [sum(kd_loss(own, other.detach(), temperature) for j, other in enumerate(logits) if j != k) / others
            for k, own in enumerate(logits)]


class DeepMutualLearning(kdhooks.Term):
    """Deep mutual learning (Zhang et al. 2018): network k minimises CE_k + 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k).

    The student's CE is the task loss; the term adds the student's mimicry
    (part ``dml``) and, for each peer, its CE plus mimicry (part ``dml.<role>``).
    Peers are ``peers={role: module}`` (Python) and/or ``copies`` re-initialized
    copies of the student; they become trainable models of the Distiller, so
    ``kd.parameters()`` trains them and ``kd.model(role)`` returns them.
    """

    peers: dict[str, nn.Module] = field(default_factory=dict)
    copies: kdhooks.NonNegativeInt = 0
    temperature: kdhooks.Positive = 1.0
    student: str = "logits"
    peer_output: str = "logits"

    def configure(self, distiller: kdhooks.Distiller) -> None:
        if not self.peers and self.copies < 1:
            raise kdhooks.ConfigError(self.location, "deep mutual learning needs at least one peer",
                                      value=self.copies, fix="set `copies: 1` (a re-initialized copy of the "
                                      "student) or pass peers={role: model}")
        free = (f"peer{i}" for i in range(1, len(self.peers) + self.copies + 1) if f"peer{i}" not in self.peers)
        self.roles = [*self.peers, *(next(free) for _ in range(self.copies))]
        models = [*self.peers.values(), *(reinitialized(distiller.student) for _ in range(self.copies))]
        for role, module in zip(self.roles, models):
            distiller.add_model(role, module, trainable=True, owner=self.name)

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"student": kdhooks.Tap("student", self.student, option="student"),
                **{role: kdhooks.Tap(role, self.peer_output, option="peer_output") for role in self.roles}}

    def check(self, shapes: dict[str, Any]) -> None:
        for role in self.roles:
            if known(shapes, "student", role):
                kdhooks.expect_same_classes(self, "student", role, shapes)

    def loss(self, ctx: kdhooks.LossContext, **logits: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = _labels(ctx, self)
        networks = [kdhooks.logits_of(logits["student"]), *(kdhooks.logits_of(logits[r]) for r in self.roles)]
        mimicry = dml_losses(networks, self.temperature)
        parts = {"": mimicry[0]}
        for role, peer_logits, peer_mimicry in zip(self.roles, networks[1:], mimicry[1:]):
            parts[role] = F.cross_entropy(peer_logits.float(), labels) + peer_mimicry
        return parts


# --- ONE: on-the-fly native ensemble ----------------------------------------------------


def gated_ensemble(branch_logits: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Σ_i g_i · z_i: branch logits (m, N, K) weighted by the gate (N, m)."""
    return torch.einsum("mnk,nm->nk", branch_logits, gate)


def one_loss(branch_logits: torch.Tensor, gate: torch.Tensor, labels: torch.Tensor,
             temperature: float = 3.0) -> torch.Tensor:
    """ONE's objective: Σ_i CE(z_i) + CE(z_e) + T² Σ_i KL(p_e ‖ p_i), the ensemble z_e detached as teacher."""
    ensemble = gated_ensemble(branch_logits, gate)
    ce = sum(F.cross_entropy(z.float(), labels) for z in branch_logits) + F.cross_entropy(ensemble.float(), labels)
    return ce + sum(kd_loss(z, ensemble.detach(), temperature) for z in branch_logits)


def _pooled(trunk: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) conv and (N, L, D) token features to one vector per sample."""
    if trunk.dim() == 4:
        return trunk.mean((2, 3))
    return trunk.mean(1) if trunk.dim() == 3 else trunk


class OnTheFlyNativeEnsemble(kdhooks.Term):
    """ONE (Lan, Zhu & Gong 2018): Σ_i CE(z_i) + CE(z_e) + T² Σ_i KL(p_e ‖ p_i), z_e = Σ_i g_i z_i gated.

    Hooks fork the student's forward after ``split`` into ``branches`` branches
    of the ``heads`` modules (branch 0 is the user's own; the others are
    re-initialized copies held by the Distiller, see ``_branches``). The model
    answers with branch 0, so the task loss is CE(z_0) and the term adds the
    other branches' and the ensemble's CE (part ``one.ce``) and the distillation
    (``one.kd``). In eval mode the model is branch 0 alone, or the gated
    ensemble with ``inference: ensemble``; after ``close()`` it is branch 0.
    """

    not_evaluable: ClassVar[str] = "its branches run only in training forwards of the student"

    split: str
    heads: list[str]
    branches: Annotated[int, Field(strict=True, ge=2)] = 3  # branch 0 alone would have no ensemble to learn from
    temperature: kdhooks.Positive = 3.0
    inference: Literal["branch", "ensemble"] = "branch"

    def taps(self) -> dict[str, kdhooks.Tap]:
        return {"trunk": kdhooks.Tap("student", self.split, option="split")}

    def configure(self, distiller: kdhooks.Distiller) -> None:
        self.branched = BranchedHead(distiller.student, self.split, self.heads, self.branches, self.location)

    def check(self, shapes: dict[str, Any]) -> None:
        if known(shapes, "trunk"):
            kdhooks.expect_rank(self, "trunk", shapes, (4, 3, 2), "the gate reads the trunk's pooled output per sample")

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        trunk = kdhooks.feature_shape(shapes["trunk"])
        features = trunk[1] if len(trunk) == 4 else trunk[-1]
        # the gate: FC, BN, ReLU, then a softmax over the branches
        gate = nn.Sequential(nn.Linear(features, self.branches), nn.BatchNorm1d(self.branches), nn.ReLU())
        parts = distiller.add_part(self.name, nn.ModuleDict({"branches": self.branched.copies, "gate": gate}))
        self.gate, self._recorded = parts["gate"], None
        distiller.on_close(self.branched.attach(active=lambda root: root.training or self.inference == "ensemble",
                                             finish=self._finish))

    def _finish(self, trunk: torch.Tensor, branch_logits: torch.Tensor, training: bool) -> torch.Tensor | None:
        self.gate.train(training)
        gate = torch.softmax(self.gate(_pooled(trunk)), dim=1)
        if training:
            self._recorded = (branch_logits, gate)
            return None
        return gated_ensemble(branch_logits, gate) if self.inference == "ensemble" else None

    def loss(self, ctx: kdhooks.LossContext, trunk: Any) -> dict[str, torch.Tensor]:
        if self._recorded is None:
            raise KeyError(f"term {self.name!r}: no branches were recorded; run the student in training mode first")
        (branch_logits, gate), self._recorded = self._recorded, None
        labels = _labels(ctx, self)
        ensemble = gated_ensemble(branch_logits, gate)
        # CE(z_0) is the task loss already
        ce = sum(F.cross_entropy(z.float(), labels) for z in [*branch_logits[1:], ensemble])
        kd = sum(kd_loss(z, ensemble.detach(), self.temperature) for z in branch_logits)
        return {"ce": ce, "kd": kd}


# --- Be Your Own Teacher ----------------------------------------------------------------


def byot_loss(shallow_logits: torch.Tensor, shallow_feature: torch.Tensor, deepest_logits: torch.Tensor,
              deepest_feature: torch.Tensor, labels: torch.Tensor, temperature: float = 3.0, alpha: float = 0.5,
              hint_weight: float = 0.05) -> torch.Tensor:
    """One shallow head: (1−α)·CE(q_i, y) + α·T²·KL(q_C ‖ q_i) + λ·mean (F_i − F_C)², the deepest detached."""
    ce = F.cross_entropy(shallow_logits.float(), labels)
    kd = kd_loss(shallow_logits, deepest_logits.detach(), temperature)
    hint = F.mse_loss(shallow_feature.float(), deepest_feature.detach().float())
    return (1 - alpha) * ce + alpha * kd + hint_weight * hint


class AuxiliaryClassifier(nn.Module):
    """BYOT's shallow classifier: a bottleneck to the deepest feature's width, global pooling, a linear layer.

    Conv stages (N, C, H, W) get 1x1-3x3-1x1 convolutions; token or vector
    stages (N, L, D) / (N, D) a two-layer MLP, averaged over tokens.
    """

    def __init__(self, stage_shape: tuple, feature_dim: int, classes: int, bottleneck: int):
        super().__init__()
        self.conv = len(stage_shape) == 4
        if self.conv:
            def block(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
                conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
                return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]
            self.bottleneck = nn.Sequential(*block(stage_shape[1], bottleneck, 1), *block(bottleneck, bottleneck, 3),
                                            *block(bottleneck, feature_dim, 1))
        else:
            self.bottleneck = nn.Sequential(nn.Linear(stage_shape[-1], bottleneck), nn.ReLU(),
                                            nn.Linear(bottleneck, feature_dim))
        self.classifier = nn.Linear(feature_dim, classes)

    def feature(self, stage_output: torch.Tensor) -> torch.Tensor:
        """F_i, the pooled bottleneck output that the hint matches to the deepest feature."""
        feature = self.bottleneck(stage_output)
        return feature.mean((2, 3)) if self.conv else feature.mean(1) if feature.dim() == 3 else feature

    def forward(self, stage_output: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.feature(stage_output))


class BeYourOwnTeacher(kdhooks.Term):
    """Be Your Own Teacher (Zhang et al. 2019): shallow head i learns (1−α)CE + α·KL(q_C ‖ q_i) + λ‖F_i − F_C‖².

    ``stages`` are the shallow modules that get an AuxiliaryClassifier (built
    from the dry pass); ``classifier`` is the model's deepest classifier: its
    input is F_C, its output q_C, and its CE is the task loss. The heads live in
    the Distiller (``kd.parts``); ``exits()`` hands them to ``exit_logits`` and
    ``early_exit`` for inference once training is over.
    """

    stages: list[str]
    classifier: str
    temperature: kdhooks.Positive = 3.0
    alpha: kdhooks.UnitInterval = 0.5
    hint_weight: kdhooks.NonNegative = 0.05
    bottleneck: kdhooks.PositiveInt | None = None

    def taps(self) -> dict[str, kdhooks.Tap]:
        taps = {"deepest_logits": kdhooks.Tap("student", self.classifier, option="classifier"),
                "deepest_feature": kdhooks.Tap("student", self.classifier, kind="input", option="classifier")}
        taps.update({f"stage{i}": kdhooks.Tap("student", path, option="stages") for i, path in enumerate(self.stages)})
        return taps

    def check(self, shapes: dict[str, Any]) -> None:
        feature_shape = shapes["deepest_feature"]
        if not isinstance(feature_shape, tuple) or len(feature_shape) != 2:
            raise kdhooks.ConfigError(f"{self.location}.classifier", f"the input of {self.classifier!r} is "
                                      f"{feature_shape}, not one feature vector per sample (N, D)",
                                      value=self.classifier, fix="name the final linear classifier")
        # the heads' cross-entropy takes (N, classes) logits; a head reads conv, token or vector stages
        for name, ranks in (("deepest_logits", (2,)), *((f"stage{i}", (4, 3, 2)) for i in range(len(self.stages)))):
            if known(shapes, name):
                kdhooks.expect_rank(self, name, shapes, ranks, "BYOT's heads classify one row per sample")

    def build(self, distiller: kdhooks.Distiller, shapes: dict[str, Any]) -> None:
        feature_shape, logits_shape = shapes["deepest_feature"], shapes["deepest_logits"]
        heads = [AuxiliaryClassifier(shapes[f"stage{i}"], feature_shape[1], logits_shape[-1],
                                     self.bottleneck or max(feature_shape[1] // 4, 1)) for i in range(len(self.stages))]
        self.heads = distiller.add_part(self.name, nn.ModuleList(heads))

    def loss(self, ctx: kdhooks.LossContext, deepest_logits: torch.Tensor, deepest_feature: torch.Tensor,
             **stage_outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = _labels(ctx, self)
        parts = {}
        for i, (path, head) in enumerate(zip(self.stages, self.heads)):
            feature = head.feature(stage_outputs[f"stage{i}"])
            logits = head.classifier(feature)
            parts[path] = byot_loss(logits, feature, deepest_logits, deepest_feature, labels,
                                    self.temperature, self.alpha, self.hint_weight)
        return parts

    def exits(self) -> dict[str, nn.Module]:
        """The shallow heads by the stage they read, shallowest first."""
        return dict(zip(self.stages, self.heads))


class _AllExited(Exception):
    pass


def _run_exits(model: nn.Module, exits: Mapping[str, nn.Module], inputs: Any,
               stop: Callable[[dict[str, torch.Tensor]], bool]) -> dict[str, torch.Tensor]:
    """Each exit's logits on its stage output (the model's own under ``""``), with temporary hooks."""
    table = kdhooks.module_table(model)
    found: dict[str, torch.Tensor] = {}

    def hook_for(path: str, head: nn.Module):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            found[path] = head(output)
            if stop(found):
                raise _AllExited
        return hook

    handles = [table[path].register_forward_hook(hook_for(path, head)) for path, head in exits.items()]
    modes = [(m, m.training) for m in (model, *exits.values())]
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            found[""] = kdhooks.logits_of(model(*inputs) if isinstance(inputs, tuple) else model(inputs))
    except _AllExited:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.train(training)
    return found


def exit_logits(model: nn.Module, exits: Mapping[str, nn.Module], inputs: Any) -> dict[str, torch.Tensor]:
    """Logits of every exit and of the model itself (key ``""``) in eval mode; no hook stays on ``model``.

    ``exits`` maps module paths of ``model`` to heads (``BeYourOwnTeacher.exits()``); ``inputs`` is the
    model's input, or a tuple of its positional arguments.
    """
    return _run_exits(model, exits, inputs, stop=lambda found: False)


def early_exit(model: nn.Module, exits: Mapping[str, nn.Module], inputs: Any,
               threshold: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, exit index) per sample: the first exit, shallowest first, whose top softmax ≥ ``threshold``.

    Samples no head is sure of take the model's own prediction (index
    ``len(exits)``); the forward stops as soon as every sample has exited.
    """
    order = list(exits)

    def decided(found: dict[str, torch.Tensor]) -> bool:
        confident = [found[p].softmax(-1).amax(-1) >= threshold for p in order if p in found]
        return bool(torch.stack(confident).any(0).all())

    found = _run_exits(model, exits, inputs, stop=decided)
    logits = [found[p] for p in order if p in found]
    first = logits[0] if logits else found[""]
    prediction = torch.full(first.shape[:1], -1, dtype=torch.long, device=first.device)
    exit_index = torch.full(first.shape[:1], len(order), dtype=torch.long, device=first.device)
    for index, head_logits in enumerate(logits):
        confidence, guess = head_logits.softmax(-1).max(-1)
        take = (exit_index == len(order)) & (confidence >= threshold)
        prediction[take], exit_index[take] = guess[take], index
    if "" in found:
        rest = exit_index == len(order)
        prediction[rest] = found[""].argmax(-1)[rest]
    return prediction, exit_index


# --- born-again networks ----------------------------------------------------------------


class GenerationEnsemble(nn.Module):
    """The mean of the members' softmax outputs, returned as log-probabilities (usable as logits)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        probs = torch.stack([kdhooks.logits_of(m(*args, **kwargs)).float().softmax(-1) for m in self.members])
        return probs.mean(0).log()


@dataclass
class Generations:
    """The models of a born-again run: ``models[0]`` is S0 (the first teacher), ``models[k]`` is Sk."""

    models: list[nn.Module]
    scores: dict[str, float] = field(default_factory=dict)

    def ensemble(self, generations: Sequence[int] | None = None) -> GenerationEnsemble:
        """The born-again ensemble of ``generations`` (default S1..Sk, the paper's BANE)."""
        chosen = range(1, len(self.models)) if generations is None else generations
        return GenerationEnsemble([self.models[k] for k in chosen])


def born_again(make_model: Callable[[], nn.Module], train: Callable[[nn.Module, nn.Module | None], nn.Module],
               generations: int = 2, *, teacher: nn.Module | None = None,
               evaluate: Callable[[nn.Module], float] | None = None) -> Generations:
    """Born-again networks (Furlanello et al. 2018): S_k = train(new model, teacher=S_{k−1}), k = 1..generations.

    ``train(model, teacher)`` is the user's own training (with a Distiller for
    CE + KD when ``teacher`` is given); S0 is ``teacher`` or, if None,
    ``train(make_model(), None)``. Every Sk starts from ``make_model()``, a
    fresh random initialization. ``evaluate`` scores S0..Sk and the ensemble.
    """
    if generations < 1:
        raise kdhooks.ConfigError("generations", "born-again training needs at least one generation",
                                  value=generations, fix="generations=2")
    models = [teacher if teacher is not None else train(make_model(), None)]
    for _ in range(generations):
        models.append(train(make_model(), models[-1]))
    result = Generations(models)
    if evaluate is not None:
        result.scores = {f"S{k}": evaluate(m) for k, m in enumerate(models)}
        result.scores["ensemble"] = evaluate(result.ensemble())
    return result


@kdhooks.hookimpl
def kdhooks_register(registry: kdhooks.Registry) -> None:
    registry.add_term("dml", DeepMutualLearning)
    registry.add_term("one", OnTheFlyNativeEnsemble)
    registry.add_term("byot", BeYourOwnTeacher)
