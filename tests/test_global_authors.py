"""The authors' variant of the global method, term by term against their released code (DAVAR-Lab-ML, ECCV22:
the kd one-/two-stage strategies and kd_loss), on tiny hand cases.

Every expected value below is written from the authors' formula, not from detkd's code:

- mask: per level, the boxes whose level floor(log2(sqrt((w + 1)(h + 1)) / 56 + 1e-6)) (clamped to the
  maps) is that level; cells [int(x1 / s), int(x2 / s)) x [int(y1 / s), int(y2 / s)); box after box, a later
  box overwriting; a box with an empty column or row range writes max(cell, sigma) into (int(y1/s), int(x1/s)).
- point-wise loss per level: fg = sum (A(S) - T)^2 M / max(1, 2 C sum M), bg = sum (A(S) - T)^2 B /
  max(1, 2 C sum B), B = 1 - M' (M' = 1 where M > 0, else M); loss = 1 * mean_l fg + 4 * mean_l bg, decayed.
- sigma = 1 - |max_k cos(f^s, p^s_k) - max_k cos(f^t, p^t_k)|, f = mean of the crop int(x1/s) .. int(x2/s)
  (both included) for the mask and the pair loss, = mean of the 7x7 RoIAlign on the RoI-head level for the KL.
- pair loss: mean over instances and ALL prototypes of smoothL1(sigma cos_s, sigma cos_t), per level,
  summed over levels, weight 5, decayed.
- RoI-score KL: per positive RoI KL(softmax(z_t / T) || softmax(z_s / T)) averaged over the classes,
  times T^2, times sigma, averaged over the positive RoIs, weight 1, NOT decayed.
"""

from __future__ import annotations

import math

import torch

from detkd.distill import build_distiller
from detkd.distill.global_kd.prototypes import instance_features
from detkd.distill.global_kd.terms import (
    authors_decoupled_terms,
    cosine_all_terms,
    finest56_box_levels,
    ordered_box_mask,
)
from detkd.distill.kd import dense_kd
from detkd.engine.step import weigh_terms
from detkd.taps import Taps
from tests.test_global import bank_state, constant_taps

S2 = 1 / math.sqrt(2)  # sigma of a student (1, 1) against a teacher (1, 0) on the prototypes (1, 0), (0, 1)
EYE = torch.eye(2)

AUTHORS = {  # the options configs/*/*_global_authors.yaml set for the loss terms
    "normalize": True, "sigma": "cosine_max", "extraction": "crop_mean_inclusive", "feat_loss": "defeat",
    "adapter": "conv3x3", "kl_class_mean": True, "resp_rois": "positive", "a_resp": 1.0,
    "cell_range": "floor", "mask_rule": "overwrite", "feat_box_level": "finest_56",
    "sigma_inside_smooth_l1": True, "resp_sigma_from": "roi_align", "decay_resp": False,
}


# ----------------------------------------------------------------------------------------------------------
# The mask


def test_floor_cells_overwrite_and_single_cell_boxes():
    """4x4 map, stride 8, boxes in order:
    A (0, 0, 16, 16) 0.5: edges on stride multiples, cols/rows int(0)..int(2) -> 0, 1 (not 2)
    B (8, 8, 30, 24) 0.25: cols 1..int(3.75)=3 -> 1, 2; rows 1..3 -> 1, 2; overlaps A at (1, 1): overwrites
    C (25, 2, 30, 6) -0.3: cols int(3.125) = int(3.75) = 3: empty -> cell (0, 3) = max(0, -0.3) = 0
    D (9, 9, 12, 30) 0.1: cols 1..1 empty -> cell (1, 1) = max(0.25, 0.1) = 0.25
    E (24, 24, 32, 32) -0.5: col 3, row 3 -> -0.5 (sigma below zero is written as is)."""
    boxes = torch.tensor([[0.0, 0, 16, 16], [8, 8, 30, 24], [25, 2, 30, 6], [9, 9, 12, 30], [24, 24, 32, 32]])
    sig = torch.tensor([0.5, 0.25, -0.3, 0.1, -0.5])
    mask, cover = ordered_box_mask(boxes, sig, 4, 4, 8.0, "floor", "overwrite")
    want = torch.tensor([[0.5, 0.5, 0.0, 0.0],
                         [0.5, 0.25, 0.25, 0.0],
                         [0.0, 0.25, 0.25, 0.0],
                         [0.0, 0.0, 0.0, -0.5]])
    assert torch.equal(mask, want)
    assert int(cover.sum()) == 9 and bool(cover[0, 3])
    # the paper's rule on the same boxes: the largest sigma keeps (1, 1), the covering cells are more
    mask_max, _ = ordered_box_mask(boxes, sig, 4, 4, 8.0, "floor", "max")
    assert float(mask_max[1, 1]) == 0.5
    _, cover_cover = ordered_box_mask(boxes[1:2], sig[1:2], 4, 4, 8.0, "cover", "max")
    assert int(cover_cover.sum()) == 6  # B: cols 1..ceil(3.75)-1 = 1..3, rows 1..2 (floor: 4 cells)


