# Localization distillation (Zheng et al. 2022): the quarter-width GFL learns the teacher's box-edge distributions.
_base_ = './gfl_tiny_shapes.py'
custom_imports = dict(imports=['kdhooks.integrations.mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='DistilledDetector',
    student={{_base_.model}},
    teacher='{{ fileDirname }}/gfl_r18_shapes.py',
    teacher_ckpt='runs/mmdet/gfl_teacher/iter_400.pth',
    example_size=(64, 64),
    kd=dict(terms=[dict(kind='ld', weight=0.25, temperature=10.0, region='positives')]))
