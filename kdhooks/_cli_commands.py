"""What the ``kdhooks`` commands do: load what the user names, run it, and explain what fails.

``kdhooks.cli`` parses the command line and reports errors; this module raises a
``UserError`` for every mistake in what the user gave (a module path, a factory,
an input shape, a config), so that the report is one line with the fix.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._attach import restore_modes, training_modes
from ._errors import ConfigError, LossError, PluginError, did_you_mean
from ._manager import installed_plugins, plugin_manager
from ._precision import cast_floats, floating_dtype
from ._taps import clean_path, logits_of, shape_of

DEBUG_HINT = "run with --debug for the traceback"


class UserError(Exception):
    """A mistake in what the user gave the command: reported as one line, exit status 2.

    ``original`` is the exception it explains, re-raised as it was under ``--debug``.
    """

    def __init__(self, problem: str, fix: str, original: BaseException | None = None):
        self.problem = problem
        self.fix = fix
        self.original = original
        super().__init__(f"{problem} (fix: {fix})")


def one_line(text: object, limit: int = 600) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe(error: BaseException) -> str:
    """``TypeName: message`` on one line (the type alone when the message is empty), with the notes
    added on the way up (a loss term adds which term raised)."""
    text = one_line(" ".join([str(error), *getattr(error, "__notes__", [])]))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def problem_and_fix(error: BaseException) -> tuple[str, str] | None:
    """(problem, fix) for an exception that is the user's mistake; None for anything else (a bug)."""
    if isinstance(error, UserError):
        return one_line(error.problem), one_line(error.fix)
    if isinstance(error, ConfigError):
        problem = f"{error.location}: {error.problem}" if error.location else str(error.problem)
        fix = error.fix or (f"correct {error.location}" if error.location else "correct the configuration")
        return one_line(problem), one_line(fix)
    if isinstance(error, (LossError, PluginError)):
        # their message ends with the fix on a line of its own: the problem is what comes before
        text = str(error).split("\n  fix: ")[0]
        return one_line(text), one_line(error.fix or "check the term's inputs and settings; " + DEBUG_HINT)
    return None


# --- loading what the user names ------------------------------------------------------------


def load_factory(spec: str, option: str = "model") -> nn.Module:
    """Build a model from ``package.module:factory`` or ``path/to/file.py:factory``.

    ``option`` names where the spec came from (``--student``) in the error messages.
    """
    module_name, _, factory_name = spec.rpartition(":")
    if not module_name or not factory_name:
        raise UserError(f"{option} {spec!r} is not MODULE:FACTORY",
                        "e.g. kdhooks.demo:student_cnn or my_models.py:build_student")
    module = _load_module(module_name, option)
    factory = getattr(module, factory_name, None)
    if factory is None:
        callables = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        hint = did_you_mean(factory_name, callables)
        raise UserError(f"{option}: {module_name} has no {factory_name!r}",
                        hint or f"name a function defined in {module_name} that returns the model"
                        + (f" ({', '.join(sorted(callables)[:8])})" if callables else ""))
    if not callable(factory):
        raise UserError(f"{option}: {module_name}.{factory_name} is a {type(factory).__name__}, not a factory",
                        "name a function (or class) that takes no arguments and returns the model")
    try:
        model = factory()
    except Exception as error:
        raise UserError(f"{option}: the factory {spec!r} raised {describe(error)}",
                        f"fix the factory or name another one; {DEBUG_HINT}", error) from error
    if not isinstance(model, nn.Module):
        raise UserError(f"{option}: the factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module",
                        "make the factory return the model")
    return model


def _load_module(module_name: str, option: str) -> Any:
    if module_name.endswith(".py"):
        return _load_file(module_name, option)
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None)
        # the module itself (or a package on its path) is missing, rather than something it imports
        if isinstance(error, ModuleNotFoundError) and missing and (
                module_name == missing or module_name.startswith(missing + ".")):
            fix = (f"check the name {module_name!r} (python -c 'import {module_name}' must work from this "
                   f"folder), install the package that provides it, or give a file as path/to/file.py:FACTORY")
            raise UserError(f"{option}: no module named {missing!r}", fix, error) from error
        needed = f"install {missing!r}" if missing else "install what it needs"
        raise UserError(f"{option}: importing {module_name!r} failed: {describe(error)}",
                        f"{needed} (pip install ...), then retry; {DEBUG_HINT}", error) from error
    except Exception as error:
        raise UserError(f"{option}: importing {module_name!r} raised {describe(error)}",
                        f"fix the error in that module; {DEBUG_HINT}", error) from error


