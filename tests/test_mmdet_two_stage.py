"""Two-stage detectors (Faster R-CNN) in DistilledDetector, one batch outside a Runner: each term against a hand
computation on the two-stage tensors (RPN maps, the RoI rows of the proposals the student sampled), and what is
refused at build."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from _mmdet import EXAMPLES, require_mmdet

require_mmdet()

from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures.bbox import bbox2roi, get_box_tensor  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import kdhooks  # noqa: E402
import kdhooks.integrations.mmdet  # noqa: E402,F401
from kdhooks.plugins.detection import feature_imitation_loss, imitation_mask  # noqa: E402

register_all_modules()

CHEN_AND_WANG = [
    dict(kind="det_cls_kd", name="rpn_cls", student="rpn_head:0", teacher="rpn_head:0"),
    dict(kind="det_cls_kd", name="roi_cls", rois=True, student="roi_head.bbox_head:0", teacher="roi_head.bbox_head:0",
         activation="softmax", temperature=2.0, background_weight=1.5),
    dict(kind="det_bounded_reg", name="rpn_reg", student="rpn_head:1", teacher="rpn_head:1"),
    dict(kind="det_bounded_reg", name="roi_reg", rois=True, student="roi_head.bbox_head:1",
         teacher="roi_head.bbox_head:1"),
    dict(kind="det_feature_imitation", name="imitation", region="objects", ratio=0.5),
]
POSITIVES = dict(kind="det_feature_imitation", name="imitation_positives", region="positives")


def model_config(name):
    return Config.fromfile(str(EXAMPLES / name)).model


def build(student, teacher, terms, **options):
    """A DistilledDetector from example configs, without a teacher checkpoint."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*no teacher_ckpt")
        return MODELS.build(dict(type="DistilledDetector", student=student, teacher=teacher, kd=dict(terms=terms),
                                 example_size=(64, 64), **options))


def preprocessed(model):
    """Two images of different widths (the second is padded), three and two boxes, as the student's inputs."""
    data = demo_mm_inputs(2, [[3, 64, 64], [3, 64, 48]], num_items=[3, 2], num_classes=2)
    return model.data_preprocessor(data, True)


class Recorded:
    """Outputs of the student's modules in its training forward, and the sampling results of its RoI head."""

    def __init__(self, student):
        self.outputs, self.sampling = {}, []
        for name in ("neck", "rpn_head", "roi_head.bbox_head"):
            student.get_submodule(name).register_forward_hook(
                lambda module, args, out, name=name: self.outputs.setdefault(name, out))
        sampler = student.roi_head.bbox_sampler
        sample = sampler.sample

        def recording(*args, **kwargs):
            result = sample(*args, **kwargs)
            self.sampling.append(result)
            return result
        sampler.sample = recording


def rows(maps):
    """Per-level maps (B, A·4, H, W) as (B, Σ H·W·A, 4): row i of an image is anchor i of its grid, level by level."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, 4) for m in maps], dim=1)


def encode_by_hand(anchors, boxes, stds):
    """DeltaXYWH deltas of ``boxes`` from ``anchors`` (means 0), written out."""
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    px, py = anchors[:, 0] + 0.5 * pw, anchors[:, 1] + 0.5 * ph
    gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gx, gy = boxes[:, 0] + 0.5 * gw, boxes[:, 1] + 0.5 * gh
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)
    return deltas / torch.tensor(stds)


def bounded(student, teacher, targets):
    """Chen et al.'s teacher-bounded L2, mean over rows: the student's squared error where it exceeds the teacher's."""
    student_error, teacher_error = ((student - targets) ** 2).sum(-1), ((teacher - targets) ** 2).sum(-1)
    return torch.where(student_error > teacher_error, student_error, torch.zeros_like(student_error)).mean()


