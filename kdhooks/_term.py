"""The loss term: options as typed fields, taps, a formula."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from ._errors import ConfigError, LossError, PluginError, did_you_mean
from ._options import Finite, Options
from ._schedule import Schedule, value_at
from ._taps import shape_of
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from ._context import LossContext
    from ._distiller import Distiller
    from ._taps import Tap


# the hooks the core implements once for every term, with the term method each one calls
_CORE_HOOKS = {"kdhooks_configure": "configure(self, distiller)", "kdhooks_build": "build(self, distiller, shapes)",
               "kdhooks_losses": "loss(self, ctx, **captures)"}


class Term(Options):
    """One configured loss term; a plugin subclasses it and fills its methods, never pluggy's hooks.

    In order: ``configure(distiller)`` prepares with the models at hand (adds a
    peer, finds a layer stack), ``taps()`` names what to record as ``{argument
    name: Tap}`` without side effects, ``check(shapes)`` refuses shapes the method
    cannot use, ``build(distiller, shapes)`` makes connectors from them, and
    ``loss(ctx, **captures)`` is the paper's formula on the captured tensors;
    ``extras_needed()`` names what the step must pass besides captures
    (``kd(loss, gt_boxes=...)``). The core implements the pluggy hooks once, here,
    and calls these: a subclass that defines a ``kdhooks_*`` method is refused
    when it is defined, since its hook would silently replace the core's. The Distiller multiplies the result
    by ``weight``; any numeric option, ``weight`` included, may be a schedule.
    ``teacher_role`` picks, among several teachers (``Distiller(student,
    {"resnet": t1, "vit": t2})``), the one that the term's ``teacher`` taps read.
    ``calls`` says what a tapped module called several times in one forward gives:
    its ``first`` or ``last`` call, or ``all`` calls as a list; ``clone: true``
    copies each capture when it is recorded, so that an in-place op after the
    tapped module (``out += identity``, ``ReLU(inplace=True)``) cannot change it.
    """

    kind: ClassVar[str] = ""
    # a term whose loss() reads a list of every call's capture per tap (`calls: all`) says so
    takes_all_calls: ClassVar[bool] = False
    # why loss() cannot run under Distiller.evaluating() (what it reads exists only in training forwards);
    # empty: it can. Such a term is left out of evaluation with a note. Terms with `grad` taps are left out anyway.
    not_evaluable: ClassVar[str] = ""
    name: str = ""
    weight: Finite = 1.0
    teacher_role: str = "teacher"
    calls: Literal["first", "last", "all"] | None = None
    clone: bool = False

    # set by the Distiller
    location: ClassVar[str] = "terms"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the hooks the core implements for every term; a term may add the others (marked), e.g. a teacher cache
        hooks = sorted(name for name in vars(cls) if name in _CORE_HOOKS
                       or (name.startswith("kdhooks_") and not hasattr(vars(cls)[name], "kdhooks_impl")))
        core = [h for h in hooks if h in _CORE_HOOKS]
        if core:
            raise TypeError(f"term class {cls.__module__}.{cls.__qualname__} defines {', '.join(core)}: these hooks "
                            f"are the core's for every term, and overriding one drops what the core does there "
                            f"(declaring its taps, checking shapes, weighting the loss)\n  fix: define "
                            + " / ".join(_CORE_HOOKS[h] for h in core))
        if hooks:
            raise TypeError(f"term class {cls.__module__}.{cls.__qualname__} defines {', '.join(hooks)} without "
                            f"@kdhooks.hookimpl, so pluggy would ignore it\n  fix: put @kdhooks.hookimpl above it")

    def configure(self, distiller: Distiller) -> None:
        """Prepare with the attached models, before ``taps()`` is read (add peers, resolve layer stacks)."""

    def taps(self) -> dict[str, Tap]:
        """What to record, by the argument name ``loss`` receives it under; no side effects."""
        return {}

    def extras_needed(self) -> set[str]:
        """Names the step must pass as ``kd(task_loss, name=value)`` besides labels (an integration does)."""
        return set()

    def check(self, shapes: dict[str, Any]) -> None:
        """Raise a ConfigError (``kdhooks.expect_*``) if the taps' shapes cannot work for this method.

        Called at attach with the dry pass's shapes, or on the first step from the captures.
        """

    def build(self, distiller: Distiller, shapes: dict[str, Any]) -> None:
        """Make connectors or heads once the shapes of the taps are known."""

    def loss(self, ctx: LossContext, **captures: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """The unweighted loss, or named parts of it, from this step's captures."""
        raise TypeError(f"term {type(self).__name__} does not define loss()")

    # --- lifecycle, as pluggy hooks -------------------------------------------------

    def role(self, role: str) -> str:
        """The attached model that this term's ``role`` names: ``teacher`` is ``teacher_role``."""
        return self.teacher_role if role == "teacher" else role

    def scheduled(self) -> dict[str, Schedule]:
        """The options that follow a schedule, by option name."""
        return {k: v for k, v in vars(self).items() if isinstance(v, Schedule)}

    def set_step(self, step: int) -> None:
        for option, schedule in self._schedules.items():
            setattr(self, option, value_at(schedule, step))

    def location_of(self, name: str) -> str:
        """The config location of the option that tap ``name`` came from (for error messages)."""
        return self._locations.get(name, self.location)

    def _option_holding(self, path: str, role: str) -> str | None:
        """The option a tap's path came from (for error locations): the one named after its role first."""
        holding = [option for option in self.option_names()
                   if option != "name" and getattr(self, option, None) == path]
        return role if role in holding else holding[0] if holding else None

    @hookimpl
    def kdhooks_configure(self, distiller: Distiller) -> None:
        self._schedules = self.scheduled()
        self.set_step(distiller.step)
        self._checked = False
        self._warned_detached = False
        self._noted_not_evaluated = False
        if self.teacher_role != "teacher" and self.teacher_role not in distiller.roles:
            raise ConfigError(f"{self.location}.teacher_role", f"no teacher is attached as {self.teacher_role!r}",
                              value=self.teacher_role, fix=did_you_mean(self.teacher_role, distiller.roles)
                              or f"attached: {', '.join(distiller.roles)}")
        if self.calls == "all" and not self.takes_all_calls:
            raise ConfigError(f"{self.location}.calls", f"{self.kind or type(self).__name__} reads one tensor per "
                              f"tap, and `calls: all` gives it a list of every call's output", value="all",
                              fix="use `calls: first` or `calls: last`, or tap a module that runs once per forward")
        with _blamed(self, distiller, "configure()"):
            self.configure(distiller)
        self._extras = frozenset(self.extras_needed())
        with _blamed(self, distiller, "taps()"):
            declared = self.taps()
        _check_declared(self, declared, distiller)
        self._taps, self._locations = {}, {}
        for name, tap in declared.items():
            changes: dict[str, Any] = {}
            if tap.role == "teacher":
                changes["role"] = self.teacher_role
            if tap.kind in ("output", "input", "attention"):
                if self.calls is not None and tap.policy == "last":
                    changes["policy"] = self.calls
                if self.clone:
                    changes["clone"] = True
            self._taps[name] = dataclasses.replace(tap, **changes) if changes else tap
            option = tap.option or self._option_holding(tap.path, tap.role)
            self._locations[name] = f"{self.location}.{option}" if option else self.location
        for name, tap in self._taps.items():
            distiller.add_tap(tap, location=self._locations[name], explicit_policy=self.calls is not None)

    @hookimpl
    def kdhooks_build(self, distiller: Distiller, shapes: dict[Any, Any]) -> None:
        if all(tap in shapes for tap in self._taps.values()):
            with _blamed(self, distiller, "check()"):
                self.check({name: shapes[tap] for name, tap in self._taps.items()})
            self._checked = True
        if type(self).build is Term.build:
            return
        # parameters are known without a dry pass
        shapes = {**shapes, **{tap: tuple(distiller.parameter_of(tap).shape)
                               for tap in self._taps.values() if tap.kind == "param"}}
        missing = [name for name, tap in self._taps.items() if tap not in shapes]
        if missing:
            raise ConfigError(self.location, f"term {self.name!r} sizes its connectors from the "
                              f"shapes of {missing}, which are not known",
                              fix="pass example_inputs= to Distiller so a dry pass can record them")
        with _blamed(self, distiller, "build()"):
            self.build(distiller, {name: shapes[tap] for name, tap in self._taps.items()})

    @hookimpl
    def kdhooks_losses(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            # switched off by its schedule: keep its parameters in the graph for DDP, cheaply
            return {self.name: ctx.distiller.zero_touching(self.name)}
        if ctx.evaluating and self._left_out_of_evaluation():
            return {}
        if self._extras and not self._extras <= ctx.extras.keys():
            missing = sorted(self._extras - ctx.extras.keys())
            raise LossError(self.name, ctx.step, problem=f"the step's extras have no {', '.join(map(repr, missing))}, "
                            f"which {self.kind} reads", fix=f"pass them: kd(task_loss, {missing[0]}=...) (the "
                            f"integrations for detectors do)")
        captures = {name: ctx[tap] for name, tap in self._taps.items()}
        if not self._checked:
            # no dry pass at attach: the shapes are checked once, on the first step
            self.check({name: _shape_or_value(value) for name, value in captures.items()})
            self._checked = True
        try:
            value = self.loss(ctx, **captures)
        except Exception as error:
            if hasattr(error, "add_note"):
                error.add_note(f"in loss term {self.name!r} (kind {self.kind!r}, from plugin "
                               f"{ctx.distiller.plugin_of(self)})")
            raise
        if isinstance(value, dict):
            named = {f"{self.name}.{part}" if part else self.name: v for part, v in value.items()}
            for name, v in named.items():
                self._check_value(ctx, v, captures, name)
        else:
            self._check_value(ctx, value, captures, self.name)
            named = {self.name: value}
        ctx._raw.update(named)
        return {name: _weighted(self.weight, v) for name, v in named.items()}

    def _left_out_of_evaluation(self) -> bool:
        """Whether loss() cannot run in evaluation; says why once (a warning) when so."""
        grads = [f"the {tap.role}'s {tap.path or 'input'}" for tap in self._taps.values() if tap.kind == "grad"]
        reason = (f"it reads gradients (dL/dx) at {' and '.join(grads)}, which need a backward pass through the "
                  f"inputs that evaluation does not run" if grads else self.not_evaluable)
        if reason and not self._noted_not_evaluated:
            self._noted_not_evaluated = True
            warnings.warn(f"loss term {self.name!r} (kind {self.kind!r}) is left out of evaluation: {reason}; "
                          f"the evaluated losses omit it", UserWarning, stacklevel=2)
        return bool(reason)

    def _check_value(self, ctx: LossContext, value: Any, captures: dict[str, Any], part: str) -> None:
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            got = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                   else f"{type(value).__name__} {value!r}"[:120])
            raise PluginError(self, ctx.distiller.plugin_of(self),
                              f"loss() must return a 0-dim tensor (or a dict of them) in the graph; "
                              f"part {part!r} is {got}",
                              fix="reduce per-sample values with .mean() and compute with torch ops, not floats")
        if not value.requires_grad and not self._warned_detached and torch.is_grad_enabled() \
                and any(_requires_grad(v) for v in captures.values()):
            self._warned_detached = True
            warnings.warn(f"loss term {part!r} (kind {self.kind!r}, from plugin {ctx.distiller.plugin_of(self)}) "
                          f"returned a tensor without a gradient although "
                          f"its inputs have one: it counts in the loss but trains nothing (a .detach(), .item() "
                          f"or torch.no_grad() in its loss?)", RuntimeWarning, stacklevel=2)