def _load_file(file_name: str, option: str) -> Any:
    path = Path(file_name)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"{option}: the file {file_name!r} {problem} (looked in {Path.cwd()})",
                        "give the path of an existing .py file, relative to the current folder or absolute")
    loaded = importlib.util.spec_from_file_location(path.stem, path)
    if loaded is None or loaded.loader is None:
        raise UserError(f"{option}: cannot load {file_name!r} as Python", "give a .py file")
    module = importlib.util.module_from_spec(loaded)
    try:
        loaded.loader.exec_module(module)
    except Exception as error:
        raise UserError(f"{option}: running {file_name!r} raised {describe(error)}",
                        f"fix the error in that file; {DEBUG_HINT}", error) from error
    return module


def parse_shape(shape: str) -> list[int]:
    """``'2,1,8,8'`` or ``'2x1x8x8'`` as a list of positive ints; a UserError names anything else."""
    text = shape.strip()
    for separator in ("x", "X", "×"):
        text = text.replace(separator, ",")
    pieces = [p.strip() for p in text.split(",")]
    bad = [p for p in pieces if not (p.isdigit() and int(p) > 0)]
    if text and not bad:
        return [int(p) for p in pieces]
    why = f"{bad[0]!r} is not a positive integer" if text else "it is empty"
    raise UserError(f"--input-shape {shape!r} is not a shape: {why}",
                    "give positive integers separated by commas or x, batch first, e.g. --input-shape 2,1,8,8")


def example_input(shape: str, dtype: str, vocab: int) -> torch.Tensor:
    """A random input of ``shape``: normal floats, or token ids below ``vocab`` for ``dtype='long'``."""
    dims = parse_shape(shape)
    if dtype == "long":
        if vocab < 1:
            raise UserError(f"--vocab {vocab} leaves no token ids to draw", "give --vocab 1 or more")
        return torch.randint(0, vocab, dims)
    return torch.randn(dims)


def _config_source(config: str) -> str | Path:
    """The config path as the Distiller should read it (any suffix), or a UserError if there is no such file."""
    path = Path(config)
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"the config {config!r} is a directory", "give the path of a YAML config file")
    if ": " in config or "\n" in config or config.lstrip().startswith("{"):
        return config  # an inline YAML mapping
    raise UserError(f"the config file {config!r} does not exist (looked in {Path.cwd()})",
                    "give the path of a YAML config file, e.g. kdhooks check kd.yaml ...")


# --- running a model on the example input -----------------------------------------------------

# the layers whose weights say what input a model takes
_FIRST_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)


