"""The dry pass: the student (and so its teachers) run once on example inputs, to learn every tap's shape."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._errors import ConfigError
from ._recorder import TapError
from ._taps import Tap, shape_of

if TYPE_CHECKING:
    from ._distiller import Distiller


def dry_run(distiller: Distiller, example_inputs: Any) -> dict[Tap, Any]:
    """Run the student (and so its teachers) once on ``example_inputs`` to learn shapes."""
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    modes = {role: m.module.training for role, m in distiller._models.items()}
    distiller._dry = True
    try:
        for m in distiller._models.values():
            m.module.eval()
        with torch.no_grad():
            distiller.student(*args, **kwargs)
        captures = dict(distiller._recorder.captures)
    except TapError as error:
        raise ConfigError(distiller._taps[error.tap], str(error.__cause__ or error), value=error.tap.path,
                          fix="check the selector after ':' against the module's output") from None
    finally:
        distiller._dry = False
        distiller._recorder.clear()
        for role, training in modes.items():
            distiller._models[role].module.train(training)
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
