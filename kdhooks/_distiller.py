"""The Distiller: attaches to a student and its teachers, returns the distillation loss."""
from __future__ import annotations

import contextlib
import functools
import gc
import operator
import os
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# restore_modes and training_modes: _dry_run imports them from here
from ._attach import check_separate, freeze, restore_modes, training_modes  # noqa: F401
from ._config import DistillConfig, build_terms, load_config, parse_number
from ._context import LossContext, default_teacher_loss
from ._dry_run import dry_run, in_place_problem
from ._errors import ConfigError, LossError, did_you_mean
from ._manager import check_pending, plugin_manager
from ._precision import cast_floats, floating_dtype, inputs_in_parameter_dtype
from ._recorder import CaptureError, Recorded, Recorder, model_hook
from ._schedule import value_at
from ._taps import Tap, resolve_module, resolve_parameter, use_eager_attention
from ._term import Term, check_options

TeacherCall = Callable[[nn.Module, tuple, dict], Any]

# the live Distiller of each student: a second one on the same student is refused
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Distiller]] = weakref.WeakKeyDictionary()


def attached(student: nn.Module) -> Distiller | None:
    """The Distiller attached to ``student`` and not closed, or None."""
    ref = _ATTACHED.get(student)
    kd = ref() if ref is not None else None
    return kd if kd is not None and not kd._closed else None


@dataclass
class _Model:
    module: nn.Module
    trainable: bool
    call: TeacherCall | None = None
    needs_grad: bool = False


