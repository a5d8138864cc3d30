# Student: the Faster R-CNN teacher at a quarter of the width (16 base channels, 32-channel FPN, RPN and RoI features,
# 64-unit FC layers).
_base_ = './faster_rcnn_r18_shapes.py'
model = dict(
    backbone=dict(base_channels=16),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=32), bbox_head=dict(in_channels=32, fc_out_channels=64)))
optim_wrapper = dict(optimizer=dict(lr=0.01))  # the students' learning rate (see retinanet_tiny_shapes.py)