@pytest.mark.parametrize("class_agnostic", [False, True], ids=["class-specific", "class-agnostic"])
def test_faster_rcnn_pair_each_term_is_its_formula_on_both_stages(class_agnostic):
    student_cfg, teacher_cfg = model_config("faster_rcnn_tiny_shapes.py"), model_config("faster_rcnn_r18_shapes.py")
    for cfg in (student_cfg, teacher_cfg):
        cfg.roi_head.bbox_head.reg_class_agnostic = class_agnostic
    model = build(student_cfg, teacher_cfg, [*CHEN_AND_WANG, POSITIVES])
    student, teacher = model.student, model.teacher
    recorded = Recorded(student)
    data = preprocessed(model)
    model.train()
    losses = model(**data, mode="loss")
    inputs, samples = data["inputs"], data["data_samples"]
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"} <= losses.keys()

    # --- the RoI head: the proposals the student sampled, the teacher's RoI head on the same proposals -----------
    sampling = recorded.sampling
    rois = bbox2roi([result.priors for result in sampling])
    assert len(rois) == 2 * 128                                          # the R-CNN sampler's 128 per image
    student_cls, student_reg = (o.detach() for o in recorded.outputs["roi_head.bbox_head"])
    with torch.no_grad():
        teacher_features = teacher.extract_feat(inputs)
        teacher_rois = teacher.roi_head._bbox_forward(teacher_features, rois)      # mmdet's own RoI forward
    assert student_cls.shape == teacher_rois["cls_score"].shape == (256, 3)

    # det_cls_kd, softmax over 2 classes + background (last), T = 2, w0 = 1.5: −Σ_c w_c P_t log P_s, mean over RoIs
    weights = torch.tensor([1.0, 1.0, 1.5])
    p_teacher = F.softmax(teacher_rois["cls_score"] / 2.0, dim=-1)
    expected = -(weights * p_teacher * F.log_softmax(student_cls / 2.0, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(losses["loss_kd_roi_cls"].detach(), expected, rtol=1e-5, atol=1e-6)

    # det_bounded_reg on the RoI deltas of the positive proposals (the columns of their class), targets from mmdet's
    # own get_targets on the student's sampling results
    labels, _, targets, _ = student.roi_head.bbox_head.get_targets(sampling, student.roi_head.train_cfg)
    positive = (labels >= 0) & (labels < 2)
    assert positive.sum() >= 5
    columns = torch.zeros_like(labels) if class_agnostic else labels
    pick = lambda reg: reg.view(len(rois), -1, 4)[positive, columns[positive]]  # noqa: E731
    expected = bounded(pick(student_reg), pick(teacher_rois["bbox_pred"]), targets[positive])
    torch.testing.assert_close(losses["loss_kd_roi_reg"].detach(), expected, rtol=1e-5, atol=1e-6)

    # --- the RPN: dense maps, anchors, its assigner ----------------------------------------------------------------
    (student_obj, student_deltas) = ([m.detach() for m in maps] for maps in recorded.outputs["rpn_head"])
    with torch.no_grad():
        teacher_obj, teacher_deltas = teacher.rpn_head(teacher_features)
    # det_cls_kd, binary form (sigmoid objectness): −[p_t log p_s + w0 (1 − p_t) log(1 − p_s)], mean
    s = torch.cat([m.flatten() for m in student_obj]).sigmoid()
    t = torch.cat([m.flatten() for m in teacher_obj]).sigmoid()
    expected = -(t * torch.log(s) + 1.5 * (1 - t) * torch.log(1 - s)).mean()
    torch.testing.assert_close(losses["loss_kd_rpn_cls"].detach(), expected, rtol=1e-4, atol=1e-6)

    # det_bounded_reg on the RPN deltas: every anchor its assigner makes positive (gt labels set to 0, as mmdet's
    # two-stage detectors give them to the RPN; no random sample), targets encoded with stds 1
    head = student.rpn_head
    sizes = [m.shape[-2:] for m in student_obj]
    anchors = torch.cat(head.prior_generator.grid_priors(sizes, device="cpu"))
    chosen_student, chosen_teacher, chosen_targets, rpn_positives = [], [], [], []
    for image, sample in enumerate(samples):
        gt = InstanceData(bboxes=get_box_tensor(sample.gt_instances.bboxes),
                          labels=torch.zeros_like(sample.gt_instances.labels))
        assigned = head.assigner.assign(InstanceData(priors=anchors), gt)
        positive = assigned.gt_inds > 0
        rpn_positives.append(positive)
        chosen_targets.append(encode_by_hand(anchors[positive], gt.bboxes[assigned.gt_inds[positive] - 1], [1.0] * 4))
        chosen_student.append(rows(student_deltas)[image][positive])
        chosen_teacher.append(rows(teacher_deltas)[image][positive])
    assert sum(len(t) for t in chosen_targets) >= 5
    expected = bounded(torch.cat(chosen_student), torch.cat(chosen_teacher), torch.cat(chosen_targets))
    torch.testing.assert_close(losses["loss_kd_rpn_reg"].detach(), expected, rtol=1e-4, atol=1e-5)

    # --- det_feature_imitation near objects, Wang et al.'s region from the RPN's anchors ----------------------------
    levels = [f.detach() for f in recorded.outputs["neck"]]
    priors = head.prior_generator.grid_priors(sizes, device="cpu")
    masks = imitation_mask(priors, [get_box_tensor(s.gt_instances.bboxes) for s in samples], [tuple(z) for z in sizes])
    assert all(m.sum() < m.numel() for m in masks) and masks[0].sum() > 0
    terms = {term.name: term for term in model.distiller.terms}
    with torch.no_grad():
        expected = feature_imitation_loss([a(f) for a, f in zip(terms["imitation"].adapters, levels)],
                                          list(teacher_features), masks)
    torch.testing.assert_close(losses["loss_kd_imitation"].detach(), expected, rtol=1e-4, atol=1e-6)
    # region: positives, the locations where the RPN's assigner made one of the 3 anchors positive
    counts = [h * w * 3 for h, w in sizes]
    masks = [torch.stack([image.split(counts)[level].view(h, w, 3).any(-1) for image in rpn_positives]).float()
             for level, (h, w) in enumerate(sizes)]
    assert 0 < sum(m.sum() for m in masks) < sum(m.numel() for m in masks)
    with torch.no_grad():
        expected = feature_imitation_loss([a(f) for a, f in zip(terms["imitation_positives"].adapters, levels)],
                                          list(teacher_features), masks)
    torch.testing.assert_close(losses["loss_kd_imitation_positives"].detach(), expected, rtol=1e-4, atol=1e-6)
    assert all(losses[f"loss_kd_{n}"].requires_grad for n in ("rpn_cls", "roi_cls", "rpn_reg", "roi_reg", "imitation"))


def test_a_retinanet_student_imitates_a_faster_rcnn_teacher_near_its_anchors():
    model = build(model_config("retinanet_tiny_shapes.py"), model_config("faster_rcnn_r18_shapes.py"),
                  [dict(kind="det_feature_imitation", region="objects")])
    student, teacher = model.student, model.teacher
    levels = []
    student.neck.register_forward_hook(lambda module, args, out: levels.extend(f.detach() for f in out))
    data = preprocessed(model)
    model.train()
    loss = model(**data, mode="loss")["loss_kd_det_feature_imitation"]
    with torch.no_grad():
        teacher_features = teacher.extract_feat(data["inputs"])    # the teacher's FPN, P2-P5 as the student's
        sizes = [tuple(f.shape[-2:]) for f in levels]
        masks = imitation_mask(student.bbox_head.prior_generator.grid_priors(sizes, device="cpu"),
                               [get_box_tensor(s.gt_instances.bboxes) for s in data["data_samples"]], sizes)
        adapters = list(model.distiller.connectors.values())
        expected = feature_imitation_loss([a(f) for a, f in zip(adapters, levels)], list(teacher_features), masks)
    assert len(adapters) == 4 and masks[0].sum() > 0
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    # predict and tensor stay the student's
    model.eval()
    with torch.no_grad():
        assert len(model(**data, mode="predict")) == 2


def test_two_stage_terms_that_cannot_work_are_refused_at_build():
    faster, tiny = model_config("faster_rcnn_r18_shapes.py"), model_config("faster_rcnn_tiny_shapes.py")
    roi_cls = dict(kind="det_cls_kd", student="roi_head.bbox_head:0", teacher="roi_head.bbox_head:0",
                   activation="softmax")
    # a tap on the teacher's RoI head would record the teacher's own proposals: rois: true says what works
    with pytest.raises(kdhooks.ConfigError, match="would record the teacher's own proposals(.|\\n)*rois: true"):
        build(tiny, faster, [roi_cls])
    with pytest.raises(kdhooks.ConfigError, match="activation(.|\\n)*softmax over the classes and background"):
        build(tiny, faster, [{**roi_cls, "rois": True, "activation": "sigmoid"}])
    three = model_config("faster_rcnn_r18_shapes.py")
    three.roi_head.bbox_head.num_classes = 3
    with pytest.raises(kdhooks.ConfigError, match="RoI heads' rows differ \\(classes: student 2, teacher 3"):
        build(tiny, three, [{**roi_cls, "rois": True}])
    stds = model_config("faster_rcnn_r18_shapes.py")
    stds.roi_head.bbox_head.bbox_coder.target_stds = [1.0, 1.0, 1.0, 1.0]
    roi_reg = dict(kind="det_bounded_reg", rois=True, student="roi_head.bbox_head:1", teacher="roi_head.bbox_head:1")
    with pytest.raises(kdhooks.ConfigError, match="rows differ \\(box coder"):
        build(tiny, stds, [roi_reg])
    build(tiny, stds, [{**roi_cls, "rois": True}])                   # class scores do not depend on the coder
    # RoI terms need a RoI head on both sides
    with pytest.raises(kdhooks.ConfigError, match="the teacher \\(RetinaNet\\) has no RoI box head"):
        build(tiny, model_config("retinanet_r18_shapes.py"), [{**roi_cls, "rois": True, "teacher": "bbox_head:0"}])
    # regression targets are made for the RPN (anchors) or the RoI head (proposals), not for another module
    with pytest.raises(kdhooks.ConfigError, match="regression targets are made for the student's rpn_head"):
        build(tiny, faster, [dict(kind="det_bounded_reg", student="rpn_head.rpn_reg", teacher="rpn_head.rpn_reg",
                                  calls="last")])
    # a detector default names the single-stage head: the error lists the two-stage ones
    with pytest.raises(kdhooks.ConfigError, match="'bbox_head' is not a module of the student(.|\\n)*rpn_head"):
        build(tiny, faster, [dict(kind="det_cls_kd")])


def with_masks(cfg, channels):
    """The Faster R-CNN config as a Mask R-CNN whose mask branch shares the box branch's RoI feature extractor."""
    cfg.type = "MaskRCNN"
    cfg.roi_head.mask_head = dict(type="FCNMaskHead", num_convs=1, in_channels=channels, conv_out_channels=channels,
                                  roi_feat_size=7, num_classes=2,
                                  loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))
    cfg.train_cfg.rcnn.mask_size = 14                        # 7x7 RoI features, upsampled once
    cfg.test_cfg.rcnn.mask_thr_binary = 0.5
    return cfg


def test_a_mask_rcnn_pair_distills_the_box_branch_on_the_sampled_proposals():
    """The shared RoI extractor runs twice a step (boxes, then the positives' masks): the box call's proposals."""
    model = build(with_masks(model_config("faster_rcnn_tiny_shapes.py"), 32),
                  with_masks(model_config("faster_rcnn_r18_shapes.py"), 64), CHEN_AND_WANG[1:2])
    student, teacher = model.student, model.teacher
    assert student.roi_head.share_roi_extractor
    recorded = Recorded(student)
    data = demo_mm_inputs(2, [[3, 64, 64], [3, 64, 48]], num_items=[3, 2], num_classes=2, with_mask=True)
    data = model.data_preprocessor(data, True)
    model.train()
    losses = model(**data, mode="loss")
    assert "loss_mask" in losses
    rois = bbox2roi([result.priors for result in recorded.sampling])
    with torch.no_grad():
        teacher_rois = teacher.roi_head._bbox_forward(teacher.extract_feat(data["inputs"]), rois)
    student_cls = recorded.outputs["roi_head.bbox_head"][0].detach()
    p_teacher = F.softmax(teacher_rois["cls_score"] / 2.0, dim=-1)
    expected = -(torch.tensor([1.0, 1.0, 1.5]) * p_teacher * F.log_softmax(student_cls / 2.0, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(losses["loss_kd_roi_cls"].detach(), expected, rtol=1e-5, atol=1e-6)