def test_finest56_levels_cover_every_level():
    """sqrt((w + 1)(h + 1)) of 111 / 112 / 223 / 224 / 448 / 896 / 1001 -> 0 / 1 / 1 / 2 / 3 / 4 / 4 (5 maps),
    whatever the strides: the boundary sizes 56 * 2^k land on the upper level."""
    sides = [110.0, 111.0, 222.0, 223.0, 447.0, 895.0, 1000.0]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sides])
    assert finest56_box_levels(boxes, 5).tolist() == [0, 1, 1, 2, 3, 4, 4]
    assert finest56_box_levels(boxes, 2).tolist() == [0, 1, 1, 1, 1, 1, 1]


def test_inclusive_crop_takes_the_cell_after_an_edge_on_a_stride_multiple():
    """The authors' sigma crop: cells int(x1 / s) .. int(x2 / s), both included, clipped to the map. On a map
    whose value is the column index j (stride 8, 4 columns): box (8, 0, 16, 8) -> cols 1..2, mean 1.5 (the
    covering rule: col 1 only); (1, 0, 7, 7) -> col 0; (17, 0, 32, 8) -> cols 2..3 (int(4) = 4 is clipped)."""
    f = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    taps = Taps(arch="retinanet", features=[f], level_names=["0"], strides=[8], image_sizes=[(32, 32)],
                batch_shape=(32, 32), targets=[], num_classes=1)
    boxes = [torch.tensor([[8.0, 0.0, 16.0, 8.0], [1.0, 0.0, 7.0, 7.0], [17.0, 0.0, 32.0, 8.0]])]
    assert instance_features(taps, boxes, 0, "crop_mean_inclusive")[:, 0].tolist() == [1.5, 0.0, 2.5]
    assert instance_features(taps, boxes, 0, "crop_mean")[:, 0].tolist() == [1.0, 0.0, 2.5]


# ----------------------------------------------------------------------------------------------------------
# The point-wise feature loss


