"""The ``kdhooks`` command: plugins, inspect, check, demo (and commands that integrations add).

A user's mistake (a bad path, a module that does not import, an input shape the
model cannot take, a config that fails at the first step) is one line on stderr,
``kdhooks: error: <problem> (fix: <what to do>)``, and exit status 2. Anything
else is a bug: one line with the hint to rerun with ``--debug``, exit status 1.
``kdhooks --debug ...`` lets the original exception through, traceback and all.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ._errors import ConfigError, LossError, PluginError, did_you_mean
from ._manager import installed_plugins, plugin_manager
from ._taps import clean_path, logits_of, shape_of

CLI_GROUP = "kdhooks.cli"
BUILT_IN = ("plugins", "inspect", "check", "demo")
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


def _message(error: BaseException) -> str:
    text = one_line(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _problem_and_fix(error: BaseException) -> tuple[str, str] | None:
    """(problem, fix) for an exception that is the user's mistake; None for anything else."""
    if isinstance(error, UserError):
        return error.problem, error.fix
    if isinstance(error, ConfigError):
        problem = f"{error.location}: {error.problem}" if error.location else str(error.problem)
        fix = error.fix or (f"correct {error.location}" if error.location else "correct the configuration")
        return one_line(problem), one_line(fix)
    if isinstance(error, (LossError, PluginError)):
        text = str(error).split("\n  fix: ")[0]
        return one_line(text), one_line(error.fix or "check the term's inputs and settings; " + DEBUG_HINT)
    return None


# --- loading what the user names ------------------------------------------------------------


def load_factory(spec: str, option: str = "model") -> nn.Module:
    """Build a model from ``package.module:factory`` or ``path/to/file.py:factory``.

    ``option`` names where the spec came from (``--student``) in the error messages.
    """
    if ":" not in spec or not spec.rsplit(":", 1)[1] or not spec.rsplit(":", 1)[0]:
        raise UserError(f"{option} {spec!r} is not MODULE:FACTORY",
                        "e.g. kdhooks.demo:student_cnn or my_models.py:build_student")
    module_name, factory_name = spec.rsplit(":", 1)
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
        raise UserError(f"{option}: the factory {spec!r} raised {_message(error)}",
                        f"fix the factory or name another one; {DEBUG_HINT}", error) from error
    if not isinstance(model, nn.Module):
        raise UserError(f"{option}: the factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module",
                        "make the factory return the model")
    return model


def _load_module(module_name: str, option: str) -> Any:
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            problem = "is a directory" if path.is_dir() else "does not exist"
            raise UserError(f"{option}: the file {module_name!r} {problem} (looked in {Path.cwd()})",
                            "give the path of an existing .py file, relative to the current folder or absolute")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        if loaded is None or loaded.loader is None:
            raise UserError(f"{option}: cannot load {module_name!r} as Python", "give a .py file")
        module = importlib.util.module_from_spec(loaded)
        try:
            loaded.loader.exec_module(module)
        except Exception as error:
            raise UserError(f"{option}: running {module_name!r} raised {_message(error)}",
                            f"fix the error in that file; {DEBUG_HINT}", error) from error
        return module
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None)
        if isinstance(error, ModuleNotFoundError) and missing and (
                module_name == missing or module_name.startswith(missing + ".")):
            fix = (f"check the name {module_name!r} (python -c 'import {module_name}' must work from this "
                   f"folder), install the package that provides it, or give a file as path/to/file.py:FACTORY")
            raise UserError(f"{option}: no module named {missing!r}", fix, error) from error
        needed = f"install {missing!r}" if missing else "install what it needs"
        raise UserError(f"{option}: importing {module_name!r} failed: {_message(error)}",
                        f"{needed} (pip install ...), then retry; {DEBUG_HINT}", error) from error
    except Exception as error:
        raise UserError(f"{option}: importing {module_name!r} raised {_message(error)}",
                        f"fix the error in that module; {DEBUG_HINT}", error) from error


