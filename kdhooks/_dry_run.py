"""The dry pass: the student (and so its teachers) run once on example inputs, to learn every tap's shape."""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._errors import ConfigError
from ._recorder import CaptureError, TapError
from ._taps import Tap, shape_of

if TYPE_CHECKING:
    from ._distiller import Distiller


def dry_run(distiller: Distiller, example_inputs: Any) -> dict[Tap, Any]:
    """Run the student (and so its teachers) once on ``example_inputs`` to learn shapes.

    A Mapping is keyword arguments, a tuple or list positional ones, anything else the one input.
    Every submodule's own train/eval mode is restored afterwards.
    """
    from ._distiller import restore_modes, training_modes

    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    recorder = distiller._recorder
    modes = {}
    for m in distiller._models.values():
        modes.update(training_modes(m.module))
    distiller._dry = True
    recorder.counting = True
    try:
        for m in distiller._models.values():
            m.module.eval()
        with torch.no_grad():
            distiller.student(*args, **kwargs)
        for tap, value in recorder.captures.items():
            recorder.verify(tap, value, recorder.versions[tap], recorder.no_graph)
        captures = dict(recorder.captures)
        calls = {tap: list(values) for tap, values in recorder.calls.items()}
    except TapError as error:
        raise ConfigError(distiller._taps[error.tap], str(error.__cause__ or error), value=error.tap.path,
                          fix="check the selector after ':' against the module's output") from None
    except CaptureError as error:
        raise ConfigError(distiller._taps[error.tap], in_place_problem(distiller, error), value=error.tap.path,
                          fix=error.fix) from None
    except TypeError as error:
        if isinstance(example_inputs, Mapping):
            raise ConfigError("example_inputs", f"the student's forward rejected the keyword arguments "
                              f"{sorted(kwargs)}: {error}", fix="a Mapping is passed as keyword arguments "
                              "(model(**example_inputs)); for one dict argument pass it in a tuple: "
                              "example_inputs=(batch,)") from None
        raise
    finally:
        distiller._dry = False
        recorder.counting = False
        recorder.calls.clear()
        recorder.clear()
        restore_modes(modes)
    _warn_repeated_calls(distiller, calls)
    shapes: dict[Tap, Any] = {}
    for tap, location in distiller._taps.items():
        if tap.kind == "param":
            shapes[tap] = tuple(distiller._params[tap].shape)
            continue
        if tap not in captures:
            raise ConfigError(location, f"the {tap.role}'s module {tap.module_path!r} was not called "
                              f"on the example inputs", value=tap.path,
                              fix="tap a module that the forward pass uses")
        if tap.kind == "attention" and captures[tap] is None:
            raise ConfigError(location, f"{tap.module_path!r} returned no attention probabilities",
                              value=tap.path, fix="use a module that returns them (eager attention), "
                              "or pick them out with a selector (path:index)")
        shapes[tap] = shape_of(captures[tap])
    return shapes


def in_place_problem(distiller: Distiller, error: CaptureError) -> str:
    """The CaptureError's problem, naming the modules around the tap that run in place."""
    tap = error.tap
    if not error.in_place or not tap.module_path:
        return error.problem
    model = distiller.model(tap.role)
    parent_path = tap.module_path.rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        return error.problem
    # with the type: nn.Hardswish's repr does not show inplace=True, so '2' alone would not say which op
    in_place = [f"{name!r} ({type(m).__name__})" for name, m in parent.named_children() if getattr(m, "inplace", False)]
    where = f"{type(parent).__name__} {parent_path!r}" if parent_path else f"the {tap.role}'s forward"
    return (f"{error.problem}; it happens in the forward of {where}"
            + (f", whose {', '.join(in_place)} run in place (inplace=True)" if in_place else
               " (an in-place op such as `out += identity` after the tapped module)"))


def _warn_repeated_calls(distiller: Distiller, calls: dict[Tap, list[Any]]) -> None:
    for tap, values in calls.items():
        if len(values) < 2 or tap in distiller._explicit_policy or tap.kind not in ("output", "input", "attention"):
            continue
        shapes = ", ".join(str(shape_of(v)) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        warnings.warn(f"{distiller._taps[tap]}: the {tap.role}'s {tap.module_path or '(model)'!r} is called "
                      f"{len(values)} times in one forward (shapes {shapes}); the term gets its last call. "
                      f"Set `calls: first`, `calls: last` or `calls: all` (a list of every call) on the term to "
                      f"choose and silence this warning", UserWarning, stacklevel=4)
