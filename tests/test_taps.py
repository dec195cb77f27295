"""detkd.taps: the taps reproduce torchvision exactly, the teacher stays frozen, boxes pool right."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detkd.config import ModelConfig
from detkd.models import build_detector
from detkd.taps import (
    TapRequest,
    Taps,
    box_levels,
    fcos_matched_idxs,
    pool_boxes,
    tap_student,
    tap_teacher,
    transform_batch,
)

# one intra-op thread: on a small shared CPU, two OpenMP threads make these tiny models ~10x slower
torch.set_num_threads(1)

ARCHS = ["faster_rcnn", "retinanet", "fcos"]


def tiny(arch: str, **kw) -> ModelConfig:
    base = dict(
        arch=arch, backbone="resnet18", num_classes=3, fpn_channels=32, min_size=64, max_size=96,
        box_batch_size_per_image=64, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, trainable_layers=3,
    )
    base.update(kw)
    return ModelConfig(**base)


def batch():
    """Two uint8 64x96 images (as the data set gives them): three boxes, and no box at all."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 64, 96), generator=g, dtype=torch.uint8) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 34.0], [50.0, 10.0, 90.0, 60.0], [20.0, 20.0, 30.0, 28.0]]),
         "labels": torch.tensor([1, 3, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def student_and_batch(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_detector(tiny(arch, **kw))
    model.train()
    images, targets = batch()
    image_list, tt = transform_batch(model, images, targets)
    return model, images, targets, image_list, tt


# ----------------------------------------------------------------------------------------------------------
# transform_batch


def test_transform_batch_converts_uint8_and_checks_targets():
    model, images, targets, image_list, tt = student_and_batch("retinanet")
    assert image_list.tensors.dtype == torch.float32 and image_list.image_sizes == [(64, 96), (64, 96)]
    ref, _ = model.transform([im.float() / 255 for im in images], None)
    assert torch.equal(image_list.tensors, ref.tensors)
    assert torch.equal(tt[0]["boxes"], targets[0]["boxes"]) and set(tt[0]) == {"boxes", "labels"}

    ignored = [{**targets[0], "ignore": torch.tensor([False, True, False])}]
    _, t2 = transform_batch(model, images[:1], ignored)
    assert t2[0]["labels"].tolist() == [1, 2]
    boxes = targets[0]["boxes"]
    with pytest.raises(ValueError, match="target 0 has labels"):
        transform_batch(model, images[:1], [{"boxes": boxes, "labels": torch.tensor([0, 1, 2])}])
    with pytest.raises(ValueError, match="expected 1..3"):
        transform_batch(model, images[:1], [{"boxes": boxes, "labels": torch.tensor([1, 4, 2])}])
    with pytest.raises(ValueError, match="no area"):
        transform_batch(model, images[:1], [{"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]),
                                             "labels": torch.tensor([1])}])


# ----------------------------------------------------------------------------------------------------------
# The student taps do not change the detector


@pytest.mark.parametrize("arch", ARCHS)
def test_student_losses_equal_torchvision_forward(arch):
    model, images, targets, _, _ = student_and_batch(arch)
    floats = [im.float() / 255 for im in images]
    torch.manual_seed(7)  # Faster R-CNN samples anchors and RoIs at random: same seed, same samples
    expected = model(floats, targets)
    torch.manual_seed(7)
    image_list, tt = transform_batch(model, images, targets)
    losses, taps = tap_student(model, image_list, tt)
    assert list(losses) == list(expected)
    for k in expected:
        assert torch.equal(losses[k], expected[k]), k
    assert all(v.requires_grad for v in losses.values())

    n, c = 2, 3 + 1
    assert taps.arch == arch and taps.num_classes == 3
    assert taps.image_sizes == [(64, 96), (64, 96)] and taps.batch_shape == (64, 96)
    assert len(taps.features) == len(taps.level_names) == len(taps.strides) == 5
    if arch == "faster_rcnn":
        assert taps.strides == [4, 8, 16, 32, 64]
        r = [b.shape[0] for b in taps.rois]
        assert all(0 < x <= 64 for x in r)
        assert taps.class_logits.shape == (sum(r), c) and taps.box_deltas.shape == (sum(r), 4 * c)
        assert taps.roi_features.shape == (sum(r), 32, 7, 7) and taps.roi_embeddings.shape == (sum(r), 1024)
        assert [x.shape[0] for x in taps.roi_labels] == r == [x.shape[0] for x in taps.roi_matched_gt]
        assert [x.shape for x in taps.roi_regression_targets] == [(x, 4) for x in r]
        assert (taps.roi_labels[0] > 0).any() and (taps.roi_labels[1] == 0).all()  # the empty image: all bg
        pos = taps.roi_labels[0] > 0
        gt_labels = tt[0]["labels"][taps.roi_matched_gt[0][pos]]
        assert torch.equal(gt_labels, taps.roi_labels[0][pos])
        assert len(taps.proposals) == 2
        # the RPN anchors: 3 ratios per location on every level, as model.rpn computes them
        rpn_anchors = model.rpn.anchor_generator(image_list, taps.features)
        assert all(torch.equal(a, b) for a, b in zip(taps.anchors, rpn_anchors))
        assert taps.num_anchors_per_level == [f.shape[-2] * f.shape[-1] * 3 for f in taps.features]
    else:
        assert taps.strides == [8, 16, 32, 64, 128]
        a = taps.anchors[0].shape[0]
        assert sum(taps.num_anchors_per_level) == a
        assert taps.cls_logits.shape == (n, a, c) and taps.bbox_regression.shape == (n, a, 4)
        assert (taps.bbox_ctrness is not None) == (arch == "fcos")
        assert [m.shape for m in taps.matched_idxs] == [(a,), (a,)]
        assert (taps.matched_idxs[0] >= 0).any() and (taps.matched_idxs[1] == -1).all()
        assert taps.rois is None


def test_student_needs_training_mode():
    model, _, _, image_list, tt = student_and_batch("fcos")
    model.eval()
    with pytest.raises(ValueError, match="model.train"):
        tap_student(model, image_list, tt)


def test_fcos_matching_reproduces_torchvision_loss():
    """Overlapping boxes of several scales: the smallest-area and scale-range rules decide."""
    torch.manual_seed(0)
    model = build_detector(tiny("fcos", min_size=128, max_size=128))
    model.train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 120.0, 110.0], [10.0, 10.0, 50.0, 60.0], [14.0, 14.0, 30.0, 26.0],
                                [60.0, 70.0, 100.0, 90.0]]), "labels": torch.tensor([1, 2, 3, 1])},
        {"boxes": torch.tensor([[30.0, 30.0, 95.0, 100.0]]), "labels": torch.tensor([2])},
    ]
    image_list, tt = model.transform(images, targets)
    feats = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(feats)
    anchors = model.anchor_generator(image_list, feats)
    per_level = [f.shape[-2] * f.shape[-1] for f in feats]

    expected = model.compute_loss(tt, head_outputs, anchors, per_level)  # torchvision's inline matching
    matched = fcos_matched_idxs(model, anchors, tt, per_level)
    got = model.head.compute_loss(tt, head_outputs, anchors, matched)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # the case is not trivial: every box of image 0 owns some locations
    assert set(matched[0][matched[0] >= 0].tolist()) == {0, 1, 2, 3}

    # and a perturbed assignment gives a different loss (the comparison can fail)
    wrong = [m.clone() for m in matched]
    wrong[0][wrong[0] == 2] = 1
    assert not torch.equal(model.head.compute_loss(tt, head_outputs, anchors, wrong)["bbox_regression"],
                           expected["bbox_regression"])


