"""detkd.evaluation: COCO metrics (faster-coco-eval) and VOC AP50, on hand-computable cases."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from detkd.evaluation import (
    METRIC_KEYS,
    coco_metrics,
    evaluate,
    format_metrics,
    outputs_to_detections,
    voc_ap50,
)
from detkd.evaluation.inputs import check_coco_gt, check_detections
from detkd.evaluation.voc import match_detections, precision_recall


def make_gt(boxes_per_image: dict[int, list[tuple]], num_classes: int = 1) -> dict:
    """COCO dict from {image_id: [(category_id, [x, y, w, h], iscrowd), ...]}; no 'area' / 'id' on purpose."""
    images = [{"id": i, "height": 200, "width": 200} for i in sorted(boxes_per_image)]
    anns = [
        {"image_id": i, "category_id": c, "bbox": list(b), "iscrowd": crowd}
        for i, objs in sorted(boxes_per_image.items())
        for c, b, crowd in objs
    ]
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    return {"images": images, "annotations": anns, "categories": cats}


def det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


# ----------------------------------------------------------------------------------------------------------
# (a) perfect detections


def test_perfect_detections_score_one_everywhere():
    # small (8*8 < 32^2), medium (50*40) and large (120*110 > 96^2) objects of two classes
    gt = make_gt(
        {
            1: [(1, [10, 10, 8, 8], 0), (2, [40, 40, 50, 40], 0)],
            2: [(1, [5, 5, 120, 110], 0), (2, [150, 150, 8, 8], 0), (1, [150, 10, 30, 30], 0)],
        },
        num_classes=2,
    )
    dets = [det(a["image_id"], a["category_id"], a["bbox"], 0.9 - 0.1 * k) for k, a in enumerate(gt["annotations"])]
    m = evaluate(gt, dets)
    assert set(m) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        if key != "AR1":
            assert m[key] == pytest.approx(1.0, abs=1e-12), key
    # AR1 keeps one detection per image and class: image 2 has two class-1 boxes, so class 1 recalls 2 of 3
    # and class 2 recalls 2 of 2 -> AR1 = (2/3 + 1) / 2 = 5/6.
    assert m["AR1"] == pytest.approx(5 / 6, abs=1e-12)
    assert voc_ap50(gt, dets, use_07_metric=True)["per_class"] == {1: 1.0, 2: 1.0}


def test_iou_between_thresholds_gives_known_map():
    # IoU = (100 * 72) / (100 * 100) = 0.72: a TP at IoU 0.50 .. 0.70 (5 of the 10 thresholds), FP above.
    gt = make_gt({1: [(1, [0, 0, 100, 100], 0)]})
    m = evaluate(gt, [det(1, 1, [0, 0, 100, 72], 0.9)])
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["mAP"] == pytest.approx(0.5)
    assert m["APl"] == pytest.approx(0.5) and m["APs"] == -1 and m["APm"] == -1  # area 10000 >= 96^2
    assert m["VOC07_AP50"] == pytest.approx(1.0) and m["VOC_AP50"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------
# (b) one class, 2 ground-truth boxes, 3 detections: the PR curve by hand

GT_B = make_gt({1: [(1, [0, 0, 20, 20], 0), (1, [100, 100, 20, 20], 0)]})
DETS_B = [
    det(1, 1, [0, 0, 20, 20], 0.9),  # TP on box A
    det(1, 1, [50, 50, 20, 20], 0.8),  # FP: overlaps nothing
    det(1, 1, [100, 100, 20, 20], 0.7),  # TP on box B
]


def test_hand_computed_precision_recall_and_voc_aps():
    # ranked: TP, FP, TP with npos = 2
    #   after d1: tp=1 fp=0 -> recall 1/2, precision 1/1
    #   after d2: tp=1 fp=1 -> recall 1/2, precision 1/2
    #   after d3: tp=2 fp=1 -> recall 2/2, precision 2/3
    gt = check_coco_gt(GT_B)
    dets = check_detections(DETS_B, gt)
    outcome = match_detections(gt, dets)
    assert outcome.tolist() == [1, 0, 1]
    recall, precision = precision_recall(gt, dets, outcome)[1]
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])

    # interpolated precision p(r) = max precision at recall >= r: 1 for r <= 0.5, 2/3 for 0.5 < r <= 1
    # VOC07: r = 0.0 .. 0.5 (6 points) -> 1, r = 0.6 .. 1.0 (5 points) -> 2/3
    #        AP = (6 * 1 + 5 * 2/3) / 11 = (28/3) / 11 = 28/33
    # area:  AP = 0.5 * 1 + 0.5 * 2/3 = 5/6
    voc07 = voc_ap50(GT_B, DETS_B, use_07_metric=True)
    voc = voc_ap50(GT_B, DETS_B, use_07_metric=False)
    assert voc07["mAP"] == pytest.approx(28 / 33, abs=1e-12)
    assert voc["mAP"] == pytest.approx(5 / 6, abs=1e-12)
    assert voc07["per_class"] == {1: pytest.approx(28 / 33, abs=1e-12)}
    assert voc["per_class"] == {1: pytest.approx(5 / 6, abs=1e-12)}

    # score order, not list order, decides: the same detections shuffled give the same APs
    shuffled = [DETS_B[2], DETS_B[0], DETS_B[1]]
    assert voc_ap50(GT_B, shuffled, use_07_metric=True)["mAP"] == pytest.approx(28 / 33, abs=1e-12)


def test_coco_max_detections_per_image():
    # AR1 keeps only the best detection of the image: 1 of the 2 boxes found; AR10 finds both.
    m = coco_metrics(GT_B, DETS_B)
    assert m["AR1"] == pytest.approx(0.5)
    assert m["AR10"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------
# (c) COCO 101-point AP50 against the VOC area AP, exactly


def test_coco_ap50_differs_from_voc_area_by_known_amount():
    # Same curve as (b). COCO samples p(r) at r = 0, 0.01, .., 1: r = 0 .. 0.50 (51 points) -> 1 and
    # r = 0.51 .. 1 (50 points) -> 2/3, so AP50 = (51 + 50 * 2/3) / 101 = (253/3) / 101 = 253/303.
    # VOC area AP = 5/6, hence AP50 - VOC_AP50 = 253/303 - 5/6 = (506 - 505) / 606 = 1/606.
    # Matched boxes have IoU 1, so every IoU threshold gives the same AP and mAP = AP50.
    m = evaluate(GT_B, DETS_B)
    assert m["AP50"] == pytest.approx(253 / 303, abs=1e-12)
    assert m["mAP"] == pytest.approx(253 / 303, abs=1e-12)
    assert m["AP50"] - m["VOC_AP50"] == pytest.approx(1 / 606, abs=1e-12)


def test_coco_ap50_equals_voc_when_precision_is_flat():
    # FP then TP, npos = 1: points (recall 0, precision 0), (1, 1/2); p(r) = 1/2 on all of [0, 1],
    # so the 11-point, the 101-point and the area AP are all exactly 1/2.
    gt = make_gt({1: [(1, [0, 0, 20, 20], 0)]})
    dets = [det(1, 1, [60, 60, 20, 20], 0.9), det(1, 1, [0, 0, 20, 20], 0.8)]
    m = evaluate(gt, dets)
    assert m["AP50"] == pytest.approx(0.5, abs=1e-12)
    assert m["VOC_AP50"] == pytest.approx(0.5, abs=1e-12)
    assert m["VOC07_AP50"] == pytest.approx(0.5, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# (d) difficult / crowd boxes


def test_detection_on_difficult_box_is_neither_tp_nor_fp():
    # class 1: box A (normal) and D (difficult). Ranked: d on D (ignored), d on A (TP), d elsewhere (FP).
    # Counted sequence TP, FP with npos = 1 -> points (1, 1), (1, 1/2) -> p(r) = 1 -> AP = 1.
    # Were the D detection a FP the AP would be 1/2; were D a positive the recall would stop at 1/2.
    # class 2: only a difficult box, so it is left out of the mean although it has a detection.
    gt = make_gt(
        {1: [(1, [0, 0, 30, 30], 0), (1, [100, 100, 30, 30], 1), (2, [150, 10, 30, 30], 1)]}, num_classes=2
    )
    dets = [
        det(1, 1, [100, 100, 30, 30], 0.95),
        det(1, 1, [0, 0, 30, 30], 0.9),
        det(1, 1, [60, 60, 10, 10], 0.5),
        det(1, 2, [150, 10, 30, 30], 0.8),
    ]
    g = check_coco_gt(gt)
    assert match_detections(g, check_detections(dets, g)).tolist() == [-1, 1, 0, -1]
    for use_07 in (True, False):
        result = voc_ap50(gt, dets, use_07_metric=use_07)
        assert result["per_class"] == {1: pytest.approx(1.0)}
        assert result["mAP"] == pytest.approx(1.0)
    assert coco_metrics(gt, dets)["AP50"] == pytest.approx(1.0)  # COCO ignores crowd matches the same way


def test_duplicate_detection_is_false_positive_but_difficult_overlap_absorbs_it():
    # Two detections on box A: the second is a duplicate (FP) -> TP, FP -> AP = 1 for both metrics anyway,
    # so check the outcome directly; with a difficult box under the duplicate it is ignored instead.
    gt = make_gt({1: [(1, [0, 0, 30, 30], 0)]})
    dets = [det(1, 1, [0, 0, 30, 30], 0.9), det(1, 1, [1, 1, 30, 30], 0.8)]
    g = check_coco_gt(gt)
    assert match_detections(g, check_detections(dets, g)).tolist() == [1, 0]
    gt_crowd = make_gt({1: [(1, [0, 0, 30, 30], 0), (1, [0, 0, 31, 31], 1)]})
    g = check_coco_gt(gt_crowd)
    assert match_detections(g, check_detections(dets, g)).tolist() == [1, -1]


# ----------------------------------------------------------------------------------------------------------
# (e) empty inputs


def test_empty_detections_give_zeros_and_undefined_stays_minus_one():
    m = evaluate(GT_B, [])
    for key in ("mAP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100", "ARs", "VOC07_AP50", "VOC_AP50"):
        assert m[key] == 0.0, key
    for key in ("APm", "APl", "ARm", "ARl"):  # no medium or large ground truth: undefined, as in COCO
        assert m[key] == -1.0, key


def test_no_ground_truth_at_all_is_undefined():
    gt = make_gt({1: []})
    m = evaluate(gt, [det(1, 1, [0, 0, 10, 10], 0.5)])
    assert all(m[key] == -1.0 for key in METRIC_KEYS)
    assert voc_ap50(gt, [], use_07_metric=False) == {"mAP": -1.0, "per_class": {}}


# ----------------------------------------------------------------------------------------------------------
# (f) detector outputs -> COCO results


def test_outputs_to_detections_scales_back_to_original_image():
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 4.0, 2.0]]),
            "labels": torch.tensor([3, 1]),
            "scores": torch.tensor([0.75, 0.5]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)},
    ]
    # (sy, sx) = (orig_h / h, orig_w / w): y doubles, x halves
    dets = outputs_to_detections(outputs, torch.tensor([7, 8]), [(2.0, 0.5), (1.0, 1.0)])
    assert dets == [
        {"image_id": 7, "category_id": 3, "bbox": [5.0, 40.0, 10.0, 80.0], "score": 0.75},
        {"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 2.0, 4.0], "score": 0.5},
    ]
    assert all(type(d["image_id"]) is int and type(d["category_id"]) is int for d in dets)

    with pytest.raises(ValueError, match="2 outputs, 1 image_ids"):
        outputs_to_detections(outputs, [7], [(1.0, 1.0), (1.0, 1.0)])
    with pytest.raises(ValueError, match=r"scales\[0\]"):
        outputs_to_detections(outputs[:1], [7], [(0.0, 1.0)])


# ----------------------------------------------------------------------------------------------------------
# input handling


def test_inputs_are_not_modified_and_gt_without_area_or_ids_works():
    gt, dets = copy.deepcopy(GT_B), copy.deepcopy(DETS_B)
    evaluate(gt, dets)
    assert gt == GT_B and dets == DETS_B


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"detections\[1\]\['bbox'\]"):
        evaluate(GT_B, [DETS_B[0], det(1, 1, [0, 0, 10], 0.5)])
    with pytest.raises(ValueError, match=r"detections\[0\]\['image_id'\] = 99"):
        evaluate(GT_B, [det(99, 1, [0, 0, 10, 10], 0.5)])
    with pytest.raises(ValueError, match=r"detections\[0\]\['category_id'\] = 5"):
        evaluate(GT_B, [det(1, 5, [0, 0, 10, 10], 0.5)])
    with pytest.raises(ValueError, match=r"detections\[0\]\['score'\] is not finite"):
        evaluate(GT_B, [det(1, 1, [0, 0, 10, 10], float("nan"))])
    with pytest.raises(ValueError, match=r"detections\[0\] has no 'score'"):
        evaluate(GT_B, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="coco_gt has no 'annotations'"):
        evaluate({"images": [], "categories": []}, [])
    bad_gt = make_gt({1: [(1, [0, 0, -5, 5], 0)]})
    with pytest.raises(ValueError, match=r"coco_gt\['annotations'\]\[0\]\['bbox'\].*negative"):
        evaluate(bad_gt, [])


def test_format_metrics_one_line_in_percent():
    line = format_metrics({"mAP": 0.3712, "AP50": 0.5, "APs": -1.0, "VOC_AP50": 1.0, "eval_s": 3.0})
    assert line == "mAP 37.1 | AP50 50.0 | APs n/a | VOC_AP50 100.0"


# ----------------------------------------------------------------------------------------------------------
# randomized consistency with COCO


def _random_case(seed: int) -> tuple[dict, list[dict]]:
    """A few images and classes; detections are jittered ground-truth copies (some relabelled) and clutter.

    No crowd boxes (COCO's crowd IoU differs from VOC's) and < 100 detections per image (COCO's maxDets).
    """
    rng = np.random.default_rng(seed)
    num_images, num_classes = int(rng.integers(2, 6)), int(rng.integers(1, 4))
    objects: dict[int, list[tuple]] = {}
    dets = []
    for image_id in range(1, num_images + 1):
        k = int(rng.integers(0, 7))
        boxes = np.concatenate([rng.uniform(0, 150, (k, 2)), rng.uniform(5, 50, (k, 2))], 1)
        labels = rng.integers(1, num_classes + 1, k)
        objects[image_id] = [(int(c), b.tolist(), 0) for c, b in zip(labels, boxes)]
        m = int(rng.integers(0, 15))
        if k:
            src = rng.integers(0, k, m)
            dboxes = boxes[src] + rng.normal(0, 4, (m, 4))
            dlabels = np.where(rng.random(m) < 0.8, labels[src], rng.integers(1, num_classes + 1, m))
        else:
            dboxes = np.concatenate([rng.uniform(0, 150, (m, 2)), rng.uniform(5, 50, (m, 2))], 1)
            dlabels = rng.integers(1, num_classes + 1, m)
        dboxes[:, 2:] = np.abs(dboxes[:, 2:])
        dets += [det(image_id, int(c), b.tolist(), float(s)) for b, c, s in zip(dboxes, dlabels, rng.random(m))]
    return make_gt(objects, num_classes), dets


@pytest.mark.parametrize("seed", range(25))
def test_voc_area_ap_matches_coco_ap50_within_interpolation_bound(seed):
    """|VOC area AP - COCO AP50| <= 1/100, per class and so for the mean.

    COCO averages the interpolated precision p(r) (non-increasing in r) at r_j = j/100, j = 0..100:
    AP101 = S / 101 with S = sum_j p(r_j). The area A = integral of p over [0, 1] lies between the right
    and the left Riemann sums on that grid: (S - p(0)) / 100 <= A <= (S - p(1)) / 100, hence
    (AP101 - p(0)) / 100 <= A - AP101 <= (AP101 - p(1)) / 100, and |A - AP101| <= 1/100 since p is in [0, 1].
    The bound holds only if both sides match detections identically, which the first check pins down:
    sampling our own PR curves at COCO's 101 recall points reproduces COCO's AP50 to rounding.
    """
    gt, dets = _random_case(seed)
    m = evaluate(gt, dets)

    g = check_coco_gt(gt)
    d = check_detections(dets, g)
    curves = precision_recall(g, d, match_detections(g, d))
    if not curves:  # no ground truth drawn: both undefined
        assert m["AP50"] == -1.0 and m["VOC_AP50"] == -1.0
        return
    rec_thrs = np.linspace(0.0, 1.0, 101)
    ap101 = []
    for recall, precision in curves.values():
        envelope = np.append(np.maximum.accumulate(precision[::-1])[::-1], 0.0)
        ap101.append(envelope[np.searchsorted(recall, rec_thrs, side="left")].mean())
    assert m["AP50"] == pytest.approx(float(np.mean(ap101)), abs=1e-9)

    per_class = voc_ap50(gt, dets, use_07_metric=False)["per_class"]
    for (cat, area_ap), coco_ap in zip(per_class.items(), ap101):
        assert abs(area_ap - coco_ap) <= 0.01 + 1e-12, cat
    assert abs(m["VOC_AP50"] - m["AP50"]) <= 0.01 + 1e-12
