# Student: the teacher's RetinaNet with a quarter of the width (ResNet-18 at 16 base channels, 32-channel FPN and head).
_base_ = './retinanet_r18_shapes.py'
model = dict(
    backbone=dict(base_channels=16),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1))
# from scratch at this width, lr 0.02 (the teacher's) leaves the classifier stuck at background in some seeds
optim_wrapper = dict(optimizer=dict(lr=0.01))
