# Distill the quarter-width ATSS from the ResNet-18 ATSS on the shapes data. ATSS compares decoded boxes with the
# gt boxes (GIoU, reg_decoded_bbox=True); det_bounded_reg compares its deltas with the targets encoded as deltas.
_base_ = './atss_tiny_shapes.py'
custom_imports = dict(imports=['kdhooks.integrations.mmdet'], allow_failed_imports=False)
model = dict(
    _delete_=True,
    type='DistilledDetector',
    student={{_base_.model}},
    teacher='{{ fileDirname }}/atss_r18_shapes.py',
    teacher_ckpt='runs/mmdet/atss_teacher/iter_400.pth',
    example_size=(64, 64),
    kd=dict(terms=[
        dict(kind='det_cls_kd', weight=1.0, temperature=1.0, background_weight=1.5),
        dict(kind='det_bounded_reg', weight=0.1, margin=0.0),
        dict(kind='det_feature_imitation', weight=0.01, region='objects', ratio=0.5),
    ]))