def parse_shape(shape: str) -> list[int]:
    """``'2,1,8,8'`` or ``'2x1x8x8'`` as a list of positive ints; a UserError names anything else."""
    text = shape.strip()
    for sep in ("x", "X", "×"):
        text = text.replace(sep, ",")
    pieces = [p.strip() for p in text.split(",")]
    if text and all(p.isdigit() and int(p) > 0 for p in pieces):
        return [int(p) for p in pieces]
    bad = [p for p in pieces if not (p.isdigit() and int(p) > 0)]
    why = (f"{bad[0]!r} is not a positive integer" if text and bad else "it is empty")
    raise UserError(f"--input-shape {shape!r} is not a shape: {why}",
                    "give positive integers separated by commas or x, batch first, e.g. --input-shape 2,1,8,8")


def example_input(shape: str, dtype: str, high: int) -> torch.Tensor:
    dims = parse_shape(shape)
    if dtype == "long":
        if high < 1:
            raise UserError(f"--vocab {high} leaves no token ids to draw", "give --vocab 1 or more")
        return torch.randint(0, high, dims)
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
    """``model(x)`` in eval mode without gradients; a failure becomes a UserError naming the shape given
    and what the model's first Conv/Linear/Embedding layer expects."""
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
    modes = {m: m.training for m in names}
    try:
        model.eval()
        with torch.no_grad():
            return model(x)
    except Exception as error:
        raise _input_error(model, role, x, args, error, first, open_leaves, names, original) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


def _input_error(model: nn.Module, role: str, x: torch.Tensor, args: argparse.Namespace, error: Exception,
                 first: list[nn.Module], open_leaves: list[nn.Module], names: dict[nn.Module, str],
                 original: BaseException | None) -> UserError:
    dims = list(x.shape)
    where = f" in {names[open_leaves[-1]] or '(root)'} ({type(open_leaves[-1]).__name__})" if open_leaves else ""
    given = f"--input-shape {args.input_shape}" + (" --input-dtype long" if args.input_dtype == "long" else "")
    problem = f"the {role}'s forward fails on {given}{where}: {_message(error)}"
    layer = first[0] if first else next((m for m in names if isinstance(m, _FIRST_LAYERS)), None)
    if layer is None:
        fix = f"give the input shape (and --input-dtype) the {role} takes; {DEBUG_HINT}"
    else:
        fix = f"the {role}'s first layer {names[layer]} ({type(layer).__name__}) expects {_expects(layer)}"
        suggested = _suggested_shape(layer, dims)
        if isinstance(layer, nn.Embedding) and args.input_dtype != "long":
            fix += ": give --input-dtype long"
        elif suggested and suggested != ",".join(map(str, dims)):
            fix += f": e.g. --input-shape {suggested}"
        else:
            fix += f"; give the input shape the {role} takes; {DEBUG_HINT}"
    return UserError(problem, fix, original or error)


# --- commands -------------------------------------------------------------------------------------


def _plugins(args: argparse.Namespace) -> int:
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
    """Every call's output shape, in order: ``(2, 6)`` once, ``(2, 6); (2, 6)`` for two calls;
    runs of one shape are counted (``(2, 6) ×12``) past eight calls."""
    texts = [str(s) for s in shapes]
    if len(texts) <= 8:
        return "; ".join(texts)
    runs: list[list[Any]] = []
    for text in texts:
        if runs and runs[-1][0] == text:
            runs[-1][1] += 1
        else:
            runs.append([text, 1])
    return "; ".join(text if n == 1 else f"{text} ×{n}" for text, n in runs)


def _inspect(args: argparse.Namespace) -> int:
    x = example_input(args.input_shape, args.input_dtype, args.vocab)
    model = load_factory(args.model, "model")
    shapes: dict[str, list[Any]] = {}
    handles = []
    for name, module in model.named_modules():
        def record(module: nn.Module, inputs: Any, output: Any, name: str = clean_path(name)) -> None:
            shape = shape_of(output)
            shapes.setdefault(name, []).append(shape if shape is not None else type(output).__name__)
        handles.append(module.register_forward_hook(record))
    try:
        forward_or_explain(model, "model", x, args)
    finally:
        for handle in handles:
            handle.remove()
    types = {clean_path(n): type(m).__name__ for n, m in model.named_modules()}
    width = max(len(p) for p in types) + 2
    print(f"{'path':<{width}}{'module':<22}{'calls':<7}output shape (each call's, in order)")
    for path, kind in types.items():
        calls = shapes.get(path, [])
        shown = _calls_text(calls) if calls else "(not called)"
        print(f"{path or '(output)':<{width}}{kind:<22}{len(calls):<7}{shown}")
    repeated = [p or "(output)" for p, c in shapes.items() if len(c) > 1]
    if repeated:
        print(f"called more than once per forward: {', '.join(repeated)} "
              f"(a tap on one of them captures its last call)")
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
    from ._precision import cast_floats, floating_dtype

    models = [("student", student, x)]
    teachers = teacher if isinstance(teacher, dict) else {"teacher": teacher}
    models += [(role, model, cast_floats(x, floating_dtype(model))) for role, model in teachers.items()]
    for role, model, inputs in models:
        forward_or_explain(model, role, inputs, args, original=error)


