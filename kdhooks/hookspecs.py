"""The plugin contract: one hook per moment of a distillation run.

A plugin is any object or module with functions named like these and marked
``@kdhooks.hookimpl``. Built-in plugins are found exactly like third-party ones,
through the ``kdhooks`` entry-point group.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from ._context import LossContext
    from ._distiller import Distiller
    from ._registry import Registry

hookspec = pluggy.HookspecMarker("kdhooks")
hookimpl = pluggy.HookimplMarker("kdhooks")


@hookspec
def kdhooks_register(registry: Registry) -> None:
    """Add term, schedule and connector kinds to ``registry`` by name.

    Called once when a plugin manager starts, before any config is read, so
    that a config can name every kind a plugin provides.
    """


@hookspec
def kdhooks_configure(distiller: Distiller) -> None:
    """Declare taps on ``distiller`` after the config has been validated.

    Configured terms declare what they record here; the core installs exactly
    the hooks these taps need and no others.
    """


@hookspec
def kdhooks_build(distiller: Distiller, shapes: dict[Any, tuple[int, ...]]) -> None:
    """Build trainable parts (connectors, heads) from the shapes of the dry pass.

    ``shapes`` maps every declared tap to the shape recorded on the example
    inputs. Modules added with ``distiller.add_module`` or
    ``distiller.add_connector`` become the Distiller's parameters.
    """


@hookspec(firstresult=True)
def kdhooks_teacher_forward(distiller: Distiller, role: str, args: tuple, kwargs: dict) -> Any:
    """Give the output of the teacher named ``role`` on the student's inputs, or ``None`` to let it run.

    The first plugin that returns something other than ``None`` wins, and the
    teacher does not run: taps on the teacher's own output (``logits``, ``:0``)
    read the returned value, and taps inside the teacher record nothing (a term
    reading one fails at the step, naming the tap). When every plugin returns
    ``None`` the Distiller calls the teacher itself, in eval mode under no_grad.
    A plugin may instead return ``kdhooks.Recorded({tap: value})``, the teacher's
    captures for its taps (a cache of them): they are recorded as if the teacher
    had run. For caches of teacher outputs, routing among teachers, or remote teachers.
    """


@hookspec
def kdhooks_losses(ctx: LossContext) -> dict[str, torch.Tensor] | None:
    """Return this step's weighted loss contributions as ``{name: tensor}``.

    Names must be unique across plugins; the Distiller adds every value to the
    weighted task loss. Wrappers (``wrapper=True``) see the list of all results.
    """


@hookspec
def kdhooks_step_end(distiller: Distiller, losses: dict[str, torch.Tensor]) -> None:
    """Update state after the step's loss was formed (statistics, EMA, counters).

    ``losses`` holds the detached contributions of this step, ``task`` included.
    """
