"""The import graph that keeps the core, the plugins and the integrations apart, read from the source (ast).

The rules, for every module of kdhooks/ (``kdhooks``), plugins/ (``kdhooks.plugins``)
and integrations/ (``kdhooks.integrations``):

1. The core never imports ``kdhooks.plugins`` or ``kdhooks.integrations``: not at
   module level, not inside a function (demo.py, cli.py and _cli_commands.py
   included), not relatively (``from .plugins import ...``), not by a literal name
   given to ``importlib.import_module``. It reaches them only through entry points,
   by name: the plugin manager loads the ``kdhooks`` group, the CLI the
   ``kdhooks.cli`` group.
2. A plugin imports no framework (transformers, accelerate, mmdet, mmengine, mmcv,
   peft, trl, datasets) when it is imported: such an import goes inside the function
   that needs it, or under ``if TYPE_CHECKING:``.
3. An integration imports no plugin internals (``kdhooks.plugins._*``), at any level.
4. Plugins and integrations use the core through its public namespace ``kdhooks``,
   never a private module (``kdhooks._taps``) or a private attribute (``kdhooks._x``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# directory -> the package name it is installed as (pyproject's package-dir)
PACKAGES = {"kdhooks": "kdhooks", "plugins": "kdhooks.plugins", "integrations": "kdhooks.integrations"}
FRAMEWORKS = ("transformers", "accelerate", "mmdet", "mmengine", "mmcv", "peft", "trl", "datasets")


def modules(directory: str) -> dict[str, Path]:
    """{dotted module name: path} of every .py file under ``directory``."""
    found = {}
    for path in sorted((ROOT / directory).rglob("*.py")):
        parts = list(path.relative_to(ROOT / directory).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([PACKAGES[directory], *parts])] = path
    return found


ALL = {name: path for directory in PACKAGES for name, path in modules(directory).items()}


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(absolute name imported, line, at import time?) for every import in ``module``.

    ``from a import b`` gives ``a`` and ``a.b`` (b may be a submodule); relative imports are
    resolved against the module's package; ``importlib.import_module("literal")`` and
    ``__import__("literal")`` count as imports. At import time: not inside a function and
    not under ``if TYPE_CHECKING:``.
    """
    path = ALL[module]
    package = _package_of(module, path)
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            eager = False
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, eager)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, eager) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.append((source, node.lineno, eager))
            found.extend((f"{source}.{alias.name}", node.lineno, eager) for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.args[0].value, node.lineno, eager))
        for child in ast.iter_child_nodes(node):
            visit(child, eager)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in packages)


def where(module: str, line: int) -> str:
    return f"{ALL[module].relative_to(ROOT)}:{line} ({module})"


def violations(directory: str, forbidden, eager_only: bool = False) -> list[str]:
    """'path:line (module) imports name' for each import of a module under ``directory`` that ``forbidden`` names."""
    found = []
    for module in modules(directory):
        hits = [(name, line, eager) for name, line, eager in imports(module)
                if (eager or not eager_only) and forbidden(name)]
        shown = {(name, line) for name, line, _ in hits}
        found += [f"{where(module, line)} imports {name}{'' if eager else ' (lazily)'}" for name, line, eager in hits
                  if (name.rpartition(".")[0], line) not in shown]  # `from a import b`: a, not a.b as well
    return sorted(set(found))


def test_every_module_is_found():
    assert {"kdhooks", "kdhooks._distiller", "kdhooks.cli", "kdhooks.demo", "kdhooks.plugins.logits",
            "kdhooks.plugins._layers", "kdhooks.integrations.hf", "kdhooks.integrations.mmdet._detector"} <= set(ALL)


def test_the_core_imports_no_plugin_and_no_integration():
    found = violations("kdhooks", lambda name: under(name, "kdhooks.plugins", "kdhooks.integrations",
                                                     "plugins", "integrations"))
    assert not found, ("the core must not import plugins or integrations (it finds them through entry points):\n"
                       + "\n".join(found))


def test_plugins_import_no_framework_when_imported():
    found = violations("plugins", lambda name: under(name, *FRAMEWORKS), eager_only=True)
    assert not found, ("a plugin must import without any framework installed; move these imports into the "
                       "function that needs them:\n" + "\n".join(found))


def test_integrations_import_no_plugin_internals():
    found = violations("integrations", lambda name: name.startswith(("kdhooks.plugins._", "plugins._")))
    assert not found, ("an integration must use a plugin's public names only (kdhooks.plugins.<family>), never "
                       "its private modules:\n" + "\n".join(found))


@pytest.mark.parametrize("directory", ["plugins", "integrations"])
def test_plugins_and_integrations_use_the_cores_public_namespace(directory):
    found = violations(directory, lambda name: name.startswith("kdhooks._"))
    for module in modules(directory):
        tree = ast.parse(ALL[module].read_text())
        found += [f"{where(module, node.lineno)} uses kdhooks.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "kdhooks" and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not found, (f"{directory}/ must use the core's public API (`import kdhooks`; kdhooks.<name>), not its "
                       "private modules:\n" + "\n".join(sorted(found)))


# --- the checker itself, on made-up modules --------------------------------------------------

def test_the_checker_sees_relative_lazy_and_literal_imports(tmp_path, monkeypatch):
    source = ("from typing import TYPE_CHECKING\n"
              "import transformers\n"
              "from .plugins import logits\n"
              "from . import integrations\n"
              "if TYPE_CHECKING:\n"
              "    import mmdet\n"
              "def later():\n"
              "    import accelerate\n"
              "    importlib.import_module('kdhooks.plugins.nlp')\n")
    path = tmp_path / "made_up.py"
    path.write_text(source)
    monkeypatch.setitem(ALL, "kdhooks.made_up", path)
    got = {(name, eager) for name, _, eager in imports("kdhooks.made_up")}
    assert {("transformers", True), ("kdhooks.plugins", True), ("kdhooks.plugins.logits", True),
            ("kdhooks.integrations", True), ("mmdet", False), ("accelerate", False),
            ("kdhooks.plugins.nlp", False)} <= got
