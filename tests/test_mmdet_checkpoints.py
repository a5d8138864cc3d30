"""mmengine loads its checkpoints under torch.load(weights_only=True) once the adapter is imported, and no more."""
import pickle

import numpy as np
import pytest
import torch

from _mmdet import require_mmdet

require_mmdet()

from mmengine.logging import HistoryBuffer, MessageHub  # noqa: E402
from mmengine.runner import CheckpointLoader  # noqa: E402

import kdhooks.integrations.mmdet  # noqa: E402,F401  (allows the globals)


class Reaches:
    """Pickles as ``getattr(target, name)``: what a crafted checkpoint would do with an allowed getattr."""

    def __init__(self, target, name):
        self.target, self.name = target, name

    def __reduce__(self):
        return getattr, (self.target, self.name)


def save_runner_like_checkpoint(path):
    hub = MessageHub.get_instance("kdhooks-weights-only")
    for value in (1.5, np.float64(0.5), torch.tensor(1.0)):
        hub.update_scalar("train/loss", value)
    hub.update_info("iter", 3)
    torch.save({"meta": {"seed": np.int64(7), "scale": np.float32(0.5), "iters": np.arange(3)},
                "message_hub": hub.state_dict(), "state_dict": {"w": torch.ones(2)}}, path)


def test_a_runner_message_hub_and_numpy_meta_load_with_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_runner_like_checkpoint(path)
    # another library's safe_globals context removes the numpy globals it listed when it exits
    with torch.serialization.safe_globals([np.ndarray, np.dtype, HistoryBuffer]):
        pass
    loaded = CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, HistoryBuffer)
    assert buffer.mean() == pytest.approx(1.0) and buffer.statistics("min") == pytest.approx(0.5)
    assert loaded["meta"]["seed"] == 7 and loaded["meta"]["iters"].tolist() == [0, 1, 2]
    assert loaded["message_hub"]["runtime_info"]["iter"] == 3
    assert torch.load(path, weights_only=True)["meta"]["seed"] == 7   # and torch.load itself, after that load


@pytest.mark.parametrize("target, name", [(np.ndarray, "tofile"), (HistoryBuffer, "__init__"),
                                          (HistoryBuffer, "__class__")])
def test_every_other_getattr_is_refused(tmp_path, target, name):
    path = tmp_path / "crafted.pth"
    torch.save({"x": Reaches(target, name)}, path)
    with pytest.raises(pickle.UnpicklingError, match="only HistoryBuffer statistics methods"):
        CheckpointLoader.load_checkpoint(str(path), map_location="cpu")


def test_globals_outside_the_list_still_fail(tmp_path):
    path = tmp_path / "crafted.pth"
    torch.save({"x": Reaches(HistoryBuffer, "min"), "y": np.random.default_rng(0)}, path)
    with pytest.raises(pickle.UnpicklingError, match="numpy.random"):
        CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
