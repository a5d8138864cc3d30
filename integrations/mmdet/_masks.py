"""See the mask: ``ImitationMaskHook`` saves feature-imitation masks over a few training images as PNGs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mmdet.registry import HOOKS
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper


def mask_overlay(image: np.ndarray, masks: list[torch.Tensor], batch_shape: tuple[int, int],
                 boxes: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """One image with each level's mask over it, the levels side by side: (H, W · levels, 3) uint8, BGR.

    ``image`` (H, W, 3) is the image as the pipeline gave it (before
    normalization and padding); each mask (h, w) covers the padded batch of
    ``batch_shape``, so it is scaled to that size (nearest) and cropped to the
    image. Masked pixels are blended with red (``alpha``); the gt ``boxes``
    (x1, y1, x2, y2) are drawn in green.
    """
    import cv2

    height, width = image.shape[:2]
    panels = []
    for mask in masks:
        full = F.interpolate(mask[None, None].float().cpu(), size=tuple(batch_shape), mode="nearest")[0, 0]
        on = full[:height, :width].numpy() > 0
        panel = image.astype(np.float32).copy()
        panel[on] = (1 - alpha) * panel[on] + alpha * np.array([0.0, 0.0, 255.0])
        panel = panel.round().clip(0, 255).astype(np.uint8)
        for x1, y1, x2, y2 in ([] if boxes is None else boxes.round().astype(int).tolist()):
            cv2.rectangle(panel, (x1, y1), (x2 - 1, y2 - 1), (0, 255, 0), 1)
        panels.append(panel)
    return np.concatenate(panels, axis=1)


@HOOKS.register_module()
class ImitationMaskHook(Hook):
    """Every ``interval`` training iterations, save the first ``images`` images of the batch with the masks
    each ``det_feature_imitation`` term used (one panel per imitated level) as PNGs under
    ``work_dir/out_dir/iter_<n>_<term>_<image>.png``, and give them to the Runner's visualizer.

    ``custom_hooks = [dict(type='ImitationMaskHook', interval=100, images=2)]``. A term with ``region: all`` has
    no mask and is skipped. Only the main process writes. The images are the pipeline's (flipped, resized as
    trained); a data preprocessor's ``batch_augments`` that resize the batch are not undone.
    """

    priority = "LOW"

    def __init__(self, interval: int = 100, images: int = 2, out_dir: str = "kd_masks", alpha: float = 0.5):
        self.interval, self.images, self.out_dir, self.alpha = interval, images, out_dir, alpha
        self.written: list[Path] = []

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if not is_main_process() or not self.every_n_train_iters(runner, self.interval) or not data_batch:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        distiller = getattr(model, "distiller", None)
        terms = [t for t in getattr(distiller, "terms", []) if getattr(t, "last_masks", None) is not None]
        if not terms:
            return
        import cv2

        out = Path(runner.work_dir) / self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        inputs, samples = data_batch["inputs"], data_batch["data_samples"]
        # the batch the masks cover: the images padded to the largest, rounded up to the pad_size_divisor
        divisor = getattr(model.data_preprocessor, "pad_size_divisor", 1)
        batch_shape = tuple(int(np.ceil(max(image.shape[dim] for image in inputs) / divisor)) * divisor
                            for dim in (1, 2))
        for term in terms:
            for index in range(min(self.images, len(samples))):
                sample = samples[index]
                image = inputs[index].permute(1, 2, 0).cpu().numpy()    # the pipeline's image, BGR (C, H, W)
                boxes = sample.gt_instances.bboxes
                boxes = (boxes.tensor if hasattr(boxes, "tensor") else boxes).cpu().numpy()
                panel = mask_overlay(image, [m[index] for m in term.last_masks], batch_shape, boxes, self.alpha)
                path = out / f"iter_{runner.iter + 1:06d}_{term.name}_{index}.png"
                cv2.imwrite(str(path), panel)
                self.written.append(path)
                runner.visualizer.add_image(f"kd_masks/{term.name}_{index}", panel[..., ::-1].copy(),
                                            step=runner.iter + 1)
