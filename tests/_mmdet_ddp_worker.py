"""One process of the 2-process CPU DDP run (tests/test_mmdet_runner.py): torchrun ... CONFIG OUT_DIR.

mmengine's launcher calls torch.cuda.set_device and passes device_ids, which a
CPU process cannot take; so the gloo group is started here (the Runner then
skips its own init) and the wrapper is configured without device_ids.
"""
import gc
import json
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)
dist.init_process_group("gloo")

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

config, out = sys.argv[1], sys.argv[2]
cfg = Config.fromfile(config)
cfg.launcher = "pytorch"
cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
runner = Runner.from_cfg(cfg)
runner.train()
model = runner.model.module
result = {
    "wrapper": type(runner.model).__name__,
    "find_unused_parameters": runner.model.find_unused_parameters,
    "iter": runner.iter,
    "step": model.distiller.step,
    "losses": sorted(k for k in runner.message_hub.log_scalars if k.startswith("train/loss_kd_")),
    "parameters": {name: p.detach().double().sum().item() for name, p in model.named_parameters()},
}
with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
del runner, model
# free what is left in reference cycles before interpreter shutdown, where gloo's threads can abort a finished
# process (SIGABRT; see examples/accelerate/train.py)
gc.collect()
