"""Plugin discovery: the ``kdhooks`` entry-point group plus modules named in a config."""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import pluggy

from . import hookspecs
from ._errors import ConfigError, did_you_mean
from ._registry import Registry

GROUP = "kdhooks"


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin: its entry-point name, module, package and version."""

    name: str
    module: str
    package: str
    version: str


@lru_cache(maxsize=1)
def installed_plugins() -> tuple[PluginInfo, ...]:
    """Every plugin declared in the ``kdhooks`` entry-point group, once each."""
    found: dict[str, PluginInfo] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != GROUP:
                continue
            info = PluginInfo(ep.name, ep.value, dist.metadata["Name"], dist.version)
            other = found.get(ep.name)
            if other and other.module != info.module:
                raise ConfigError("plugins", f"two packages declare the plugin {ep.name!r}: "
                                  f"{other.package} ({other.module}) and {info.package} ({info.module})",
                                  value=ep.name, fix="uninstall one, or ask its author to rename the entry point")
            found[ep.name] = info
    return tuple(sorted(found.values(), key=lambda p: (p.package != "kdhooks", p.name)))


def describe_plugin(plugin: str) -> str:
    """``plugin`` (a pluggy name) with the package and version it comes from, for error messages.

    An entry point's distribution is known; a module named in a config's ``plugins:`` is looked up among the
    installed distributions by its top-level package, else named by its file.
    """
    for info in installed_plugins():
        if info.name == plugin:
            return f"{plugin} ({info.package} {info.version})"
    for dist in _distributions_of_modules().get(plugin.split(".")[0], []):
        try:
            return f"{plugin} ({dist} {importlib.metadata.version(dist)})"
        except importlib.metadata.PackageNotFoundError:
            continue  # uninstalled since the table was read
    path = getattr(sys.modules.get(plugin), "__file__", None)
    return f"{plugin} (not installed: {path})" if path else plugin


@lru_cache(maxsize=1)
def _distributions_of_modules() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _import(module: str, location: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(location, f"cannot import plugin module {module!r}: {error}", value=module,
                          fix="install the package that provides it, or correct the module name") from None


def plugin_manager(modules: list[str] | tuple[str, ...] = (),
                   disabled: list[str] | tuple[str, ...] = ()) -> tuple[pluggy.PluginManager, Registry]:
    """A plugin manager with every installed plugin and ``modules``, and the kinds they register."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    installed = installed_plugins()
    known = [p.name for p in installed]
    for name in disabled:
        if name not in known:
            raise ConfigError("disable_plugins", f"no installed plugin is named {name!r}", value=name,
                              fix=did_you_mean(name, known) or f"installed plugins: {', '.join(known)}")
        pm.set_blocked(name)
    for info in installed:
        if not pm.is_blocked(info.name):
            pm.register(_import(info.module, f"entry point {info.name}"), name=info.name)
    for index, module_name in enumerate(modules):
        module = _import(module_name, f"plugins[{index}]")
        if not pm.is_registered(module):
            pm.register(module, name=module_name)
    _check_hooks(pm)
    registry = Registry()
    # pluggy calls hooks last-registered first; register in discovery order instead
    for impl in reversed(pm.hook.kdhooks_register.get_hookimpls()):
        registry.current_plugin = impl.plugin_name
        impl.function(registry=registry)
    registry.current_plugin = "?"
    return pm, registry


HOOKS = tuple(sorted(name for name in vars(hookspecs) if name.startswith("kdhooks_")))


def _check_hooks(pm: pluggy.PluginManager) -> None:
    """Every ``kdhooks_*`` function of a plugin is a marked implementation of a hook that exists.

    pluggy ignores an unmarked function and keeps a misspelled hook without
    calling it: either way a plugin's loss or schedule would silently drop out.
    """
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue  # blocked (disable_plugins)
        for attribute in dir(plugin):
            if not attribute.startswith("kdhooks_"):
                continue
            where = f"plugin {describe_plugin(name)}"
            if attribute not in HOOKS:
                raise ConfigError(where, f"{attribute} is not a kdhooks hook, so it would never be called",
                                  value=attribute, fix=did_you_mean(attribute, HOOKS)
                                  or f"the hooks are {', '.join(HOOKS)}")
            if not hasattr(getattr(plugin, attribute), "kdhooks_impl"):
                raise ConfigError(where, f"{attribute} is not marked @kdhooks.hookimpl, so pluggy ignores it",
                                  value=attribute, fix=f"put @kdhooks.hookimpl above def {attribute}")
    check_pending(pm)


def check_pending(pm: pluggy.PluginManager) -> None:
    """pluggy's check that every marked implementation has a hook, as a ConfigError naming the plugin."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        raise ConfigError(f"plugin {error.plugin_name}", str(error), fix=f"the hooks are {', '.join(HOOKS)}") from None

