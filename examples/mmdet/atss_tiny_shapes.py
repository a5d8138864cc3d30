# Student: the ATSS teacher at a quarter of the width.
_base_ = './atss_r18_shapes.py'
model = dict(
    backbone=dict(base_channels=16),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1))
optim_wrapper = dict(optimizer=dict(lr=0.01))  # the students' learning rate (see retinanet_tiny_shapes.py)