# ----------------------------------------------------------------------------------------------------------
# Teacher


def test_teacher_features_and_proposals_equal_eval_mode_torchvision():
    _, _, _, image_list, tt = student_and_batch("faster_rcnn")
    torch.manual_seed(1)
    teacher = build_detector(tiny("faster_rcnn", fpn_channels=64, backbone="resnet34", norm="bn"))
    teacher.train()  # left in training mode on purpose: the taps must still use eval semantics
    teacher.rpn.eval()  # a submodule in its own mode: restored as it was
    bn = teacher.backbone.body.bn1
    stats = bn.running_mean.clone()

    taps = tap_teacher(teacher, image_list, tt, TapRequest(proposals=True))
    assert teacher.training and not teacher.rpn.training and teacher.backbone.training
    assert torch.equal(bn.running_mean, stats)  # eval mode: BatchNorm statistics untouched

    teacher.eval()
    with torch.no_grad():
        feats = teacher.backbone(image_list.tensors)
        proposals, _ = teacher.rpn(image_list, feats)
    assert taps.level_names == list(feats)
    for a, b in zip(taps.features, feats.values()):
        assert torch.equal(a, b) and not a.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(taps.proposals, proposals))
    assert all(p.shape[0] <= 100 for p in taps.proposals)  # the eval-mode (test) top-n
    assert taps.class_logits is None and taps.rois is None  # not requested


