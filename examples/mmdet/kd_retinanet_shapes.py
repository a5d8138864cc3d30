# Distill the quarter-width RetinaNet from the ResNet-18 RetinaNet on the shapes data (see README.md here).
# Chen et al. 2017 (soft classification with a background weight, teacher-bounded regression) and
# Wang et al. 2019 (feature imitation near objects) on every FPN level.
_base_ = './retinanet_tiny_shapes.py'
custom_imports = dict(imports=['kdhooks.integrations.mmdet'], allow_failed_imports=False)
teacher_config = '{{ fileDirname }}/retinanet_r18_shapes.py'

model = dict(
    _delete_=True,
    type='DistilledDetector',
    student={{_base_.model}},
    teacher=teacher_config,
    teacher_ckpt='runs/mmdet/teacher/iter_400.pth',
    example_size=(64, 64),
    kd=dict(terms=[
        dict(kind='det_cls_kd', weight=1.0, temperature=1.0, background_weight=1.5),
        dict(kind='det_bounded_reg', weight=0.5, margin=0.0),
        dict(kind='det_feature_imitation', weight=0.01, region='objects', ratio=0.5),  # λ of Wang et al.
    ]))