def _expects(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{module.in_channels} input channels (dim 1 of a {module.weight.dim()}-d input)"
    if isinstance(module, nn.Linear):
        return f"{module.in_features} input features (the last dim)"
    return f"token ids below {module.num_embeddings} (--input-dtype long --vocab {module.num_embeddings})"


def _suggested_shape(module: nn.Module, dims: list[int]) -> str | None:
    if isinstance(module, nn.modules.conv._ConvNd) and len(dims) == module.weight.dim() and module.in_channels:
        return ",".join(str(d) for d in [dims[0], module.in_channels, *dims[2:]])
    if isinstance(module, nn.Linear) and module.in_features and dims:
        return ",".join(str(d) for d in [*dims[:-1], module.in_features])
    return None


def forward_or_explain(model: nn.Module, role: str, x: torch.Tensor, args: argparse.Namespace,
                       original: BaseException | None = None) -> Any:
    """``model(x)`` in eval mode without gradients; a failure becomes a UserError naming the shape given,
    the module it failed in and what the model's first Conv/Linear/Embedding layer expects."""
    names = {m: clean_path(n) for n, m in model.named_modules()}
    first: list[nn.Module] = []
    open_leaves: list[nn.Module] = []

    def starts(module: nn.Module, inputs: Any) -> None:
        if isinstance(module, _FIRST_LAYERS) and not first:
            first.append(module)
        open_leaves.append(module)

    def ends(module: nn.Module, inputs: Any, output: Any) -> None:
        if open_leaves and open_leaves[-1] is module:
            open_leaves.pop()

    handles = []
    for module in names:
        if next(module.children(), None) is None:
            handles.append(module.register_forward_pre_hook(starts))
            handles.append(module.register_forward_hook(ends))
    modes = training_modes(model)
    try:
        model.eval()
        with torch.no_grad():
            return model(cast_floats(x, floating_dtype(model)))
    except Exception as error:
        raise _input_error(role, x, args, error, first, open_leaves, names, original) from error
    finally:
        for handle in handles:
            handle.remove()
        restore_modes(modes)


def _input_error(role: str, x: torch.Tensor, args: argparse.Namespace, error: Exception,
                 first: list[nn.Module], open_leaves: list[nn.Module], names: dict[nn.Module, str],
                 original: BaseException | None) -> UserError:
    dims = list(x.shape)
    # the innermost leaf module still running when the error was raised is where it failed
    where = f" in {names[open_leaves[-1]] or '(root)'} ({type(open_leaves[-1]).__name__})" if open_leaves else ""
    given = f"--input-shape {args.input_shape}" + (" --input-dtype long" if args.input_dtype == "long" else "")
    problem = f"the {role}'s forward fails on {given}{where}: {describe(error)}"
    layer = first[0] if first else next((m for m in names if isinstance(m, _FIRST_LAYERS)), None)
    if layer is None:
        return UserError(problem, f"give the input shape (and --input-dtype) the {role} takes; {DEBUG_HINT}",
                         original or error)
    fix = f"the {role}'s first layer {names[layer]} ({type(layer).__name__}) expects {_expects(layer)}"
    suggested = _suggested_shape(layer, dims)
    if isinstance(layer, nn.Embedding) and args.input_dtype != "long":
        fix += ": give --input-dtype long"
    elif not isinstance(layer, nn.Embedding) and args.input_dtype == "long":
        fix += ", which are floats: leave out --input-dtype long"
    elif suggested and suggested != ",".join(map(str, dims)):
        fix += f": e.g. --input-shape {suggested}"
    else:
        fix += f"; give the input shape the {role} takes; {DEBUG_HINT}"
    return UserError(problem, fix, original or error)


# --- commands -------------------------------------------------------------------------------------


def run_plugins(args: argparse.Namespace) -> int:
    """``kdhooks plugins``: one row per installed plugin with the kinds it registers."""
    _, registry = plugin_manager()
    kinds: dict[str, list[str]] = {}
    for category, name, plugin in registry.kinds():
        kinds.setdefault(plugin, []).append(f"{category}:{name}")
    rows = [("plugin", "package", "version", "kinds")]
    for info in installed_plugins():
        rows.append((info.name, info.package, info.version, ", ".join(kinds.get(info.name, [])) or "(hooks only)"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def _calls_text(shapes: list[Any]) -> str:
    """Every call's output shape, in order: ``(2, 6)`` for one call, ``call 1: (2, 4); call 2: (2, 6)``
    for several; past eight calls, runs of one shape are grouped (``calls 1-12: (2, 6)``)."""
    texts = [str(s) for s in shapes]
    if len(texts) == 1:
        return texts[0]
    if len(texts) <= 8:
        return "; ".join(f"call {i}: {text}" for i, text in enumerate(texts, 1))
    runs: list[list[Any]] = []  # [shape text, first call, last call]
    for i, text in enumerate(texts, 1):
        if runs and runs[-1][0] == text:
            runs[-1][2] = i
        else:
            runs.append([text, i, i])
    return "; ".join(f"call {a}: {text}" if a == b else f"calls {a}-{b}: {text}" for text, a, b in runs)


def run_inspect(args: argparse.Namespace) -> int:
    """``kdhooks inspect``: every module's path, type and the output shape of each of its calls."""
    x = example_input(args.input_shape, args.input_dtype, args.vocab)
    model = load_factory(args.model, "model")
    shapes: dict[str, list[Any]] = {}
    # a failure in this command's own hooks is a bug in kdhooks, not in the model: it is kept out of
    # the forward (which would blame the model and the input shape) and raised after it
    hook_failures: list[Exception] = []
    handles = []
    for name, module in model.named_modules():
        def record(module: nn.Module, inputs: Any, output: Any, path: str = clean_path(name)) -> None:
            try:
                shape = shape_of(output)
                shapes.setdefault(path, []).append(shape if shape is not None else type(output).__name__)
            except Exception as error:
                hook_failures.append(error)
        handles.append(module.register_forward_hook(record))
    try:
        forward_or_explain(model, "model", x, args)
    finally:
        for handle in handles:
            handle.remove()
    if hook_failures:
        raise hook_failures[0]
    types = {clean_path(n) or "(output)": type(m).__name__ for n, m in model.named_modules()}
    shapes = {path or "(output)": calls for path, calls in shapes.items()}
    width = max(len(p) for p in types) + 2
    print(f"{'path':<{width}}{'module':<22}{'calls':<7}output shape (each call's, in order)")
    for path, kind in types.items():
        calls = shapes.get(path, [])
        shown = _calls_text(calls) if calls else "(not called)"
        print(f"{path:<{width}}{kind:<22}{len(calls):<7}{shown}")
    repeated = [path for path, calls in shapes.items() if len(calls) > 1]
    if repeated:
        print(f"called more than once per forward: {', '.join(repeated)} (a tap on one of them captures its "
              f"last call; set `calls: first` or `calls: all` on the term to choose)")
    return 0


def _teachers(args: argparse.Namespace) -> nn.Module | dict[str, nn.Module]:
    named = [spec.split("=", 1) for spec in args.teacher if "=" in spec.split(":", 1)[0]]
    if len(named) == len(args.teacher):
        return {role: load_factory(spec, f"--teacher {role}") for role, spec in named}
    if len(args.teacher) == 1:
        return load_factory(args.teacher[0], "--teacher")
    raise ConfigError("--teacher", "name every teacher or none" if named else "several teachers need names "
                      "(the terms' teacher_role)", value=args.teacher,
                      fix="--teacher resnet=MODULE:FACTORY --teacher vit=MODULE:FACTORY")


def _explain_dry_pass(error: Exception, student: nn.Module, teacher: Any, x: torch.Tensor,
                      args: argparse.Namespace) -> None:
    """After the Distiller's dry pass failed with ``error``: raise a UserError if a model alone fails on ``x``."""
    teachers = teacher if isinstance(teacher, dict) else {"teacher": teacher}
    for role, model in [("student", student), *teachers.items()]:
        forward_or_explain(model, role, x, args, original=error)


def _first_step(kd: Any, student: nn.Module, x: torch.Tensor) -> tuple[float, dict[str, float]]:
    """One training step's loss on the dry-pass inputs (no backward), the student's modes restored after.

    The dry pass only records shapes: the terms' losses run for the first time here, so a
    temperature or a class count that only breaks the formula is caught by ``check``.
    """
    modes = training_modes(student)
    try:
        student.train()
        logits = logits_of(student(x))
        labels = None
        if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and logits.shape[-1] > 0:
            # random labels over the student's classes: terms that read labels (dkd) get a valid one
            labels = torch.randint(0, logits.shape[-1], tuple(logits.shape[:-1]), device=logits.device)
        loss = kd(None, labels=labels) if labels is not None else kd(None)
        losses = kd.last_losses
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
    except Exception as error:
        found = problem_and_fix(error)
        problem, fix = found if found else (
            describe(error),
            f"check the terms against the models' outputs (class counts, temperatures > 0, paths); {DEBUG_HINT}")
        raise UserError(f"the first training step (student(x), then kd(None, labels=...)) failed: {problem}",
                        fix, error) from error
    finally:
        restore_modes(modes)
    bad = {name: v for name, v in losses.items() if not math.isfinite(v)}
    if bad or not math.isfinite(value):
        name, v = next(iter(bad.items())) if bad else ("total", value)
        raise UserError(f"the first training step's loss {name!r} is {v} (losses: {losses})",
                        "check that term's settings (a temperature of 0, a weight, a connector) and its inputs")
    return value, losses


def run_check(args: argparse.Namespace) -> int:
    """``kdhooks check``: validate the config, attach it (dry pass included) and compute one step's loss."""
    from ._distiller import Distiller

    x = example_input(args.input_shape, args.input_dtype, args.vocab)
    source = _config_source(args.config)
    student = load_factory(args.student, "--student")
    teacher = _teachers(args)
    # the Distiller passes the inputs to the student as they are: a float64 student needs float64 inputs
    x = cast_floats(x, floating_dtype(student))
    try:
        kd = Distiller(student, teacher, source, example_inputs=x)
    except Exception as error:
        if problem_and_fix(error) is None:
            # most often the models themselves do not take this input: say which one and why
            _explain_dry_pass(error, student, teacher, x, args)
        raise
    with kd:
        # the step first: a config that fails at its first loss is not reported as valid
        value, losses = _first_step(kd, student, x)
        print(f"config {args.config}: valid")
        for term in kd.terms:
            print(f"  term {term.name} ({term.kind}) weight={term.weight}")
        for tap, location in kd.taps.items():
            print(f"  tap {location}: {tap.role} {tap.path or '(output)'} [{tap.kind}]")
        for name, module in kd.connectors.items():
            count = sum(p.numel() for p in module.parameters())
            print(f"  connector {name}: {module.__class__.__name__} ({count} parameters) {module}")
        total = sum(p.numel() for p in kd.parameters())
        print(f"the Distiller adds {total} trainable parameters")
        print(f"one step: loss = {value:.6g}")
        for name, part in losses.items():
            print(f"  {name}: {part:.6g}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``kdhooks demo``: the digits demo (its extras missing or its output folder unwritable are user errors)."""
    try:
        from .demo import run_demo as demo

        demo(seeds=args.seeds, epochs=args.epochs, teacher_epochs=args.teacher_epochs, out=Path(args.out))
    except ImportError as error:
        raise UserError(f"the demo needs {error.name or 'a package that is not installed'}: {describe(error)}",
                        "pip install 'kdhooks[demo]'", error) from error
    except OSError as error:
        place = error.filename or args.out
        raise UserError(f"the demo cannot write its results to {str(place)!r}: {describe(error)}",
                        "give a writable folder with --out", error) from error
    return 0
