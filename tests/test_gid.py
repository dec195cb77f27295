"""GID: instance selection on hand-built cases, each loss against an independent computation, the
assignment rules against torchvision, and full forwards on hand-made taps (0 / 1 / many instances)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.models.detection import FCOS

from detkd.config import ConfigError, from_dict
from detkd.distill import REGISTRY
from detkd.distill.gid import (
    GID,
    GIDOptions,
    dense_response_loss,
    fcos_assign,
    feature_loss,
    general_instances,
    relation_loss,
    retinanet_assign,
    roi_response_loss,
    select_roi,
)
from detkd.taps import Taps

# ----------------------------------------------------------------------------------------------------------
# General instance selection


def test_general_instances_hand_built():
    p = torch.tensor
    probs_t = p([[0.9, 0.1], [0.1, 0.2], [0.6, 0.5], [0.3, 0.2], [0.4, 0.4], [0.5, 0.0], [0.2, 0.4]])
    probs_s = p([[0.2, 0.1], [0.1, 0.8], [0.1, 0.5], [0.7, 0.2], [0.4, 0.4], [0.5, 0.3], [0.2, 0.75]])
    # scores 0.7 0.6 0.5 0.4 0.0 0.3 0.35; the more confident model's box is the GI box (tie: student)
    far = [50.0, 50.0, 60.0, 60.0]
    boxes_t = p([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11], far, far, [0, 0, 10, 10], far]).float()
    boxes_s = p([far, [20, 0, 30, 10], [40, 40, 50, 50], [6, 0, 16, 10], [70, 0, 80, 10], [0, 30, 10, 40],
                 [0, 4, 10, 14]]).float()
    boxes, scores = general_instances(probs_t, probs_s, boxes_t, boxes_s, nms_iou=0.3, top_k=10)
    # r0 teacher box; r1 student box; r2 teacher box overlaps r0 (IoU 0.68) -> suppressed; r6 student box
    # IoU 0.43 with r0 -> suppressed at 0.3; r3 student box IoU 0.25 -> kept; r4 score 0 -> dropped;
    # r5 tie -> student box, kept
    expected = p([[0, 0, 10, 10], [20, 0, 30, 10], [6, 0, 16, 10], [0, 30, 10, 40]]).float()
    torch.testing.assert_close(boxes, expected)
    torch.testing.assert_close(scores, p([0.7, 0.6, 0.4, 0.3]))

    boxes2, _ = general_instances(probs_t, probs_s, boxes_t, boxes_s, nms_iou=0.3, top_k=2)
    torch.testing.assert_close(boxes2, boxes[:2])
    # at NMS 0.5 the r6 box (IoU 0.43) survives
    boxes3, _ = general_instances(probs_t, probs_s, boxes_t, boxes_s, nms_iou=0.5, top_k=10)
    assert [0.0, 4.0, 10.0, 14.0] in boxes3.tolist()
    # clipping to the image (h=35, w=64) and no candidates at all
    boxes4, _ = general_instances(probs_t, probs_s, boxes_t, boxes_s, image_size=(35, 64))
    assert boxes4[-1].tolist() == [0.0, 30.0, 10.0, 35.0]
    empty, _ = general_instances(probs_t[:0], probs_s[:0], boxes_t[:0], boxes_s[:0])
    assert empty.shape == (0, 4)


def test_select_roi_decodes_the_confident_models_best_class():
    # one image, one RoI; the teacher is sure of class 2 and its class-2 deltas shift x by dx = 10 / 10 *
    # width / 10 ... (BoxCoder weights 10, 10, 5, 5: dx_code 1 -> 0.1 widths)
    roi = torch.tensor([[10.0, 10.0, 30.0, 20.0]])
    t_logits = torch.tensor([[0.0, 0.0, 5.0]])
    s_logits = torch.tensor([[0.0, 0.0, 0.0]])
    t_deltas = torch.zeros(1, 12)
    t_deltas[0, 8] = 1.0  # class 2, dx
    t_deltas[0, 4] = 7.0  # class 1 deltas must be ignored
    taps_t = SimpleNamespace(class_logits=t_logits, box_deltas=t_deltas)
    taps_s = SimpleNamespace(class_logits=s_logits, box_deltas=torch.zeros(1, 12), rois=[roi],
                             image_sizes=[(40, 40)])
    boxes = select_roi(taps_t, taps_s, GIDOptions())
    torch.testing.assert_close(boxes[0], torch.tensor([[12.0, 10.0, 32.0, 20.0]]))


# ----------------------------------------------------------------------------------------------------------
# Losses against numpy


def test_feature_loss_per_image_mean_of_l2_norms():
    torch.manual_seed(0)
    t = torch.randn(4, 2, 2, 2)
    s = torch.randn(4, 2, 2, 2)
    counts = [0, 1, 3]
    out = feature_loss(t, s, counts, batch_size=3)
    tn, sn = t.numpy().reshape(4, -1), s.numpy().reshape(4, -1)
    norms = [math.sqrt(sum((a - b) ** 2 for a, b in zip(tn[i], sn[i]))) for i in range(4)]
    ref = (0.0 + norms[0] + sum(norms[1:4]) / 3) / 3
    assert out.item() == pytest.approx(ref, rel=1e-5)


def np_relation(t, s):
    k = t.shape[0]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    dt = np.array([np.linalg.norm(t[i] - t[j]) for i, j in pairs])
    ds = np.array([np.linalg.norm(s[i] - s[j]) for i, j in pairs])
    x = ds / ds.mean() - dt / dt.mean()
    return np.mean(np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5))


def test_relation_loss_rkd_distance_within_images():
    torch.manual_seed(1)
    counts = [2, 4, 3]
    t = torch.randn(9, 6)
    s = torch.randn(9, 5, requires_grad=True)  # dimensions may differ
    out = relation_loss(t, s, counts, batch_size=3)
    tn, sn = t.double().numpy(), s.detach().double().numpy()
    ref = (0.0 + np_relation(tn[2:6], sn[2:6]) + np_relation(tn[6:9], sn[6:9])) / 3
    assert out.item() == pytest.approx(ref, rel=1e-5)
    out.backward()
    assert torch.all(s.grad[:2] == 0) and s.grad[2:].abs().sum() > 0  # 2 instances contribute nothing
    # scaling the student embedding changes nothing (distances are normalised by their mean)
    assert relation_loss(t, 3.0 * s.detach(), counts, 3).item() == pytest.approx(out.item(), rel=1e-4)


def test_dense_response_loss_binary_kl_and_l1():
    torch.manual_seed(2)
    t_cls, s_cls = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    t_reg, s_reg = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    cls, reg = dense_response_loss(t_cls, s_cls, t_reg, s_reg, mask)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    cls_ref = reg_ref = 0.0
    for n, a in [(0, 0), (0, 2), (1, 2)]:
        for c in (1, 2):  # column 0 is never positive and is left out
            pt, ps = sig(t_cls[n, a, c].item()), sig(s_cls[n, a, c].item())
            cls_ref += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
        reg_ref += sum(abs(s_reg[n, a, j].item() - t_reg[n, a, j].item()) for j in range(4))
    assert cls.item() == pytest.approx(cls_ref / 3, rel=1e-5)
    assert reg.item() == pytest.approx(reg_ref / 3, rel=1e-5)
    zero_c, zero_r = dense_response_loss(t_cls, s_cls, t_reg, s_reg, torch.zeros(2, 3, dtype=torch.bool))
    assert zero_c.item() == 0 and zero_r.item() == 0


def test_roi_response_loss_kl_and_teacher_class_deltas():
    torch.manual_seed(3)
    t_logits, s_logits = torch.randn(4, 3), torch.randn(4, 3)
    t_deltas, s_deltas = torch.randn(4, 12), torch.randn(4, 12)
    mask = torch.tensor([True, False, True, True])
    cls, reg = roi_response_loss(t_logits, s_logits, t_deltas, s_deltas, mask, temperature=2.0)
    cls_ref = reg_ref = 0.0
    for r in (0, 2, 3):
        pt = np.exp(t_logits[r].numpy() / 2) / np.exp(t_logits[r].numpy() / 2).sum()
        ps = np.exp(s_logits[r].numpy() / 2) / np.exp(s_logits[r].numpy() / 2).sum()
        cls_ref += 4.0 * float((pt * np.log(pt / ps)).sum())
        c = 1 + int(np.argmax(t_logits[r, 1:].numpy()))
        d = s_deltas[r, 4 * c:4 * c + 4].numpy() - t_deltas[r, 4 * c:4 * c + 4].numpy()
        beta = 1 / 9
        reg_ref += float(np.where(np.abs(d) < beta, 0.5 * d**2 / beta, np.abs(d) - 0.5 * beta).sum())
    assert cls.item() == pytest.approx(cls_ref / 3, rel=1e-5)
    assert reg.item() == pytest.approx(reg_ref / 3, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Assignment


def test_retinanet_assign_iou_and_low_quality():
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 20, 20], [30, 30, 40, 40], [100, 100, 110, 110]]).float()
    # IoU 0.69, 0.36, 0, 0
    assert retinanet_assign(anchors, torch.tensor([[0.0, 0.0, 12.0, 12.0]])).tolist() == [True] + [False] * 3
    # no anchor reaches 0.5: the best one (0.16) is kept, as torchvision's low-quality matches
    low = torch.tensor([[95.0, 95.0, 120.0, 120.0]])
    assert retinanet_assign(anchors, low).tolist() == [False] * 3 + [True]
    assert not retinanet_assign(anchors, torch.zeros(0, 4)).any()


def fcos_anchors(image=64, strides=(8, 16, 32)):
    out, counts = [], []
    for s in strides:
        n = image // s
        ys, xs = torch.meshgrid(torch.arange(n) * s, torch.arange(n) * s, indexing="ij")
        c = torch.stack([xs, ys], -1).reshape(-1, 2).float()
        out.append(torch.cat([c - s / 2, c + s / 2], dim=1))
        counts.append(n * n)
    return torch.cat(out), counts


def test_fcos_assign_matches_torchvision():
    torch.manual_seed(4)
    anchors, counts = fcos_anchors()
    xy = torch.rand(12, 2) * 48
    wh = torch.rand(12, 2) * 50 + 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    # torchvision's FCOS assigner, run through FCOS.compute_loss with a head that returns the matches
    head = SimpleNamespace(compute_loss=lambda targets, outputs, anchors, matched: matched)
    fake = SimpleNamespace(center_sampling_radius=1.5, head=head)
    matched = FCOS.compute_loss(fake, [{"boxes": boxes, "labels": torch.ones(12, dtype=torch.int64)}], {},
                                [anchors], counts)[0]
    ours = fcos_assign(anchors, counts, boxes)
    assert (matched >= 0).any()
    assert torch.equal(ours, matched >= 0)


# ----------------------------------------------------------------------------------------------------------
# Whole forwards on hand-made taps


def dense_taps(arch, features, cls, reg, image=64, strides=(8, 16)):
    anchors, counts = [], []
    for s in strides:
        n = image // s
        ys, xs = torch.meshgrid((torch.arange(n) + 0.5) * s, (torch.arange(n) + 0.5) * s, indexing="ij")
        c = torch.stack([xs, ys], -1).reshape(-1, 2)
        half = s if arch == "retinanet" else s / 2
        anchors.append(torch.cat([c - half, c + half], dim=1))
        counts.append(n * n)
    anchors = torch.cat(anchors)
    nimg = cls.shape[0]
    return Taps(arch=arch, features=features, level_names=["0", "1"], strides=list(strides),
                image_sizes=[(image, image)] * nimg, batch_shape=(image, image),
                targets=[{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * nimg,
                num_classes=cls.shape[2] - 1, anchors=[anchors] * nimg, num_anchors_per_level=counts,
                cls_logits=cls, bbox_regression=reg)


def dense_pair(arch, cs=3, ct=4):
    """Three images: identical predictions (no GI), one differing anchor (one GI), random (many)."""
    torch.manual_seed(5)
    a, c = 64 + 16, 4
    s_cls = torch.randn(3, a, c)
    t_cls = s_cls.clone()
    t_cls[1, 10, 2] = 6.0  # the teacher alone is sure at anchor 10 of image 1
    t_cls[2] = torch.randn(a, c)
    s_reg = torch.rand(3, a, 4) * 0.2
    t_reg = s_reg.clone()
    t_reg[2] = torch.rand(a, 4) * 0.2
    t_reg[1, 10] = 0.0
    if arch == "fcos":
        t_reg[1, 10] = 1.0  # FCOS codes: ltrb in anchor sizes
    s_cls.requires_grad_(True)
    s_reg.requires_grad_(True)
    t_cls.requires_grad_(True)
    t_reg.requires_grad_(True)
    s_feats = [torch.randn(3, cs, 8, 8, requires_grad=True), torch.randn(3, cs, 4, 4, requires_grad=True)]
    t_feats = [torch.randn(3, ct, 8, 8, requires_grad=True), torch.randn(3, ct, 4, 4, requires_grad=True)]
    return dense_taps(arch, t_feats, t_cls, t_reg), dense_taps(arch, s_feats, s_cls, s_reg)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_dense_forward_zero_one_many_instances_and_gradients(arch):
    teacher, student = dense_pair(arch)
    gid = GID(GIDOptions(), [4, 4], [3, 3], arch)
    assert gid.request().dense_outputs and not gid.request().roi_outputs
    gi = gid.select(teacher, student)
    assert [len(b) for b in gi] == [0, 1, 10]
    # the one GI is the teacher's decoded box at anchor 10: level 0 (stride 8), row 1, column 2, centre
    # (20, 12). RetinaNet: zero codes on the 16-px anchor; FCOS: ltrb codes 1 x the 8-px anchor size.
    torch.testing.assert_close(gi[1][0], torch.tensor([12.0, 4.0, 28.0, 20.0]))

    out = gid(teacher, student, teacher.targets)
    assert set(out) == {"gid_feat", "gid_relation", "gid_resp_cls", "gid_resp_reg"}
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
    sum(out.values()).backward()
    # boxes this small (< 448 px) all pool from the first level (k = floor(4 + log2(sqrt(wh) / 224)) <= 3)
    for t in [student.features[0], student.cls_logits, student.bbox_regression, gid.adapter.weight]:
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert student.features[1].grad is None
    # image 0 has no general instance: its head outputs get no gradient
    assert student.cls_logits.grad[0].abs().sum() == 0
    for t in [*teacher.features, teacher.cls_logits, teacher.bbox_regression]:
        assert t.grad is None


def test_dense_forward_without_any_instance_is_zero_and_keeps_the_adapter_in_the_graph():
    teacher, student = dense_pair("retinanet")
    teacher.cls_logits = student.cls_logits.detach().clone()
    teacher.bbox_regression = student.bbox_regression.detach().clone()
    gid = GID(GIDOptions(), [4, 4], [3, 3], "retinanet")
    out = gid(teacher, student, teacher.targets)
    assert all(v.item() == 0 for v in out.values())
    sum(out.values()).backward()
    assert gid.adapter.weight.grad is not None


def roi_pair():
    torch.manual_seed(6)
    rois = [torch.tensor([[4.0, 4.0, 30.0, 30.0], [6.0, 5.0, 31.0, 29.0], [40.0, 40.0, 60.0, 62.0],
                          [0.0, 30.0, 20.0, 60.0]]),
            torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 8.0, 50.0, 48.0]])]
    sizes = [16, 8, 4, 2, 1]

    def taps(channels, logits, deltas):
        feats = [torch.randn(2, channels, n, n, requires_grad=True) for n in sizes]
        return Taps(arch="faster_rcnn", features=feats, level_names=["0", "1", "2", "3", "pool"],
                    strides=[4, 8, 16, 32, 64], image_sizes=[(64, 64), (64, 64)], batch_shape=(64, 64),
                    targets=[{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2,
                    num_classes=2, rois=rois, class_logits=logits, box_deltas=deltas)

    s_logits = torch.randn(6, 3, requires_grad=True)
    t_logits = torch.randn(6, 3, requires_grad=True)
    s_deltas = (torch.randn(6, 12) * 0.1).requires_grad_(True)
    t_deltas = (torch.randn(6, 12) * 0.1).requires_grad_(True)
    return taps(4, t_logits, t_deltas), taps(3, s_logits, s_deltas)


def test_faster_rcnn_forward_and_gradients():
    teacher, student = roi_pair()
    gid = GID(GIDOptions(), [4] * 5, [3] * 5, "faster_rcnn")
    assert gid.request().roi_outputs
    gi = gid.select(teacher, student)
    assert 1 <= len(gi[0]) <= 4 and 1 <= len(gi[1]) <= 2
    out = gid(teacher, student, teacher.targets)
    assert all(torch.isfinite(v) for v in out.values())
    assert out["gid_resp_cls"] > 0 and out["gid_feat"] > 0
    sum(out.values()).backward()
    assert student.class_logits.grad.abs().sum() > 0 and student.box_deltas.grad.abs().sum() > 0
    assert sum(f.grad.abs().sum() for f in student.features[:4] if f.grad is not None) > 0
    assert student.features[4].grad is None  # RoIs never pool from the max-pooled 'pool' level
    for t in [*teacher.features, teacher.class_logits, teacher.box_deltas]:
        assert t.grad is None


def test_options_and_bad_taps():
    assert REGISTRY["gid"] is GID
    opts = from_dict(GIDOptions, {"top_k": 5, "relation_weight": 25}, "distill.options")
    assert (opts.top_k, opts.relation_weight, opts.feature_weight) == (5, 25.0, 5e-3)
    with pytest.raises(ConfigError, match=r"gid\.options\.top_k: must be >= 1, got 0"):
        GID(GIDOptions(top_k=0), [4], [4], "retinanet")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(GIDOptions, {"topk": 3}, "distill.options")
    teacher, student = dense_pair("retinanet")
    teacher.cls_logits = None
    with pytest.raises(ValueError, match="dense_outputs"):
        GID(GIDOptions(), [4, 4], [3, 3], "retinanet")(teacher, student, teacher.targets)
    teacher, student = dense_pair("retinanet")
    with pytest.raises(ValueError, match="built for fcos"):
        GID(GIDOptions(), [4, 4], [3, 3], "fcos")(teacher, student, teacher.targets)


# ----------------------------------------------------------------------------------------------------------
# One step with real (tiny, random) torchvision detectors


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_one_step_on_real_detectors(arch):
    from tests.engine_helpers import real_pair_taps

    student, teacher, gid, det_losses, t_taps, s_taps, tt = real_pair_taps(
        arch, 64, lambda t, s: GID(GIDOptions(), t, s, arch))
    gi = gid.select(t_taps, s_taps)
    assert all(1 <= len(b) <= 10 for b in gi)  # two random detectors disagree everywhere
    for b, (h, w) in zip(gi, s_taps.image_sizes):  # inside the un-padded image
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    out = gid(t_taps, s_taps, tt)
    assert all(torch.isfinite(v) for v in out.values()), out
    assert out["gid_feat"] > 0 and out["gid_resp_cls"] > 0
    (sum(det_losses.values()) + sum(out.values())).backward()
    assert gid.adapter.weight.grad.abs().sum() > 0
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