def test_decoupled_terms_hand_value_with_negative_sigma():
    """C = 2, one image, 2x2 cells. M = [[0.5, 0.75], [0, -0.5]], d2 = [[2, 4], [6, 10]] (summed over C).
    fg = (0.5*2 + 0.75*4 + 0*6 - 0.5*10) / max(1, 2*2*0.75) = -1 / 3
    B = 1 - [[1, 1], [0, -0.5]] = [[0, 0], [1, 1.5]]: bg = (6 + 15) / (2*2*2.5) = 2.1
    A non-positive sum M floors the denominator at 1: M = -0.5 everywhere -> fg = -0.5 * 22 / 1."""
    m = torch.tensor([[[0.5, 0.75], [0.0, -0.5]]])
    d2 = torch.tensor([[[2.0, 4.0], [6.0, 10.0]]])
    fg, bg = authors_decoupled_terms(d2, m, 2)
    assert math.isclose(float(fg), -1 / 3, rel_tol=1e-6) and math.isclose(float(bg), 2.1, rel_tol=1e-6)
    fg, bg = authors_decoupled_terms(d2, torch.full_like(m, -0.5), 2)
    assert math.isclose(float(fg), -11.0, rel_tol=1e-6)
    assert math.isclose(float(bg), 1.5 * 22 / (2 * 2 * 6), rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The pair (global) loss


def test_sigma_inside_smooth_l1_hand_values():
    """Teacher (1, 0), student (1, 1), prototypes (1, 0), (0, 1): cos_s = (S2, S2), cos_t = (1, 0), sigma S2.
    Authors: mean(sL1(S2 * S2 - S2 * 1), sL1(0.5 - 0)) = (0.5 * (0.5 - S2)^2 + 0.5 * 0.25) / 2 = 0.0732
    detkd's default: S2 * (0.5 * (S2 - 1)^2 + 0.5 * S2^2) / 2 = 0.1036. Sigma -1 on the student (-1, 0):
    sL1(-cos_s, -cos_t) = sL1(cos_s, cos_t): d = (-2, 0) -> (1.5 + 0) / 2 = 0.75 (positive; -0.75 outside)."""
    ft, fs, s = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([S2])
    inside = (0.5 * (0.5 - S2) ** 2 + 0.5 * 0.25) / 2
    outside = S2 * (0.5 * (S2 - 1) ** 2 + 0.5 * S2**2) / 2
    assert math.isclose(float(cosine_all_terms(ft, fs, EYE, EYE, s, sigma_inside=True)), inside, rel_tol=1e-6)
    assert math.isclose(float(cosine_all_terms(ft, fs, EYE, EYE, s)), outside, rel_tol=1e-6)
    assert round(inside, 3) == 0.073 and round(outside, 3) == 0.104
    neg = torch.tensor([[-1.0, 0.0]])
    assert math.isclose(float(cosine_all_terms(ft, neg, EYE, EYE, torch.tensor([-1.0]), True)), 0.75, rel_tol=1e-6)
    assert math.isclose(float(cosine_all_terms(ft, neg, EYE, EYE, torch.tensor([-1.0]))), -0.75, rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The RoI-score KL


def kl_uniform_student() -> float:
    """KL(softmax([0, 2 ln 3, 0, 0] / 2) || uniform) * T^2 / 4 classes = sum p ln(4 p), p = (1, 3, 1, 1) / 6."""
    p = [1 / 6, 3 / 6, 1 / 6, 1 / 6]
    return sum(q * math.log(4 * q) for q in p) * 4 / 4


def test_roi_kl_sigma_from_roi_align_hand_value():
    """One 8x8 level, stride 8. Teacher map (1, 0); student map (1, j) at column j. Positive RoI (8, 8, 36, 36)
    of class 1, prototypes (1, 0), (0, 1) in both spaces.
    RoIAlign (aligned False) of a map linear in x averages to the RoI's centre: j = (8 + 36) / 2 / 8 = 2.75,
    sigma = 1 - |2.75 / sqrt(1 + 2.75^2) - 1|; the authors' crop (cols 1..4) would give j = 2.5.
    KL at T = 2 with class mean, times sigma, over the 1 positive RoI (the negative is left out), weight 1."""
    d = build_distiller("global", {**AUTHORS, "use_global": False, "use_feat": False,
                                   "instances": "positive_proposals"}, [2], [2], "faster_rcnn")
    d.set_extra_state(bank_state({(0, 1): (EYE, EYE)}))
    teacher = constant_taps("faster_rcnn", [[1.0, 0.0]], [[]], [[]], size=64)
    student = constant_taps("faster_rcnn", [[1.0, 0.0]], [[]], [[]], size=64)
    student.features[0][0, 1] = torch.arange(8.0).view(1, 8).expand(8, 8)
    student.rois = [torch.tensor([[8.0, 8.0, 36.0, 36.0], [0.0, 0.0, 8.0, 8.0]])]
    student.roi_labels = [torch.tensor([1, 0])]
    teacher.class_logits = torch.tensor([[0.0, 2 * math.log(3.0), 0.0, 0.0]] * 2)
    student.class_logits = torch.zeros(2, 4, requires_grad=True)
    out = d(teacher, student, student.targets)
    assert set(out) == {"loss_local_resp"} and d.undecayed == frozenset({"loss_local_resp"})
    sigma_roi = 1 - abs(2.75 / math.sqrt(1 + 2.75**2) - 1)
    assert math.isclose(out["loss_local_resp"].item(), sigma_roi * kl_uniform_student(), rel_tol=1e-5)
    d.opts.resp_sigma_from = "instance"  # the crop sigma on the canonical level instead
    sigma_crop = 1 - abs(2.5 / math.sqrt(1 + 2.5**2) - 1)
    out = d(teacher, student, student.targets)
    assert math.isclose(out["loss_local_resp"].item(), sigma_crop * kl_uniform_student(), rel_tol=1e-5)


def test_one_stage_softmax_kl_hand_value():
    """RetinaNet logits (column 0 unused): the positive anchor's classes 1..3 softmax at T = 2: teacher
    (2 ln 3, 0, 0) / 2 -> (3, 1, 1) / 5, student uniform: KL = sum p ln(3 p), times 4, / 3 classes, sigma 0.5."""
    teacher = constant_taps("retinanet", [[1.0, 0.0]], [[[0.0, 0.0, 8.0, 8.0]]], [[1]])
    student = constant_taps("retinanet", [[1.0, 0.0]], [[[0.0, 0.0, 8.0, 8.0]]], [[1]])
    teacher.cls_logits = torch.zeros(1, 2, 4)
    teacher.cls_logits[0, 0, 1] = 2 * math.log(3.0)
    student.cls_logits = torch.zeros(1, 2, 4)
    student.matched_idxs = [torch.tensor([0, -1])]
    w = torch.tensor([[0.5, 1.0]])
    got = dense_kd(teacher, student, 2.0, "positive", "mean", weights=w, kl="softmax")
    p = [0.6, 0.2, 0.2]
    assert math.isclose(float(got), 0.5 * sum(q * math.log(3 * q) for q in p) * 4 / 3, rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The assembled variant


def two_level_taps(vecs: list[list[float]], size: int = 128) -> Taps:
    """Faster R-CNN taps with two levels (strides 16, 32), each image's maps the constant ``vecs[i]``."""
    maps = []
    for stride in (16, 32):
        h = size // stride
        maps.append(torch.stack([torch.tensor(v).view(-1, 1, 1).expand(-1, h, h) for v in vecs]).clone())
    return Taps(arch="faster_rcnn", features=maps, level_names=["0", "1"], strides=[16, 32],
                image_sizes=[(size, size)] * len(vecs), batch_shape=(size, size),
                targets=[{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}] * len(vecs),
                num_classes=2)


def test_assembled_authors_variant_equals_the_sum_of_its_hand_terms():
    """Two images, two levels (128 px; strides 16 -> 8x8, 32 -> 4x4), instances = positive RoIs.
    Image 0 (teacher (1, 0), student (1, 1), class 1, prototypes (1, 0), (0, 1)): sigma S2 on both levels;
    image 1 (teacher (1, 0), student (-1, 0), class 2, prototype (1, 0) in both spaces): sigma 1 - |-1 - 1| = -1.
    Boxes (finest-56 level, floor cells):
      img 0: b1 (8, 8, 40, 40) level 0, cols/rows 0..1 (4 cells); b2 (32, 32, 64, 48) level 0, edges on
             stride multiples: cols 2..3, row 2 (2 cells); b3 (0, 0, 120, 120) sqrt(121^2) -> level 1,
             cols/rows 0..2 of the 4x4 map (9 cells)
      img 1: b4 (16, 16, 48, 40) level 0, cols 1..2, row 1; b5 (40, 16, 56, 50) overlaps it: col 2, rows 1..2
             -> 3 cells of -1
    Identity adapter: d2 = 1 in image 0, 4 in image 1; C = 2.
    """
    d = build_distiller("global", {**AUTHORS, "use_global": True, "global_loss": "cosine_all", "a_global": 5.0,
                                   "instances": "positive_proposals"}, [2, 2], [2, 2], "faster_rcnn")
    p1 = (EYE, EYE)
    p2 = (EYE[:1], EYE[:1])
    d.set_extra_state(bank_state({(0, 1): p1, (1, 1): p1, (0, 2): p2, (1, 2): p2}, levels=2))
    for seq in d.adapters:  # A(S) = S: the centre tap of the 3x3 convolution is the identity
        with torch.no_grad():
            seq[0].weight.zero_()
            seq[0].weight[:, :, 1, 1] = EYE
            seq[0].bias.zero_()
    teacher = two_level_taps([[1.0, 0.0], [1.0, 0.0]])
    student = two_level_taps([[1.0, 1.0], [-1.0, 0.0]])
    student.rois = [torch.tensor([[8.0, 8, 40, 40], [32, 32, 64, 48], [0, 0, 120, 120], [60, 60, 70, 70]]),
                    torch.tensor([[16.0, 16, 48, 40], [40, 16, 56, 50], [0, 100, 10, 110]])]
    student.roi_labels = [torch.tensor([1, 1, 1, 0]), torch.tensor([2, 2, 0])]
    teacher.class_logits = torch.tensor([[0.0, 2 * math.log(3.0), 0.0]] * 7)
    student.class_logits = torch.zeros(7, 3, requires_grad=True)
    out = d(teacher, student, student.targets)

    # pair loss, per level (all 5 instances on both levels), prototypes of all classes (1,0), (0,1), (1,0):
    # img 0: S2 cos_s = (.5, .5, .5), S2 cos_t = (S2, 0, S2); img 1: -cos_s = (1, 0, 1), -cos_t = (-1, 0, -1)
    row0 = (2 * 0.5 * (0.5 - S2) ** 2 + 0.5 * 0.25) / 3
    row1 = (1.5 + 0.0 + 1.5) / 3
    pair = 5.0 * 2 * (3 * row0 + 2 * row1) / 5

    # point-wise loss, level 0: img 0 six cells of S2 (d2 1), img 1 three cells of -1 (d2 4)
    fg0 = (6 * S2 * 1 + 3 * -1 * 4) / max(1.0, 2 * 2 * (6 * S2 - 3))
    bg0 = (58 * 1 * 1 + (61 * 1 + 3 * 2) * 4) / (2 * 2 * (58 + 61 + 3 * 2))
    # level 1: img 0 nine cells of S2 of 16, img 1 none
    fg1 = (9 * S2 * 1) / max(1.0, 2 * 2 * 9 * S2)
    bg1 = (7 * 1 + 16 * 4) / (2 * 2 * (7 + 16))
    feat = 1.0 * (fg0 + fg1) / 2 + 4.0 * (bg0 + bg1) / 2

    # KL: p = softmax((0, 2 ln 3, 0) / 2) = (1, 3, 1) / 5 against uniform, class mean, T^2 = 4; RoI sigma from
    # RoIAlign of constant maps = the image's sigma; mean over the 5 positive RoIs
    p = [0.2, 0.6, 0.2]
    kl = sum(q * math.log(3 * q) for q in p) * 4 / 3
    resp = (3 * S2 + 2 * -1) * kl / 5

    assert math.isclose(out["loss_global"].item(), pair, rel_tol=1e-5)
    assert math.isclose(out["loss_local_feat"].item(), feat, rel_tol=1e-5)
    assert math.isclose(out["loss_local_resp"].item(), resp, rel_tol=1e-5)
    d.opts.feat_level_reduce = "sum"  # the authors' one-stage code sums the levels' terms instead
    summed = d(teacher, student, student.targets)["loss_local_feat"].item()
    assert math.isclose(summed, 1.0 * (fg0 + fg1) + 4.0 * (bg0 + bg1), rel_tol=1e-5)
    # the engine's decay (epoch 1 of 4: 0.75) scales the feature and pair terms, not the KL
    total = sum(weigh_terms([out], [d], [1.0], [{}], 0.75).values())
    assert math.isclose(float(total.detach()), 0.75 * (pair + feat) + resp, rel_tol=1e-5)