class Distiller(nn.Module):
    """Knowledge distillation added to an existing loop by forward hooks.

    ``kd = Distiller(student, teacher, "kd.yaml", example_inputs=x0)`` attaches;
    ``loss = kd(task_loss, labels=y)`` returns ``task_weight * task_loss + Σ
    weight_i * term_i`` and advances the step; ``kd.close()`` detaches. The
    teacher runs on the student's inputs from a forward pre-hook on the student,
    in eval mode, under no_grad, frozen, only while the student is training.
    Connectors, heads and trainable peers are this module's submodules, so
    ``kd.parameters()`` goes into the optimizer next to the student's.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | Mapping[str, nn.Module] | None = None,
                 config: str | os.PathLike | dict | DistillConfig | None = None, *,
                 example_inputs: Any = None, teacher_call: TeacherCall | None = None,
                 teacher_loss: Callable[[Any, dict], torch.Tensor] | None = None):
        super().__init__()
        self.connectors = nn.ModuleDict()
        self.parts = nn.ModuleDict()
        self.peers = nn.ModuleDict()
        # per-step state lives in a plain dict: nn.Module.__setattr__ is too slow for every step
        self._now: dict[str, Any] = {"step": 0, "task_weight": 1.0, "losses": {}, "raw_losses": {}, "metrics": {}}
        # an integration whose loop owns the step count (micro-batches of one update share a step) sets False
        self.counts_steps = True
        # the loop that generates the batches of the config's `on_policy:` sets True (the HF adapter does); a
        # config asking for them in a loop that does not would otherwise train off-policy without a word
        self.applies_on_policy = False
        self.teacher_loss = teacher_loss or default_teacher_loss
        self._models: dict[str, _Model] = {}
        self._taps: dict[Tap, str] = {}
        self._explicit_policy: set[Tap] = set()
        self._modules_of_taps: dict[Tap, nn.Module] = {}
        self._params: dict[Tap, torch.Tensor] = {}
        self._owned: dict[str, list[nn.Module]] = {}
        self._undo: list[Callable[[], None]] = []
        self._recorder = Recorder()
        self._active_roles: list[str] = []
        self._installed = False
        self._dry = False
        self._evaluating = False
        self._closed = False
        self._pm = None
        self._student_ref: weakref.ref[nn.Module] | None = None
        self._claim(student)
        try:
            self.config = load_config(config)
            self._pm, self.registry = plugin_manager(self.config.plugins, self.config.disable_plugins)
            self.task_weight = parse_number(self.config.task_weight, self.registry, "task_weight")
            self.terms = build_terms(self.config, self.registry)
            for term in self.config.terms:
                if isinstance(term, Term):
                    check_options(term)  # made in Python: validated like the config's terms, before attaching
            if not self.terms:
                warnings.warn("the config has no terms: this Distiller only scales the task loss by task_weight "
                              "(add terms, e.g. `terms: [{kind: kd, temperature: 4}]`)", UserWarning, stacklevel=2)
            self.add_model("student", student, trainable=True)
            teachers = teacher if isinstance(teacher, Mapping) else {} if teacher is None else {"teacher": teacher}
            for role, module in teachers.items():
                self.add_model(role, module, call=teacher_call)
            for term in self.terms:
                self._pm.register(term, name=f"term:{term.name}")
            check_pending(self._pm)  # a term's own marked hook (a cache's kdhooks_teacher_forward) must exist
            self._pm.hook.kdhooks_configure(distiller=self)
            self._install()
            shapes = dry_run(self, example_inputs) if example_inputs is not None else {}
            self._pm.hook.kdhooks_build(distiller=self, shapes=shapes)
            self._set_step_values()
        except BaseException:
            self.close()
            raise

    # --- public API for plugins and integrations -----------------------------------

    @property
    def student(self) -> nn.Module:
        return self._models["student"].module

    @property
    def teacher(self) -> nn.Module | None:
        model = self._models.get("teacher")
        return model.module if model else None

    @property
    def roles(self) -> list[str]:
        return list(self._models)

    def model(self, role: str) -> nn.Module:
        return self._models[role].module

    def is_trainable(self, role: str) -> bool:
        return self._models[role].trainable

    def add_model(self, role: str, module: nn.Module, *, trainable: bool = False,
                  call: TeacherCall | None = None, owner: str | None = None) -> None:
        """Run ``module`` on the student's inputs every training step, under ``role``.

        A teacher (``trainable=False``) is frozen and kept in eval mode until
        ``close()``; a trainable peer becomes a submodule of the Distiller,
        owned by the term ``owner`` (see ``zero_touching``).
        """
        if role in self._models:
            raise ConfigError(role, f"a model is already attached as {role!r}", fix="choose another role name")
        if not isinstance(module, nn.Module):
            raise ConfigError(role, f"the {role} must be a torch.nn.Module, got {type(module).__name__}")
        if role != "student":
            check_separate(role, module, {r: m.module for r, m in self._models.items()}, shared_allowed=trainable)
        self._models[role] = _Model(module, trainable, call)
        if role == "student":
            return
        if trainable:
            self.peers[role] = module
            if owner is not None:
                self._owned.setdefault(owner, []).append(module)
            return
        self._undo.append(freeze(module))

    def _claim(self, student: nn.Module) -> None:
        """Refuse a second live Distiller on ``student``; register this one as its Distiller."""
        if not isinstance(student, nn.Module):
            return
        live = attached(student)
        if live is not None:
            # a Distiller only referenced from a cycle (a notebook's `del kd`) is collected first
            del live
            gc.collect()
            live = attached(student)
        if live is not None:
            self._closed = True
            raise ConfigError("student", f"this student already has a Distiller attached ({live.extra_repr()}); "
                              f"two would each run the teacher and record on every step",
                              fix="call close() on the first one (or use `with Distiller(...) as kd:`); "
                              "kdhooks.attached(student) returns it")
        _ATTACHED[student] = weakref.ref(self)
        self._student_ref = weakref.ref(student)

    def add_tap(self, tap: Tap, location: str = "tap", *, explicit_policy: bool = False) -> None:
        """Record ``tap`` from now on; a ConfigError if its role or path does not exist.

        ``explicit_policy``: the term chose what a module called several times gives
        (``calls:``), so the dry pass does not warn about such a module.
        """
        if explicit_policy or tap.policy != "last":
            self._explicit_policy.add(tap)
        if tap in self._taps:
            return
        if tap.role not in self._models:
            raise ConfigError(location, f"no model is attached as {tap.role!r}", value=tap.role,
                              fix=did_you_mean(tap.role, self._models) or f"roles: {', '.join(self._models)}")
        model = self._models[tap.role].module
        if tap.kind == "param":
            param = resolve_parameter(model, tap.module_path, role=tap.role, location=location)
            self._params[tap] = param if self.is_trainable(tap.role) else param.detach()
        else:
            self._modules_of_taps[tap] = resolve_module(model, tap.module_path, role=tap.role, location=location)
        self._taps[tap] = location
        if tap.kind != "param" and tap.role != "student" and tap.role not in self._active_roles:
            self._active_roles.append(tap.role)
        if self._installed and tap.kind != "param":
            self._recorder.install(tap.role, {tap: self._modules_of_taps[tap]}, detach=not self.is_trainable(tap.role))
        if tap.kind == "grad" and not self.is_trainable(tap.role):
            self._models[tap.role].needs_grad = True
            # its own loss is formed from its output: keep that capture in the graph
            self._recorder.keep_graph.add(Tap(tap.role, "", "output"))
            self.add_tap(Tap(tap.role, "", "output"), location)
        if tap.kind == "attention":
            undo = use_eager_attention(model, location, tap.role)
            if undo is not None:
                self._undo.append(undo)

    def add_connector(self, owner: str, student_shape: tuple, teacher_shape: tuple, kind: str = "auto",
                      location: str | None = None) -> nn.Module:
        """A connector kind ``kind`` from student to teacher shape, owned by a term."""
        location = location or owner
        factory = self.registry.lookup("connector", kind, location)
        try:
            module = factory(tuple(student_shape), tuple(teacher_shape))
        except ValueError as error:
            joins = [k for k, f in self.registry.connectors.items() if k != kind and _joins(f, student_shape, teacher_shape)]
            raise ConfigError(location, f"connector {kind!r} cannot join the student's {tuple(student_shape)} "
                              f"to the teacher's {tuple(teacher_shape)}: {error}", value=kind,
                              fix=f"use connector: {joins[0]}" if joins else
                              "tap layers whose features have the same kind of shape") from None
        return self.add_part(owner, module, table=self.connectors)

    def add_part(self, owner: str, module: nn.Module, table: nn.ModuleDict | None = None) -> nn.Module:
        """Make ``module`` trainable with the Distiller (a head, a paraphraser), owned by ``owner``."""
        table = self.parts if table is None else table
        key, n = owner, 1
        while key in table:
            key, n = f"{owner}#{n}", n + 1
        device = next((p.device for p in self.student.parameters()), None)
        table[key] = module.to(device) if device is not None else module
        # features may arrive in autocast's dtype while the loss is formed outside autocast
        module.register_forward_pre_hook(inputs_in_parameter_dtype, with_kwargs=True)
        self._owned.setdefault(owner, []).append(module)
        return module

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` in ``close()``: a plugin that hooks the user's model itself removes its hooks there.

        Callbacks run after the Distiller's own hooks are gone, the last registered first.
        """
        if self._closed:
            raise RuntimeError("this Distiller is closed: its hooks are removed")
        self._undo.append(callback)

    def wrap_call(self, role: str, wrapper: Callable[[TeacherCall], TeacherCall]) -> None:
        """Run the model under ``role`` with ``wrapper(call)``, ``call`` being ``teacher_call=`` or a plain call.

        Integrations use it to run an engine's wrapper of the model (FSDP, DeepSpeed) or to add a precision context.
        """
        if role not in self._models:
            raise ConfigError(role, f"no model is attached as {role!r}", value=role,
                              fix=did_you_mean(role, self._models) or f"roles: {', '.join(self._models)}")
        model = self._models[role]
        model.call = wrapper(model.call or _call_module)

    def plugin_of(self, term: Any) -> str:
        """The plugin that registered ``term``'s kind, with its package and version (for error messages)."""
        from ._manager import describe_plugin

        registry = getattr(self, "registry", None)
        name = registry.origin.get(("term", getattr(term, "kind", ""))) if registry is not None else None
        # a term class made in Python and never registered: its module
        return describe_plugin(name or type(term).__module__)

    def parameter_of(self, tap: Tap) -> torch.Tensor:
        return self._params[tap]

    @property
    def captures(self) -> dict[Tap, Any]:
        """This step's recorded values by tap (empty after the loss was formed)."""
        return self._recorder.captures

    def zero_touching(self, owner: str) -> torch.Tensor:
        """A zero that depends on every parameter ``owner`` owns (DDP needs a gradient for each)."""
        zero = torch.zeros((), device=next((p.device for p in self.student.parameters()), None))
        for module in self._owned.get(owner, []):
            for p in module.parameters():
                if p.requires_grad:
                    zero = zero + p.view(-1)[0] * 0
        return zero

    @property
    def taps(self) -> Mapping[Tap, str]:
        """Every installed tap with the config location that asked for it (read-only)."""
        return types.MappingProxyType(self._taps)

    @property
    def step(self) -> int:
        """The step schedules read. Each loss advances it by one unless ``counts_steps`` is False, where an
        integration sets it from its own counter (the Trainer's global step, the Runner's iteration)."""
        return self._now["step"]

    @step.setter
    def step(self, value: int) -> None:
        self._now["step"] = int(value)

    @property
    def current_task_weight(self) -> float:
        """``task_weight`` at the current step (a schedule's value, or the number)."""
        return float(value_at(self.task_weight, self.step))

    @property
    def last_losses(self) -> dict[str, float]:
        """Each part of the last loss as a float: ``task``, every term (weighted) and ``total``."""
        return {name: float(value) for name, value in self._now["losses"].items()}

    @property
    def last_raw_losses(self) -> dict[str, float]:
        """Each term's value in the last loss before its weight, as a float (``last_losses`` holds it weighted).

        A term whose weight is 0 at that step is not computed, so it is absent here.
        """
        return {name: float(value) for name, value in self._now["raw_losses"].items()}

    @property
    def is_evaluating(self) -> bool:
        """Whether this Distiller is inside ``evaluating()``."""
        return self._evaluating

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[Distiller]:
        """Evaluate the terms on held-out batches without training on them or changing the training state.

        ``with kd.evaluating(): out = student(x); parts = kd.loss_parts(task_loss(out, y), labels=y)``.
        Inside, the student's forwards are recorded in eval mode as well and the
        teachers and peers run on them (in the student's mode, without grad);
        ``kd(...)`` and ``loss_parts(...)`` return the terms' values at the current
        step, and ``last_losses`` / ``last_raw_losses`` hold them. The step does not
        advance and ``kdhooks_step_end`` is not called, so plugins' state (the NaN
        guard, caches, anything updated at the step's end) stays as it was; the
        connectors and parts are in eval mode. A term that cannot be evaluated
        (``grad`` taps, which need a backward through the inputs; a
        ``not_evaluable`` term) is left out, with a warning once. On exit, after
        an error too, the training state is back: the step, the last losses and
        metrics, the modes, and the captures of a training forward not yet given to ``kd(...)``.
        """
        if self._closed:
            raise RuntimeError("this Distiller is closed: its hooks are removed")
        if self._evaluating:
            yield self  # nested: the outer one restores
            return
        saved_now = dict(self._now)
        saved_captures = self._recorder.set_aside()
        modes = {**training_modes(self.connectors), **training_modes(self.parts)}
        self._evaluating = True
        try:
            self.connectors.eval()
            self.parts.eval()
            yield self
        finally:
            self._evaluating = False
            restore_modes(modes)
            self._recorder.put_back(saved_captures)
            self._now.clear()
            self._now.update(saved_now)
            self._set_step_values()  # the terms' scheduled options at the restored step

    @property
    def last_metrics(self) -> dict[str, Any]:
        """Metrics the terms logged on the last step (``ctx.log``), not part of the loss."""
        return self._now["metrics"]

    # --- the step ---------------------------------------------------------------------

    def forward(self, task_loss: torch.Tensor | None = None, **extras: Any) -> torch.Tensor:
        return self._step(task_loss, extras)[1]

    def loss_parts(self, task_loss: torch.Tensor | None = None, **extras: Any) -> dict[str, torch.Tensor]:
        """The step as ``kd(task_loss, **extras)`` takes it, but its weighted parts by name instead of their sum.

        For an engine that adds and logs named losses itself (mmengine sums every ``loss*`` entry).
        """
        return self._step(task_loss, extras)[0]

    def _step(self, task_loss: torch.Tensor | None,
              extras: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self._closed:
            raise RuntimeError("this Distiller is closed: its hooks are removed")
        if self.config.on_policy is not None and not self.applies_on_policy:
            raise ConfigError("on_policy", "the config asks for on-policy distillation (batches the student "
                              "generates), and the loop calling this Distiller does not generate them",
                              fix="train with kdhooks.integrations.hf (DistillationTrainer or with_distillation), "
                              "or remove `on_policy:`; a loop of your own that generates with kdhooks.OnPolicy's "
                              "helpers sets kd.applies_on_policy = True")
        self._set_step_values()
        self._now["metrics"] = {}
        evaluating = self._evaluating
        ctx = LossContext(self, task_loss, extras, evaluating=evaluating)
        try:
            self._recorder.merged()
            results = self._pm.hook.kdhooks_losses(ctx=ctx)
        except CaptureError as error:
            raise LossError(self._taps.get(error.tap, error.tap.path), self.step,
                            problem=in_place_problem(self, error), fix=error.fix) from None
        finally:
            self._recorder.clear()
        parts: dict[str, torch.Tensor] = {}
        if task_loss is not None:
            task_weight = self._now["task_weight"]
            parts["task"] = task_loss if task_weight == 1 else task_weight * task_loss
        for result in reversed(results):
            for name, value in (result or {}).items():
                if name in parts:
                    raise ConfigError(name, f"two plugins return a loss named {name!r}",
                                      fix="give the terms distinct `name:`s")
                parts[name] = value
        total = functools.reduce(operator.add, parts.values()) if parts else torch.zeros(())
        losses = {name: value.detach() for name, value in parts.items()}
        losses["total"] = total.detach()
        self._now["losses"] = losses
        self._now["raw_losses"] = {name: value.detach() for name, value in ctx._raw.items()}
        if evaluating:
            return parts, total  # values only: no step's end for plugins, no step advanced
        self._pm.hook.kdhooks_step_end(distiller=self, losses=dict(losses))
        if self.counts_steps:
            self._now["step"] += 1
        return parts, total

    def _set_step_values(self) -> None:
        self._now["task_weight"] = value_at(self.task_weight, self.step)
        for term in self.terms:
            term.set_step(self.step)

    # --- hooks ------------------------------------------------------------------------

    def _install(self) -> None:
        by_role: dict[str, dict[Tap, nn.Module]] = {}
        for tap, module in self._modules_of_taps.items():
            by_role.setdefault(tap.role, {})[tap] = module
        for role, modules in by_role.items():
            self._recorder.install(role, modules, detach=not self.is_trainable(role), root=self.model(role))
        root = self.student
        handles = self._recorder.handles
        # weak: the student's hooks must not keep a Distiller alive that the user dropped
        handles.append(root.register_forward_pre_hook(model_hook(self._student_starts, weak=True), with_kwargs=True,
                                                      prepend=True))
        handles.append(root.register_forward_hook(model_hook(self._student_ends, weak=True), always_call=True))
        self._installed = True

    def _student_starts(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch._C._current_graph_task_id() != -1:
            # a forward inside backward: activation checkpointing recomputing a segment, not a new step
            return
        recording = self.student.training or self._dry or self._evaluating
        self._recorder.recording["student"] = recording
        if not recording:
            return
        self._recorder.with_grad["student"] = torch.is_grad_enabled() and not self._dry
        self._recorder.begin_forward()
        for role in self._active_roles:
            self._run(role, args, kwargs)

    def _student_ends(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._recorder.recording["student"] = False

    def _run(self, role: str, args: tuple, kwargs: dict) -> Any:
        model = self._models[role]
        if model.trainable:
            if model.module.training != self.student.training:
                # only when the root's mode differs: a submodule the user froze in eval stays so
                model.module.train(self.student.training)
            grad = torch.is_grad_enabled() and not self._dry and not self._evaluating
        else:
            if model.module.training:
                model.module.eval()
            # evaluation leaves out the terms with gradient taps: no teacher backward to prepare for
            grad = model.needs_grad and not self._dry and not self._evaluating
        self._recorder.recording[role] = True
        self._recorder.with_grad[role] = grad
        try:
            with torch.set_grad_enabled(grad):
                if not model.trainable:
                    # a teacher kept in lower precision than the student's inputs gets them in its dtype
                    args, kwargs = cast_floats((args, kwargs), floating_dtype(model.module))
                    output = self._pm.hook.kdhooks_teacher_forward(distiller=self, role=role, args=args, kwargs=kwargs)
                    if isinstance(output, Recorded):
                        for tap, value in output.captures.items():
                            self._recorder.store(tap, value, detach=True, role=role)
                        return None
                    if output is not None:
                        # the model did not run: its output taps read what the plugin gave, nothing inside it records
                        record = self._recorder.root_outputs.get(role)
                        if record is not None:
                            record(model.module, args, output)
                        return output
                if model.call is not None:
                    return model.call(model.module, args, kwargs)
                return model.module(*args, **kwargs)
        finally:
            self._recorder.recording[role] = False

    # --- state and lifetime -------------------------------------------------------------

    def get_extra_state(self) -> torch.Tensor:
        # a tensor, so that every checkpoint format (safetensors included) can hold the step
        return torch.tensor(self.step)

    def set_extra_state(self, state: torch.Tensor | dict[str, Any]) -> None:
        self.step = int(state["step"] if isinstance(state, Mapping) else state)
        self._set_step_values()

    def close(self) -> None:
        """Remove every hook, drop captures, give the teacher back as it was. Idempotent."""
        if self._closed:
            return
        self._closed = True
        student = self._student_ref() if self._student_ref is not None else None
        if student is not None and _ATTACHED.get(student) is not None and _ATTACHED[student]() is self:
            del _ATTACHED[student]
        self._recorder.remove()
        if self._pm is not None:
            for name, plugin in list(self._pm.list_name_plugin()):
                if name and name.startswith("term:"):
                    self._pm.unregister(plugin)
        while self._undo:
            self._undo.pop()()

    def __del__(self) -> None:
        if getattr(self, "_closed", True) or sys.is_finalizing():
            return  # at interpreter exit the process ends anyway, and torch may already be torn down
        warnings.warn("a Distiller was garbage-collected without close(): its hooks are removed and its "
                      "teacher unfrozen now; call kd.close() or use `with Distiller(...) as kd:`",
                      ResourceWarning, stacklevel=2)
        self.close()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a Distiller holds hooks on live models and cannot be pickled or copied: save "
                        "kd.state_dict() (connectors, heads, step) next to the student's and load it into a new "
                        "Distiller")

    def __deepcopy__(self, memo: dict) -> Any:
        return self.__reduce_ex__(2)

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def extra_repr(self) -> str:
        terms = ", ".join(f"{t.name}({t.kind})" for t in getattr(self, "terms", []))
        return f"step={self.step}, terms=[{terms}]"


def _call_module(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    return module(*args, **kwargs)


def _joins(factory: Callable, student_shape: tuple, teacher_shape: tuple) -> bool:
    try:
        factory(tuple(student_shape), tuple(teacher_shape))
        return True
    except ValueError:
        return False
