"""The ``kdhooks`` command: plugins, inspect, check, demo (and commands that integrations add).

A user's mistake (a bad path, a module that does not import, an input shape the
model cannot take, a config that fails at the first step) is one line on stderr,
``kdhooks: error: <problem> (fix: <what to do>)``, and exit status 2. Anything
else is a bug: one line with the hint to rerun with ``--debug``, exit status 1.
``kdhooks --debug ...`` lets the original exception through, traceback and all.
Warnings are one line too, ``kdhooks: warning: ...``.

This module parses the command line and reports; the commands are in ``_cli_commands``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
import warnings
from typing import Any, NoReturn

from ._cli_commands import (DEBUG_HINT, UserError, describe, load_factory, one_line, problem_and_fix,
                            run_check, run_demo, run_inspect, run_plugins)

__all__ = ["UserError", "load_factory", "main", "parser"]

CLI_GROUP = "kdhooks.cli"
BUILT_IN = ("plugins", "inspect", "check", "demo")


def _positive_int(text: str) -> int:
    """An argparse type: counts such as --seeds must be 1 or more (0 seeds would average nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 or more")
    return value


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
    plugins = commands.add_parser("plugins", help="list installed plugins and the kinds they provide")
    plugins.set_defaults(run=run_plugins)

    def model_input(p: argparse.ArgumentParser) -> None:
        p.add_argument("--input-shape", required=True, help="e.g. 1,1,8,8 (batch first)")
        p.add_argument("--input-dtype", choices=["float", "long"], default="float", help="long for token ids")
        p.add_argument("--vocab", type=_positive_int, default=100, help="token ids are drawn below this (with long)")

    inspect = commands.add_parser("inspect", help="module paths and output shapes, to pick layers to tap")
    inspect.add_argument("model", help="MODULE:FACTORY, e.g. kdhooks.demo:teacher_cnn")
    model_input(inspect)
    inspect.set_defaults(run=run_inspect)

    check = commands.add_parser("check", help="validate a config, dry-run it on a student/teacher pair "
                                "and compute one training step's loss")
    check.add_argument("config")
    check.add_argument("--student", required=True)
    check.add_argument("--teacher", required=True, action="append",
                       help="MODULE:FACTORY; several as NAME=MODULE:FACTORY, read by the terms' teacher_role")
    model_input(check)
    check.set_defaults(run=run_check)

    demo = commands.add_parser("demo", help="distill a CNN on the digits data (3 seeds, a table and a PNG)")
    demo.add_argument("--seeds", type=_positive_int, default=3)
    demo.add_argument("--epochs", type=_positive_int, default=None, help="student epochs (default: the demo's)")
    demo.add_argument("--teacher-epochs", type=_positive_int, default=None)
    demo.add_argument("--out", default="runs/demo", help="folder for the learning-curve PNG")
    demo.set_defaults(run=run_demo)

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
    raise UserError(f"the {name} command is unavailable: {describe(error)}",
                    f"install it with: pip install 'kdhooks[{name}]'", error)


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


def _warn_on_one_line(message: Any, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """warnings.showwarning for the command line: ``kdhooks: warning: ...`` on one line, like the errors
    (Python's own format adds the source line that raised it, which means nothing to a CLI user)."""
    print(f"kdhooks: warning: {one_line(message)}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` by default) and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, debug = _split_debug(argv)
    requested = next((word for word in argv if not word.startswith("-")), None)
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _warn_on_one_line
        try:
            # building the parser imports the integration asked for: inside the handler, since a
            # broken integration is reported like any other error
            args = parser(requested).parse_args(argv)
            return args.run(args)
        except _UsageError as error:
            _fail(error.message, f"see `{error.prog} --help`")
            return 2
        except Exception as error:
            if not debug:
                found = problem_and_fix(error)
                if found is not None:
                    _fail(*found)
                    return 2
                _fail(f"unexpected {describe(error)}",
                      f"this is a bug, not a mistake in the command: {DEBUG_HINT} and report it")
                return 1
            if not isinstance(error, UserError) or error.original is None:
                raise
            original = error.original
    # --debug: the exception a UserError explains, raised again outside the handler so that its
    # traceback shows as it was, not as 'during handling of' the explanation
    raise original


if __name__ == "__main__":
    sys.exit(main())
