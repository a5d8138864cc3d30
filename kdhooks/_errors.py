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
    """A loss term that came out NaN or infinite; names the term and the step."""

    def __init__(self, term: str, step: int, value: float):
        self.term = term
        self.step = step
        self.value = value
        super().__init__(
            f"loss term {term!r} is {value} at step {step}; check its inputs "
            f"(learning rate, temperature, a connector that diverged) or lower its weight"
        )


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