def _first_step(kd: Any, student: nn.Module, x: torch.Tensor) -> tuple[float, dict[str, float]]:
    """One training step's loss on the dry-pass inputs (no backward), the student's modes restored after."""
    modes = {m: m.training for m in student.modules()}
    try:
        student.train()
        out = student(x)
        logits = logits_of(out)
        labels = None
        if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and logits.shape[-1] > 0:
            labels = torch.randint(0, logits.shape[-1], tuple(logits.shape[:-1]), device=logits.device)
        loss = kd(None, labels=labels) if labels is not None else kd(None)
        losses = kd.last_losses
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
    except Exception as error:
        found = _problem_and_fix(error)
        problem, fix = found if found else (
            _message(error),
            f"check the terms against the models' outputs (class counts, temperatures > 0, paths); {DEBUG_HINT}")
        raise UserError(f"the first training step (student(x), then kd(None, labels=...)) failed: {problem}",
                        fix, error) from error
    finally:
        for module, training in modes.items():
            module.training = training
    bad = {name: v for name, v in losses.items() if not math.isfinite(v)}
    if bad or not math.isfinite(value):
        name, v = next(iter(bad.items())) if bad else ("total", value)
        raise UserError(f"the first training step's loss {name!r} is {v} (losses: {losses})",
                        "check that term's settings (a temperature of 0, a weight, a connector) and its inputs")
    return value, losses


def _check(args: argparse.Namespace) -> int:
    from ._distiller import Distiller

    x = example_input(args.input_shape, args.input_dtype, args.vocab)
    source = _config_source(args.config)
    student = load_factory(args.student, "--student")
    teacher = _teachers(args)
    try:
        kd = Distiller(student, teacher, source, example_inputs=x)
    except Exception as error:
        if _problem_and_fix(error) is None:
            _explain_dry_pass(error, student, teacher, x, args)
        raise
    with kd:
        print(f"config {args.config}: valid")
        for term in kd.terms:
            print(f"  term {term.name} ({term.kind}) weight={term.weight}")
        for tap, location in kd._taps.items():
            print(f"  tap {location}: {tap.role} {tap.path or '(output)'} [{tap.kind}]")
        for name, module in kd.connectors.items():
            count = sum(p.numel() for p in module.parameters())
            print(f"  connector {name}: {module.__class__.__name__} ({count} parameters) {module}")
        total = sum(p.numel() for p in kd.parameters())
        print(f"the Distiller adds {total} trainable parameters")
        value, losses = _first_step(kd, student, x)
        print(f"one step: loss = {value:.6g}")
        for name, part in losses.items():
            print(f"  {name}: {part:.6g}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(seeds=args.seeds, epochs=args.epochs, teacher_epochs=args.teacher_epochs, out=Path(args.out))
    return 0


class _UsageError(Exception):
    def __init__(self, message: str, prog: str):
        self.message = message
        self.prog = prog
        super().__init__(message)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (caught by ``main``), like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message, self.prog)


