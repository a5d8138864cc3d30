# Teacher: ATSS (mmdet's atss_r50_fpn_1x_coco.py: one anchor per location, GIoU on decoded boxes), ResNet-18, P2-P5.
_base_ = './retinanet_r18_shapes.py'
model = dict(
    type='ATSS',
    bbox_head=dict(
        _delete_=True, type='ATSSHead', num_classes=2, in_channels=64, stacked_convs=2, feat_channels=64,
        anchor_generator=dict(type='AnchorGenerator', ratios=[1.0], octave_base_scale=4, scales_per_octave=1,
                              strides=[4, 8, 16, 32]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0], target_stds=[0.1, 0.1, 0.2, 0.2]),
        reg_decoded_bbox=True,  # ATSSHead's default, written out: loss_bbox compares decoded boxes with the gt boxes
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    train_cfg=dict(_delete_=True, assigner=dict(type='ATSSAssigner', topk=9), allowed_border=-1, pos_weight=-1,
                   debug=False),
    test_cfg=dict(nms=dict(type='nms', iou_threshold=0.6)))
