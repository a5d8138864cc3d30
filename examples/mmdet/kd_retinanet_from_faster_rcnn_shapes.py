# A single-stage student from a two-stage teacher: the quarter-width RetinaNet imitates the ResNet-18 Faster R-CNN's
# FPN levels (Wang et al. 2019) near objects, the region taken from the RetinaNet's own anchors.
_base_ = './retinanet_tiny_shapes.py'
custom_imports = dict(imports=['kdhooks.integrations.mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='DistilledDetector',
    student={{_base_.model}},
    teacher='{{ fileDirname }}/faster_rcnn_r18_shapes.py',
    teacher_ckpt='runs/mmdet/faster_rcnn_teacher/iter_400.pth',
    example_size=(64, 64),
    kd=dict(terms=[dict(kind='det_feature_imitation', weight=0.01, region='objects', ratio=0.5)]))
