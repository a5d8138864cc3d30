"""mmengine loads its checkpoints under torch.load(weights_only=True) once the adapter is imported, and no more;
the adapter replaces mmengine's loader only inside ``mmengine_checkpoint_loader()``."""
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _mmdet import require_mmdet

require_mmdet()

from mmengine.logging import HistoryBuffer, MessageHub  # noqa: E402
from mmengine.runner import CheckpointLoader  # noqa: E402

from kdhooks.integrations.mmdet import mmengine_checkpoint_loader  # noqa: E402  (importing allows the globals)


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


def assert_loads(path):
    loaded = CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, HistoryBuffer)
    assert buffer.mean() == pytest.approx(1.0) and buffer.statistics("min") == pytest.approx(0.5)
    assert loaded["meta"]["seed"] == 7 and loaded["meta"]["iters"].tolist() == [0, 1, 2]
    assert loaded["message_hub"]["runtime_info"]["iter"] == 3


def test_a_runner_message_hub_and_numpy_meta_load_with_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_runner_like_checkpoint(path)
    # a fresh process: what importing the adapter does, whatever other tests did to this one's allowlist
    program = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
               "import torch\nimport kdhooks.integrations.mmdet\n"
               "from test_mmdet_checkpoints import assert_loads\n"
               f"assert_loads({str(path)!r})\n"
               f"assert torch.load({str(path)!r}, weights_only=True)['meta']['seed'] == 7\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_loader_that_allows_them_again_is_scoped_to_its_context(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_runner_like_checkpoint(path)
    mmengines_loader = CheckpointLoader._schemes[""]
    # another library's safe_globals context removes the numpy globals it listed when it exits
    with torch.serialization.safe_globals([np.ndarray, np.dtype, HistoryBuffer]):
        pass
    with pytest.raises(pickle.UnpicklingError):
        CheckpointLoader.load_checkpoint(str(path), map_location="cpu")   # mmengine's own loader: untouched
    with mmengine_checkpoint_loader():
        assert CheckpointLoader._schemes[""] is not mmengines_loader
        assert_loads(path)
    assert CheckpointLoader._schemes[""] is mmengines_loader
    assert torch.load(path, weights_only=True)["meta"]["seed"] == 7   # allowed again by that load


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
