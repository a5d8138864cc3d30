"""The flat registry of kinds that plugins provide: terms, schedules, connectors."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from ._errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from ._schedule import Schedule
    from ._term import Term

ConnectorFactory = Callable[[tuple, tuple], nn.Module]


class Registry:
    """Kinds by name, each remembering the plugin that added it."""

    def __init__(self) -> None:
        self.terms: dict[str, type[Term]] = {}
        self.schedules: dict[str, type[Schedule]] = {}
        self.connectors: dict[str, ConnectorFactory] = {}
        self.origin: dict[tuple[str, str], str] = {}
        self.current_plugin = "?"

    def _add(self, category: str, table: dict, name: str, value: object) -> None:
        if name in table:
            raise ConfigError(
                "plugins", f"{category} kind {name!r} is provided twice: by "
                f"{self.origin[(category, name)]!r} and by {self.current_plugin!r}", value=name,
                fix="rename one of them, or leave one plugin out with `disable_plugins: [name]`")
        table[name] = value
        self.origin[(category, name)] = self.current_plugin

    def add_term(self, name: str, term: type[Term]) -> None:
        """Make ``kind: name`` in a config build ``term``; a class is one kind (its ``kind`` attribute says which)."""
        from ._term import Term

        if not (isinstance(term, type) and issubclass(term, Term)) or term is Term:
            raise TypeError(f"add_term({name!r}, {term!r}): register a subclass of kdhooks.Term")
        own = term.__dict__.get("kind")
        if own and own != name:
            raise ConfigError("plugins", f"term class {term.__qualname__} is registered as {own!r} and again as "
                              f"{name!r}", value=name, fix="subclass it to register it under a second name")
        self._add("term", self.terms, name, term)
        term.kind = name

    def add_schedule(self, name: str, schedule: type[Schedule]) -> None:
        """Make ``{schedule: name, ...}`` in a config build ``schedule``."""
        self._add("schedule", self.schedules, name, schedule)

    def add_connector(self, name: str, factory: ConnectorFactory) -> None:
        """Make ``connector: name`` build ``factory(student_shape, teacher_shape)``.

        A factory raises ``ValueError`` saying why when it cannot join the shapes.
        """
        self._add("connector", self.connectors, name, factory)

    def lookup(self, category: str, name: object, location: str) -> Any:
        """The registered ``category`` kind (term, schedule, connector) called ``name``.

        A ConfigError at ``location`` names the closest registered kinds otherwise.
        """
        table = {"term": self.terms, "schedule": self.schedules, "connector": self.connectors}[category]
        if not isinstance(name, str) or name not in table:
            raise ConfigError(location, f"unknown {category} kind {name!r}", value=name,
                              fix=did_you_mean(str(name), table) or f"known {category} kinds: {', '.join(sorted(table))}")
        return table[name]

    def kinds(self) -> list[tuple[str, str, str]]:
        """(category, name, plugin) for every kind, sorted."""
        return sorted((c, n, p) for (c, n), p in self.origin.items())
