# Distill the quarter-width Faster R-CNN from the ResNet-18 Faster R-CNN on the shapes data.
# Chen et al. 2017 on both stages: soft classification (the RPN's objectness; the RoI head's classes over the
# proposals the student sampled, the teacher's RoI head run on the same proposals: rois=True) and teacher-bounded
# regression (RPN deltas against its anchors' targets; RoI deltas against the sampled proposals' targets).
# Wang et al. 2019: feature imitation on every FPN level near objects, the region taken from the RPN's anchors.
_base_ = './faster_rcnn_tiny_shapes.py'
custom_imports = dict(imports=['kdhooks.integrations.mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='DistilledDetector',
    student={{_base_.model}},
    teacher='{{ fileDirname }}/faster_rcnn_r18_shapes.py',
    teacher_ckpt='runs/mmdet/faster_rcnn_teacher/iter_400.pth',
    example_size=(64, 64),
    kd=dict(terms=[
        dict(kind='det_cls_kd', name='rpn_cls_kd', student='rpn_head:0', teacher='rpn_head:0', weight=1.0),
        dict(kind='det_cls_kd', name='roi_cls_kd', rois=True, student='roi_head.bbox_head:0',
             teacher='roi_head.bbox_head:0', activation='softmax', weight=1.0, temperature=1.0, background_weight=1.5),
        dict(kind='det_bounded_reg', name='rpn_bounded_reg', student='rpn_head:1', teacher='rpn_head:1', weight=0.5),
        dict(kind='det_bounded_reg', name='roi_bounded_reg', rois=True, student='roi_head.bbox_head:1',
             teacher='roi_head.bbox_head:1', weight=0.1),  # RoI deltas are scaled by 1/std (0.1, 0.2): 0.1
        dict(kind='det_feature_imitation', weight=0.01, region='objects', ratio=0.5),
    ]))
