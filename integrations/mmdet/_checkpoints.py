"""mmengine checkpoints under ``torch.load(weights_only=True)``: exactly what they hold besides tensors is allowed."""
from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader
from mmengine.runner.checkpoint import load_from_local


def _history_buffer_method(owner: Any, name: str) -> Any:
    """The one ``getattr`` an mmengine checkpoint pickles: a HistoryBuffer statistics method, by name."""
    if owner is HistoryBuffer and (name in HistoryBuffer._statistics_methods
                                   or name in ("min", "max", "current", "mean")):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"refusing getattr({owner!r}, {name!r}): only HistoryBuffer statistics "
                                 f"methods are allowed in a checkpoint")


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine checkpoints, allowing exactly what they hold.

    Besides tensors a Runner checkpoint holds its message hub's
    ``HistoryBuffer`` logs (numpy arrays inside, and a ``getattr`` on
    HistoryBuffer for its statistics methods) and numpy scalars. Allowed: the
    HistoryBuffer class, numpy's array and scalar reconstruction with the
    plain numeric dtypes, and ``getattr`` replaced by a function that returns
    a HistoryBuffer statistics method and refuses anything else. Every other
    global still fails to load; ``weights_only=False`` is never used.
    """
    if torch.__version__ < (2, 6):
        return  # before torch 2.6 torch.load defaults to weights_only=False: mmengine's loads need nothing
    core = getattr(np, "_core", None) or np.core
    dtype_classes = [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                                  np.uint16, np.uint32, np.uint64, np.float16, np.float32,
                                                  np.float64)]
    torch.serialization.add_safe_globals([
        HistoryBuffer, np.ndarray, np.dtype, *dtype_classes,
        # numpy 2 pickles as numpy._core, numpy 1 as numpy.core: allow both names
        (core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (core.multiarray.scalar, "numpy._core.multiarray.scalar"),
        (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
        (_history_buffer_method, "builtins.getattr"),
    ])


def _load_local_checkpoint(filename: str, map_location: Any = None) -> Any:
    """mmengine's loader of local checkpoints (teacher_ckpt, load_from, resume) with those globals allowed.

    Allowed again at every load: a library's ``torch.serialization.safe_globals``
    context (the transformers Trainer's, for one) removes the globals it lists
    on exit, numpy's included, even when someone else had allowed them.
    """
    allow_mmengine_checkpoints()
    return load_from_local(filename, map_location)


@contextlib.contextmanager
def mmengine_checkpoint_loader() -> Iterator[None]:
    """Within: mmengine's loader of local checkpoints allows the mmengine globals again before each load.

    Needed only where another library's ``torch.serialization.safe_globals``
    context (the transformers Trainer's, for one) has removed them since this
    module was imported: ``with mmengine_checkpoint_loader(): runner.train()``.
    On exit the loader that was registered before is registered again, so
    nothing outside the block loads differently.
    """
    schemes = CheckpointLoader._schemes  # mmengine keeps its schemes here; no public getter exists
    previous = schemes.get("")
    CheckpointLoader.register_scheme(prefixes="", loader=_load_local_checkpoint, force=True)
    try:
        yield
    finally:
        if previous is None:
            schemes.pop("", None)
        else:
            CheckpointLoader.register_scheme(prefixes="", loader=previous, force=True)
