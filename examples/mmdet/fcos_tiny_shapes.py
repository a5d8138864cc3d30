# Student: anchor-free FCOS (mmdet's fcos ...-center-normbbox-centeronreg-giou config: centre sampling, GIoU) at the
# tiny RetinaNet's width, FPN P2-P5 (strides 4-32), regress ranges scaled to 64x64 images.
_base_ = './retinanet_tiny_shapes.py'
model = dict(
    type='FCOS',
    bbox_head=dict(
        _delete_=True, type='FCOSHead', num_classes=2, in_channels=32, stacked_convs=1, feat_channels=32,
        strides=[4, 8, 16, 32], regress_ranges=((-1, 16), (16, 32), (32, 64), (64, 1e8)),
        norm_on_bbox=True, centerness_on_reg=True, center_sampling=True, center_sample_radius=1.5, conv_bias=True,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=1.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    train_cfg=None,
    test_cfg=dict(nms=dict(type='nms', iou_threshold=0.6)))
