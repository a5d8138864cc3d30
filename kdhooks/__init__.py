"""kdhooks: knowledge distillation for the training loop you already have.

    kd = kdhooks.Distiller(student, teacher, "kd.yaml", example_inputs=x0)
    loss = kd(task_loss, labels=y)

The names here are the public API: what a user, a plugin author (Term,
Schedule, Registry, Tap, hookimpl, option types, shape helpers) and an
integration author (Distiller's public methods, LossMeter, model_hook) use.
"""
from ._context import LossContext
from ._distiller import Distiller, attached
from ._errors import ConfigError, LossError, PluginError, did_you_mean
from ._meter import LossMeter
from ._on_policy import OnPolicy
from ._options import Finite, NonNegative, NonNegativeInt, Positive, PositiveInt, UnitInterval
from ._recorder import Recorded, model_hook
from ._registry import Registry
from ._schedule import Schedule
from ._shapes import expect_rank, expect_same_classes, expect_same_shape, feature_shape, tensor_of
from ._taps import Tap, logits_of, module_table
from ._term import Term
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Distiller",
    "Finite",
    "LossContext",
    "LossError",
    "LossMeter",
    "NonNegative",
    "NonNegativeInt",
    "OnPolicy",
    "PluginError",
    "Positive",
    "PositiveInt",
    "Recorded",
    "Registry",
    "Schedule",
    "Tap",
    "Term",
    "UnitInterval",
    "attached",
    "did_you_mean",
    "expect_rank",
    "expect_same_classes",
    "expect_same_shape",
    "feature_shape",
    "hookimpl",
    "logits_of",
    "model_hook",
    "module_table",
    "tensor_of",
]