def test_teacher_roi_outputs_on_student_rois():
    student, _, _, image_list, tt = student_and_batch("faster_rcnn")
    _, s_taps = tap_student(student, image_list, tt)
    torch.manual_seed(2)
    teacher = build_detector(tiny("faster_rcnn", fpn_channels=64)).eval()
    t_taps = tap_teacher(teacher, image_list, tt, TapRequest(roi_outputs=True), s_taps)

    with torch.no_grad():
        feats = teacher.backbone(image_list.tensors)
        pooled = teacher.roi_heads.box_roi_pool(feats, s_taps.rois, image_list.image_sizes)
        emb = teacher.roi_heads.box_head(pooled)
        logits, deltas = teacher.roi_heads.box_predictor(emb)
    assert torch.equal(t_taps.class_logits, logits) and torch.equal(t_taps.box_deltas, deltas)
    assert torch.equal(t_taps.roi_features, pooled) and t_taps.roi_features.shape[1] == 64
    assert t_taps.class_logits.shape == s_taps.class_logits.shape
    assert t_taps.roi_labels is s_taps.roi_labels and t_taps.roi_matched_gt is s_taps.roi_matched_gt
    assert all(torch.equal(a, b) for a, b in zip(t_taps.rois, s_taps.rois))
    assert not t_taps.class_logits.requires_grad


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_teacher_dense_outputs_share_anchors(arch):
    student, _, _, image_list, tt = student_and_batch(arch)
    _, s_taps = tap_student(student, image_list, tt)
    torch.manual_seed(3)
    teacher = build_detector(tiny(arch, fpn_channels=64, backbone="resnet34")).eval()
    t_taps = tap_teacher(teacher, image_list, tt, TapRequest(dense_outputs=True), s_taps)
    assert all(torch.equal(a, b) for a, b in zip(t_taps.anchors, s_taps.anchors))
    assert all(torch.equal(a, b) for a, b in zip(t_taps.matched_idxs, s_taps.matched_idxs))
    assert t_taps.cls_logits.shape == s_taps.cls_logits.shape and not t_taps.cls_logits.requires_grad
    with torch.no_grad():
        out = teacher.head(list(teacher.backbone(image_list.tensors).values()))
    assert torch.equal(t_taps.cls_logits, out["cls_logits"])
    assert torch.equal(t_taps.bbox_regression, out["bbox_regression"])
    if arch == "fcos":
        assert torch.equal(t_taps.bbox_ctrness, out["bbox_ctrness"])


