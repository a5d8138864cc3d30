# Teacher: GFL (generalized focal loss, distributions over box edges), ResNet-18, FPN P2-P5.
_base_ = './retinanet_r18_shapes.py'
model = dict(
    type='GFL',
    bbox_head=dict(
        _delete_=True, type='GFLHead', num_classes=2, in_channels=64, stacked_convs=2, feat_channels=64,
        anchor_generator=dict(type='AnchorGenerator', ratios=[1.0], octave_base_scale=4, scales_per_octave=1,
                              strides=[4, 8, 16, 32]),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_dfl=dict(type='DistributionFocalLoss', loss_weight=0.25), reg_max=8,
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(_delete_=True, assigner=dict(type='ATSSAssigner', topk=9), allowed_border=-1, pos_weight=-1,
                   debug=False),
    test_cfg=dict(nms=dict(type='nms', iou_threshold=0.6)))
