"""A toy two-level dense detector and its anchors, for the detection terms' tests (no mmdet needed)."""
import torch
from torch import nn


def anchors_for(size, stride, shapes):
    """(H·W·A, 4) anchors, rows ordered (y, x, anchor) as dense heads flatten them."""
    rows = []
    for y in range(size):
        for x in range(size):
            cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
            rows += [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] for w, h in shapes]
    return torch.tensor(rows)


class Levels(nn.Module):
    def __init__(self, channels, strides=(4, 8)):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, channels, 3, stride=s, padding=1) for s in strides])

    def forward(self, x):
        return tuple(conv(x) for conv in self.convs)


class Head(nn.Module):
    def __init__(self, channels, priors=2, classes=3, values=4):
        super().__init__()
        self.cls = nn.Conv2d(channels, priors * classes, 1)
        self.reg = nn.Conv2d(channels, priors * values, 1)

    def forward(self, features):
        return [self.cls(f) for f in features], [self.reg(f) for f in features]


class ToyDetector(nn.Module):
    """A two-level dense detector: neck -> (per-level class scores, per-level box outputs)."""

    def __init__(self, channels, priors=2, classes=3, values=4, strides=(4, 8)):
        super().__init__()
        self.neck = Levels(channels, strides)
        self.bbox_head = Head(channels, priors, classes, values)

    def forward(self, x):
        return self.bbox_head(self.neck(x))


class RoIHead(nn.Module):
    """A RoI box head: rows of RoI features (N, channels) -> class scores (N, C+1), deltas (N, 4·C)."""

    def __init__(self, channels, classes=2):
        super().__init__()
        self.fc_cls = nn.Linear(channels, classes + 1)
        self.fc_reg = nn.Linear(channels, 4 * classes)

    def forward(self, rois):
        return self.fc_cls(rois), self.fc_reg(rois)


class ToyTwoStage(nn.Module):
    """A two-stage detector: neck -> RPN maps (objectness, deltas); one RoI row per level-0 location -> RoI head."""

    def __init__(self, channels, classes=2, strides=(4, 8)):
        super().__init__()
        self.neck = Levels(channels, strides)
        self.rpn_head = Head(channels, priors=3, classes=1)
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = RoIHead(channels, classes)

    def forward(self, x):
        levels = self.neck(x)
        rois = levels[0].flatten(2).transpose(1, 2).reshape(-1, levels[0].shape[1])
        return self.rpn_head(levels), self.roi_head.bbox_head(rois)
