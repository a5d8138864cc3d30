"""The two errors a user sees: a bad configuration and a bad loss value."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration that cannot work, reported before anything is attached.

    ``location`` is where in the config (``terms[1].student``), ``value`` the bad
    value, ``fix`` what to write instead.
    """

    def __init__(self, location: str, problem: str, *, value: object = None, fix: str | None = None):
        self.location = location
        self.problem = problem
        self.value = value
        self.fix = fix
        message = f"{location}: {problem}" if location else problem
        if fix:
            message += f"\n  fix: {fix}"
        super().__init__(message)


class LossError(FloatingPointError):
    """A loss that cannot be trusted at a step: NaN or infinite, or formed from captures that are wrong.

    ``term`` names the term (or tap) and ``step`` the step; ``problem`` and ``fix``
    say what went wrong when it is not a non-finite value.
    """

    def __init__(self, term: str, step: int, value: float | None = None, *, problem: str | None = None,
                 fix: str | None = None):
        self.term = term
        self.step = step
        self.value = value
        self.problem = problem
        self.fix = fix
        if problem is None:
            message = (f"loss term {term!r} is {value} at step {step}; check its inputs "
                       f"(learning rate, temperature, a connector that diverged) or lower its weight")
        else:
            message = f"{term}: {problem} (step {step})" + (f"\n  fix: {fix}" if fix else "")
        super().__init__(message)


class PluginError(TypeError):
    """A plugin's term that breaks the contract: names the term, its kind and the plugin that registered it."""

    def __init__(self, term: object, plugin: str, problem: str, *, fix: str | None = None):
        self.term = getattr(term, "name", str(term))
        self.kind = getattr(term, "kind", "") or type(term).__name__
        self.plugin = plugin
        self.problem = problem
        self.fix = fix
        message = f"loss term {self.term!r} (kind {self.kind!r}, from plugin {plugin}): {problem}"
        if fix:
            message += f"\n  fix: {fix}"
        super().__init__(message)


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates that look most like ``word`` (for 'did you mean' hints)."""
    candidates = [c for c in candidates if c]
    found = difflib.get_close_matches(word, candidates, n=n, cutoff=0.5)
    if not found:
        # a path typed with a wrong index (layer9 for layer3) still shares its prefix
        prefix = word.split(".")[0].rstrip("0123456789")
        found = [c for c in candidates if prefix and c.startswith(prefix)][:n]
    return found


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A ConfigError fix naming the closest candidates ("did you mean 'a', 'b'?"), or "" if none is close."""
    found = closest(word, candidates)
    if not found:
        return ""
    return "did you mean " + ", ".join(repr(f) for f in found) + "?"
