"""kdhooks: knowledge distillation for the training loop you already have.

    kd = kdhooks.Distiller(student, teacher, "kd.yaml", example_inputs=x0)
    loss = kd(task_loss, labels=y)
"""
from ._config import DistillConfig, load_config
from ._context import LossContext
from ._distiller import Distiller
from ._errors import ConfigError, LossError, did_you_mean
from ._manager import PluginInfo, installed_plugins, plugin_manager
from ._recorder import model_hook
from ._registry import Registry
from ._schedule import Schedule
from ._taps import Tap, logits_of, module_table
from ._term import Term
from .hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DistillConfig",
    "Distiller",
    "LossContext",
    "LossError",
    "PluginInfo",
    "Registry",
    "Schedule",
    "Tap",
    "Term",
    "did_you_mean",
    "hookimpl",
    "hookspec",
    "installed_plugins",
    "load_config",
    "logits_of",
    "model_hook",
    "module_table",
    "plugin_manager",
]
