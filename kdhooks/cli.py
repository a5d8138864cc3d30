"""The ``kdhooks`` command: plugins, inspect, check, demo (and commands that integrations add)."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import ConfigError
from ._manager import installed_plugins, plugin_manager
from ._taps import clean_path, shape_of

CLI_GROUP = "kdhooks.cli"


def load_factory(spec: str) -> nn.Module:
    """Build a model from ``package.module:factory`` or ``path/to/file.py:factory``."""
    if ":" not in spec:
        raise ConfigError(spec, "a model is given as MODULE:FACTORY", value=spec,
                          fix="e.g. --student kdhooks.demo:student_cnn or --student my_models.py:build_student")
    module_name, factory_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        path = Path(module_name)
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        if loaded is None or not path.exists():
            raise ConfigError(spec, f"no such file {module_name!r}", value=module_name)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    factory = getattr(module, factory_name, None)
    if factory is None:
        raise ConfigError(spec, f"{module_name} has no {factory_name!r}", value=factory_name)
    return factory()


def example_input(shape: str, dtype: str, high: int) -> torch.Tensor:
    dims = [int(d) for d in shape.replace("x", ",").split(",") if d]
    if dtype == "long":
        return torch.randint(0, high, dims)
    return torch.randn(dims)


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


def _inspect(args: argparse.Namespace) -> int:
    model = load_factory(args.model)
    x = example_input(args.input_shape, args.input_dtype, args.vocab)
    shapes: dict[str, Any] = {}
    handles = []
    for name, module in model.named_modules():
        def record(module: nn.Module, inputs: Any, output: Any, name: str = clean_path(name)) -> None:
            shapes.setdefault(name, shape_of(output) if shape_of(output) is not None else type(output).__name__)
        handles.append(module.register_forward_hook(record))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    types = {clean_path(n): type(m).__name__ for n, m in model.named_modules()}
    width = max(len(p) for p in types) + 2
    print(f"{'path':<{width}}{'module':<22}output shape")
    for path, kind in types.items():
        print(f"{path or '(output)':<{width}}{kind:<22}{shapes.get(path, '(not called)')}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from ._distiller import Distiller

    student = load_factory(args.student)
    named = [spec.split("=", 1) for spec in args.teacher if "=" in spec.split(":", 1)[0]]
    if len(named) == len(args.teacher):
        teacher = {role: load_factory(spec) for role, spec in named}
    elif len(args.teacher) == 1:
        teacher = load_factory(args.teacher[0])
    else:
        raise ConfigError("--teacher", "name every teacher or none" if named else "several teachers need names "
                          "(the terms' teacher_role)", value=args.teacher,
                          fix="--teacher resnet=MODULE:FACTORY --teacher vit=MODULE:FACTORY")
    x = example_input(args.input_shape, args.input_dtype, args.vocab)
    with Distiller(student, teacher, args.config, example_inputs=x) as kd:
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
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(seeds=args.seeds, epochs=args.epochs, teacher_epochs=args.teacher_epochs, out=Path(args.out))
    return 0


def parser(requested: str | None = None) -> argparse.ArgumentParser:
    """The CLI; ``requested`` is the command about to run, the only integration command imported."""
    top = argparse.ArgumentParser(prog="kdhooks", description="Knowledge distillation for the loop you already have.")
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

    check = commands.add_parser("check", help="validate a config and dry-run it on a student/teacher pair")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    requested = next((word for word in argv if not word.startswith("-")), None)
    args = parser(requested).parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"kdhooks: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