def parser(requested: str | None = None) -> argparse.ArgumentParser:
    """The CLI; ``requested`` is the command about to run, the only integration command imported."""
    top = _Parser(prog="kdhooks", description="Knowledge distillation for the loop you already have.")
    top.add_argument("--debug", action="store_true",
                     help="let errors through with their traceback instead of one line")
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("plugins", help="list installed plugins and the kinds they provide").set_defaults(run=_plugins)

    def model_input(p: argparse.ArgumentParser) -> None:
        p.add_argument("--input-shape", required=True, help="e.g. 1,1,8,8 (batch first)")
        p.add_argument("--input-dtype", choices=["float", "long"], default="float", help="long for token ids")
        p.add_argument("--vocab", type=int, default=100, help="token ids are drawn below this (with long)")

    inspect = commands.add_parser("inspect", help="module paths and output shapes, to pick layers to tap")
    inspect.add_argument("model", help="MODULE:FACTORY, e.g. kdhooks.demo:teacher_cnn")
    model_input(inspect)
    inspect.set_defaults(run=_inspect)

    check = commands.add_parser("check", help="validate a config, dry-run it on a student/teacher pair "
                                "and compute one training step's loss")
    check.add_argument("config")
    check.add_argument("--student", required=True)
    check.add_argument("--teacher", required=True, action="append",
                       help="MODULE:FACTORY; several as NAME=MODULE:FACTORY, read by the terms' teacher_role")
    model_input(check)
    check.set_defaults(run=_check)

    demo = commands.add_parser("demo", help="distill a CNN on the digits data (3 seeds, a table and a PNG)")
    demo.add_argument("--seeds", type=int, default=3)
    demo.add_argument("--epochs", type=int, default=None, help="student epochs (default: the demo's)")
    demo.add_argument("--teacher-epochs", type=int, default=None)
    demo.add_argument("--out", default="runs/demo", help="folder for the learning-curve PNG")
    demo.set_defaults(run=_demo)

    # Integrations add their commands through the 'kdhooks.cli' entry-point group. Importing one
    # imports its framework (mmdet takes seconds), so only the command asked for is loaded; the others
    # are listed by name until then.
    for ep in importlib.metadata.entry_points(group=CLI_GROUP):
        if ep.name != requested:
            listed = commands.add_parser(ep.name, help=f"(from {ep.value.split(':')[0]})", add_help=False)
            listed.add_argument("rest", nargs=argparse.REMAINDER)
            continue
        try:
            register = ep.load()
        except ImportError as error:
            # the integration's framework (an extra) is not installed: its command says so
            missing = commands.add_parser(ep.name, help=f"unavailable: {error}")
            missing.add_argument("rest", nargs=argparse.REMAINDER)
            missing.set_defaults(run=lambda args, name=ep.name, error=error: _unavailable(name, error))
            continue
        register(commands)
    return top


def _unavailable(name: str, error: ImportError) -> int:
    print(f"kdhooks {name}: {error}; install it with: pip install 'kdhooks[{name}]'", file=sys.stderr)
    return 2


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (taken anywhere before ``--``, and inside a built-in command's
    arguments; an integration's own arguments keep theirs), and whether it was there."""
    kept: list[str] = []
    debug = False
    command = None
    for i, word in enumerate(argv):
        if word == "--":
            kept += argv[i:]
            break
        if word == "--debug" and (command is None or command in BUILT_IN):
            debug = True
            continue
        if command is None and not word.startswith("-"):
            command = word
        kept.append(word)
    return kept, debug


def _fail(problem: str, fix: str) -> None:
    print(f"kdhooks: error: {one_line(problem)} (fix: {one_line(fix)})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, debug = _split_debug(argv)
    requested = next((word for word in argv if not word.startswith("-")), None)
    try:
        args = parser(requested).parse_args(argv)
    except _UsageError as error:
        _fail(error.message, f"see `{error.prog} --help`")
        return 2
    debug = debug or args.debug
    try:
        return args.run(args)
    except Exception as error:
        if not debug:
            found = _problem_and_fix(error)
            if found is not None:
                _fail(*found)
                return 2
            print(f"kdhooks: error: {one_line(_message(error))} (an unexpected internal error: {DEBUG_HINT})",
                  file=sys.stderr)
            return 1
        if not isinstance(error, UserError) or error.original is None:
            raise
        original = error.original
    # --debug: the exception a UserError explains, raised again outside the handler so that its
    # traceback shows as it was, not as 'during handling of' the explanation
    raise original


if __name__ == "__main__":
    sys.exit(main())
