"""What a term needs of its taps' shapes, checked at attach (dry pass) or on the first step.

A term's ``check(shapes)`` calls these with the shapes by tap name; each raises a
ConfigError at the option the tap came from, naming the shapes and the fix.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import ConfigError

if TYPE_CHECKING:
    from ._term import Term

RANK_NAMES = {4: "conv map (N, C, H, W)", 3: "tokens (N, L, D)", 2: "vectors (N, D)", 1: "vector (N,)"}


def feature_shape(shape: Any) -> tuple[int, ...]:
    """A capture's shape; a module that returns a tuple (an HF block) gives its first tensor's."""
    while isinstance(shape, list):
        if not shape:
            return ()
        shape = shape[0]
    if not isinstance(shape, tuple):
        raise TypeError(f"not a tensor shape: {shape!r}")
    return shape


def tensor_of(capture: Any) -> Any:
    """The feature in a capture: a module that returns a tuple or list (an HF block) gives its first item.

    A ``calls: all`` capture (every call of a module) is not one feature: refused
    rather than read as its first call.
    """
    from ._recorder import Calls

    while isinstance(capture, (list, tuple)):
        if isinstance(capture, Calls):
            raise TypeError(f"a capture of every call ({len(capture)} calls, `calls: all`) is not one tensor: "
                            f"read each call, or tap with `calls: first` or `calls: last`")
        capture = capture[0]
    return capture


def expect_rank(term: Term, name: str, shapes: dict[str, Any], ranks: tuple[int, ...], why: str = "") -> tuple:
    """The shape of tap ``name``, which must have one of ``ranks`` dimensions."""
    shape = feature_shape(shapes[name])
    if len(shape) not in ranks:
        allowed = " or ".join(RANK_NAMES.get(r, f"{r}-D") for r in ranks)
        path = term._taps[name].path if name in getattr(term, "_taps", {}) else name
        raise ConfigError(term.location_of(name), f"{term.kind} needs {allowed} features; {path!r} gives "
                          f"shape {shape}" + (f": {why}" if why else ""), value=path,
                          fix=f"tap a layer whose output is a {allowed}")
    return shape


def expect_same_shape(term: Term, student: str, teacher: str, shapes: dict[str, Any], why: str = "") -> None:
    """Taps ``student`` and ``teacher`` have equal shapes: the formula compares them element by element."""
    first, second = feature_shape(shapes[student]), feature_shape(shapes[teacher])
    if first != second:
        raise ConfigError(term.location, f"{term.kind} compares {student} and {teacher} element by element, "
                          f"but their shapes differ: {first} vs {second}" + (f" ({why})" if why else ""),
                          value=[first, second], fix="tap outputs of the same shape, or use a term with a connector "
                          "(fitnets) for features of different widths")


def expect_same_classes(term: Term, student: str, teacher: str, shapes: dict[str, Any]) -> None:
    """Logits of the same class count and the same leading (batch, token) dimensions, never broadcast."""
    first, second = feature_shape(shapes[student]), feature_shape(shapes[teacher])
    if not first or not second or first[-1] != second[-1]:
        raise ConfigError(term.location, f"{term.kind} compares class distributions, but the student's logits "
                          f"have {first[-1] if first else 'no'} classes {first} and the teacher's "
                          f"{second[-1] if second else 'no'} {second}", value=[first, second],
                          fix="tap the logits of both models (`logits`), over the same classes; a teacher with a "
                          "larger (padded) vocabulary needs its logits sliced to the student's")
    if first != second:
        raise ConfigError(term.location, f"{term.kind} compares the logits sample by sample, but their shapes "
                          f"differ: student {first}, teacher {second}", value=[first, second],
                          fix="feed both models the same batch (and the same tokens)")
