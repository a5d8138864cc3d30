"""kdhooks: knowledge distillation for the training loop you already have.

    kd = kdhooks.Distiller(student, teacher, "kd.yaml", example_inputs=x0)
    loss = kd(task_loss, labels=y)
"""
from ._config import DistillConfig, load_config
from ._context import LossContext
from ._distiller import Distiller, attached
from ._errors import ConfigError, LossError, PluginError, did_you_mean
from ._manager import PluginInfo, installed_plugins, plugin_manager
from ._recorder import model_hook
from ._registry import Registry
from ._options import Finite, NonNegative, NonNegativeInt, Positive, PositiveInt, UnitInterval
from ._schedule import Schedule
from ._shapes import expect_rank, expect_same_classes, expect_same_shape, feature_shape
from ._taps import Tap, logits_of, module_table
from ._term import Term
from .hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DistillConfig",
    "Finite",
    "Distiller",
    "LossContext",
    "LossError",
    "NonNegative",
    "NonNegativeInt",
    "PluginError",
    "Positive",
    "PositiveInt",
    "PluginInfo",
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
    "hookspec",
    "installed_plugins",
    "load_config",
    "logits_of",
    "model_hook",
    "module_table",
    "plugin_manager",
]