def test_teacher_gets_no_gradient():
    student, _, _, image_list, tt = student_and_batch("faster_rcnn")
    teacher = build_detector(tiny("faster_rcnn", trainable_layers=5, norm="bn")).eval()
    losses, s_taps = tap_student(student, image_list, tt)
    t_taps = tap_teacher(teacher, image_list, tt, TapRequest(roi_outputs=True), s_taps)
    p_t = F.softmax(t_taps.class_logits, 1)
    kd = F.kl_div(F.log_softmax(s_taps.class_logits, 1), p_t, reduction="batchmean")
    feat = sum(F.mse_loss(s, t) for s, t in zip(s_taps.features, t_taps.features))
    (sum(losses.values()) + kd + feat).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone.body.layer4[0].conv1.weight.grad is not None
    assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_teacher_request_errors():
    _, _, _, image_list, tt = student_and_batch("retinanet")
    retina = build_detector(tiny("retinanet")).eval()
    with pytest.raises(ValueError, match="roi_outputs.*retinanet teacher"):
        tap_teacher(retina, image_list, tt, TapRequest(roi_outputs=True), None)
    with pytest.raises(ValueError, match="proposals"):
        tap_teacher(retina, image_list, tt, TapRequest(proposals=True), None)
    frcnn = build_detector(tiny("faster_rcnn")).eval()
    with pytest.raises(ValueError, match="dense_outputs"):
        tap_teacher(frcnn, image_list, tt, TapRequest(dense_outputs=True), None)
    with pytest.raises(ValueError, match="student's sampled RoIs"):
        tap_teacher(frcnn, image_list, tt, TapRequest(roi_outputs=True), None)
    # features only: any family works, and nothing else is filled
    taps = tap_teacher(retina, image_list, tt, TapRequest(), None)
    assert len(taps.features) == 5 and taps.cls_logits is None


# ----------------------------------------------------------------------------------------------------------
# pool_boxes


def test_box_levels_hand_checked():
    boxes = torch.tensor([
        [0.0, 0.0, 224.0, 224.0],  # k = 4 (canonical)
        [0.0, 0.0, 112.0, 112.0],  # 4 + log2(1/2) = 3
        [0.0, 0.0, 448.0, 448.0],  # 5
        [0.0, 0.0, 223.0, 223.0],  # just under 224: floor(3.99) = 3
        [0.0, 0.0, 8.0, 8.0],  # 4 + log2(8/224) = -0.8 -> clamped to the first level
        [0.0, 0.0, 2000.0, 2000.0],  # 7.2 -> clamped to the last
    ])
    # Faster R-CNN pooling levels P2..P5: index = k - 2
    assert box_levels(boxes, num_levels=4, first_level=2).tolist() == [2, 1, 3, 1, 0, 3]
    # one-stage P3..P7: index = k - 3
    assert box_levels(boxes, num_levels=5, first_level=3).tolist() == [1, 0, 2, 0, 0, 4]


def _level_taps(level_names, strides, side=128):
    """A Taps whose level i is the constant i + 1, so a pooled value tells the level used."""
    feats = [torch.full((2, 3, side // s, side // s), float(i + 1)) for i, s in enumerate(strides)]
    return Taps(arch="x", features=feats, level_names=level_names, strides=strides,
                image_sizes=[(side, side)] * 2, batch_shape=(side, side), targets=[], num_classes=1)


def test_pool_boxes_levels_and_shapes():
    taps = _level_taps(["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64], side=512)
    boxes = [torch.tensor([[0.0, 0.0, 224.0, 224.0], [10.0, 10.0, 30.0, 30.0]]),
             torch.tensor([[0.0, 0.0, 500.0, 500.0]])]
    out = pool_boxes(taps, boxes, output_size=5)
    assert out.shape == (3, 3, 5, 5)
    # 224 -> P4 (value 3); 20 px -> P2 (value 1); 500 -> P5 (value 4), never the "pool" level (5)
    assert out[:, 0, 2, 2].tolist() == [3.0, 1.0, 4.0]

    one_stage = _level_taps(["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128], side=512)
    out = pool_boxes(one_stage, boxes)
    assert out[:, 0, 3, 3].tolist() == [2.0, 1.0, 3.0]  # P4, P3 (clamped), P5
    forced = pool_boxes(one_stage, boxes, levels=[torch.tensor([4, 3]), torch.tensor([0])])
    assert forced[:, 0, 3, 3].tolist() == [5.0, 4.0, 1.0]

    empty = pool_boxes(taps, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert empty.shape == (0, 3, 7, 7)
    mixed = pool_boxes(taps, [torch.zeros(0, 4), boxes[1]])
    assert mixed.shape == (1, 3, 7, 7) and mixed[0, 0, 0, 0] == 4.0


def test_pool_boxes_matches_torchvision_roi_pool():
    student, _, _, image_list, tt = student_and_batch("faster_rcnn")
    _, taps = tap_student(student, image_list, tt)
    ours = pool_boxes(taps, taps.rois)
    assert torch.allclose(ours, taps.roi_features, atol=1e-6)
