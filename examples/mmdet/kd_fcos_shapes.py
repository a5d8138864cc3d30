# Feature imitation for an anchor-free student: FCOS imitates the ResNet-18 RetinaNet's FPN levels at the locations
# its own assigner makes positive (points inside the gt boxes, within the centre-sampling radius, in the level's range).
_base_ = './fcos_tiny_shapes.py'
custom_imports = dict(imports=['kdhooks.integrations.mmdet'], allow_failed_imports=False)
model = dict(
    _delete_=True,
    type='DistilledDetector',
    student={{_base_.model}},
    teacher='{{ fileDirname }}/retinanet_r18_shapes.py',
    teacher_ckpt='runs/mmdet/teacher/iter_400.pth',
    example_size=(64, 64),
    kd=dict(terms=[dict(kind='det_feature_imitation', weight=0.01, region='positives')]))