def check_options(term: Term) -> None:
    """Validate a term made in Python (``KD(temperature=0.0)``) as a config's term is: each option in its range,
    a scheduled one at every key step of its schedule. A ConfigError naming the option otherwise."""
    values = {name: getattr(term, name) for name in term.option_names()}
    schedules = {name: value for name, value in values.items() if isinstance(value, Schedule)}
    for step in sorted({0, *(s for schedule in schedules.values() for s in schedule.key_steps())}):
        try:
            type(term).validate({**values, **{name: schedule(step) for name, schedule in schedules.items()}},
                                term.location)
        except ConfigError as error:
            if step == 0:
                raise
            raise ConfigError(error.location, f"at step {step} its schedule gives {error.value!r}: {error.problem}",
                              value=error.value, fix="keep the schedule's values in the option's range") from None


def _check_declared(term: Term, declared: Any, distiller: Distiller) -> None:
    """taps() returns {name: Tap}, and every name is a parameter of loss() (mmrazor checks its mapping likewise)."""
    from ._taps import Tap

    plugin = distiller.plugin_of(term)
    if not isinstance(declared, dict) or not all(isinstance(k, str) and isinstance(v, Tap)
                                                 for k, v in declared.items()):
        raise PluginError(term, plugin, f"taps() must return a dict {{argument name: kdhooks.Tap}}, "
                          f"got {type(declared).__name__}"[:200],
                          fix="return e.g. {'student_logits': kdhooks.Tap('student', 'logits'), ...}")
    if type(term).loss is Term.loss:
        raise PluginError(term, plugin, "the term defines no loss()", fix="define loss(self, ctx, **captures)")
    parameters = list(inspect.signature(term.loss).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    named = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY)}
    required = {p.name for p in parameters if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    unknown, missing = sorted(set(declared) - named), sorted(required - set(declared))
    if unknown or missing:
        sides = ([f"tap {unknown} is not a parameter of loss()"] if unknown else []) + \
                ([f"loss() parameter {missing} has no tap"] if missing else [])
        if len(unknown) == 1 and len(missing) == 1:
            fix = f"rename tap {unknown[0]!r} to {missing[0]!r}"
        elif unknown and named - set(declared):
            fix = f"rename tap {unknown[0]!r} to one of loss()'s untapped parameters {sorted(named - set(declared))}"
        elif unknown:
            fix = f"add a parameter {unknown[0]!r} to loss(), or remove that tap from taps()"
        else:
            fix = f"add a tap named {missing[0]!r} to taps(), or give that parameter of loss() a default"
        raise PluginError(term, plugin, f"taps() and loss() disagree: {'; '.join(sides)} (taps() names "
                          f"{sorted(declared)}, loss(ctx, ...) takes {sorted(named)})", fix=fix)


@contextlib.contextmanager
def _blamed(term: Term, distiller: Distiller, method: str) -> Iterator[None]:
    """An unexpected exception from a plugin's ``method`` gets a note naming the term, its kind and its plugin."""
    try:
        yield
    except (ConfigError, PluginError):
        raise  # these name the term already
    except Exception as error:
        error.add_note(f"in {method} of loss term {term.name!r} (kind {term.kind!r}, from plugin "
                       f"{distiller.plugin_of(term)})")
        raise


def _requires_grad(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (list, tuple)):
        return any(_requires_grad(v) for v in value)
    return False


def _shape_or_value(value: Any) -> Any:
    shape = shape_of(value)
    return value if shape is None else shape


def _weighted(weight: float, value: torch.Tensor) -> torch.Tensor:
    # weight 1 is the common case: no scalar op in the graph for it
    return value if weight == 1 else weight * value
