"""PASCAL VOC average precision at IoU 0.5: the VOC2007 11-point AP and the VOC2010+ area AP.

Per class, detections are sorted by descending score and matched greedily, one image at a time, to the
ground truth of that image and class:

* a detection is a true positive when its best-overlapping *unmatched, non-difficult* box has
  IoU >= 0.5; that box is then taken;
* otherwise, when it overlaps a *difficult* box (``iscrowd=1``) with IoU >= 0.5, it is ignored: neither
  TP nor FP (a difficult box may absorb any number of detections);
* otherwise it is a false positive (no overlap, or a duplicate of an already taken box).

Difficult boxes do not count as positives. Classes without any non-difficult box are left out of the mean.

Deliberate differences from the original VOC devkit, all chosen to agree with COCO's AP50:

* boxes are continuous coordinates: IoU has no "+1 pixel" in widths and heights (detkd's data sets and
  torchvision detectors use continuous xyxy boxes);
* the threshold is IoU >= 0.5 (the devkit uses > 0.5);
* a detection looks for the best *unmatched* box, where the devkit takes the best box overall and calls
  the detection a duplicate when that one is taken. The two differ only when a detection overlaps two
  ground-truth boxes with IoU >= 0.5 each;
* ties in score are broken by image id, then input order, as faster-coco-eval / pycocotools do.

With these rules the area AP is exactly the integral of the precision envelope that COCO samples at 101
recall points, so ``|VOC_AP50 - COCO AP50| <= 1/100`` (see ``tests/test_evaluation.py``) when no image has
more than 100 detections of a class and there are no crowd boxes (COCO computes crowd IoU differently).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from detkd.evaluation.inputs import Detections, GroundTruth, check_coco_gt, check_detections

# VOC07 recall points 0.0, 0.1, ..., 1.0 as the doubles nearest to k / 10 (np.arange(0, 1.1, 0.1) gives
# 0.30000000000000004 and would miss a recall of exactly 3/10).
_VOC07_RECALLS = np.arange(11) / 10.0


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xywh boxes, continuous coordinates (no +1); 0 where the union is empty."""
    ax1, ay1, ax2, ay2 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]
    bx1, by1, bx2, by2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    union = a[:, 2:3] * a[:, 3:4] + b[:, 2] * b[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match_image(ious: np.ndarray, difficult: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy matching of one image and class; rows of ``ious`` in descending score order.

    Returns per detection 1 (TP), 0 (FP) or -1 (ignored: matched to a difficult box).
    """
    outcome = np.zeros(len(ious), np.int8)
    hits = ious >= iou_threshold
    taken = np.zeros(ious.shape[1], bool)
    for i in np.flatnonzero(hits.any(1)):  # rows without any hit stay false positives
        free = hits[i] & ~taken & ~difficult
        if free.any():
            taken[np.argmax(np.where(free, ious[i], -1.0))] = True
            outcome[i] = 1
        elif (hits[i] & difficult).any():
            outcome[i] = -1
    return outcome


def match_detections(gt: GroundTruth, dets: Detections, iou_threshold: float = 0.5) -> np.ndarray:
    """Per detection (input order): 1 true positive, 0 false positive, -1 ignored (difficult box)."""
    n = len(dets.scores)
    outcome = np.zeros(n, np.int8)
    if n == 0 or len(gt.image_id) == 0:
        return outcome

    gt_groups: dict[tuple[int, int], np.ndarray] = {}
    gt_order = np.lexsort((gt.image_id, gt.category_id))
    keys = np.stack([gt.category_id[gt_order], gt.image_id[gt_order]], 1)
    bounds = np.flatnonzero((keys[1:] != keys[:-1]).any(1)) + 1
    for group in np.split(gt_order, bounds):
        gt_groups[(int(gt.category_id[group[0]]), int(gt.image_id[group[0]]))] = group

    # Detections grouped by (class, image), descending score inside a group, input order on ties.
    order = np.lexsort((np.arange(n), -dets.scores, dets.image_id, dets.category_id))
    keys = np.stack([dets.category_id[order], dets.image_id[order]], 1)
    bounds = np.flatnonzero((keys[1:] != keys[:-1]).any(1)) + 1
    for group in np.split(order, bounds):
        g = gt_groups.get((int(dets.category_id[group[0]]), int(dets.image_id[group[0]])))
        if g is None:  # no ground truth of this class in this image: all false positives
            continue
        ious = box_iou_xywh(dets.boxes[group], gt.boxes[g])
        outcome[group] = _match_image(ious, gt.iscrowd[g], iou_threshold)
    return outcome


def precision_recall(
    gt: GroundTruth, dets: Detections, outcome: np.ndarray
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per class with at least one non-difficult box: (recall, precision) after each counted detection.

    Detections are ranked over the whole data set by descending score (ties: image id, input order);
    ignored detections are dropped from the ranking.
    """
    curves = {}
    for cat in sorted(int(c["id"]) for c in gt.categories):
        npos = int(np.count_nonzero((gt.category_id == cat) & ~gt.iscrowd))
        if npos == 0:
            continue
        idx = np.flatnonzero((dets.category_id == cat) & (outcome >= 0))
        idx = idx[np.lexsort((idx, dets.image_id[idx], -dets.scores[idx]))]
        tp = np.cumsum(outcome[idx] == 1)
        recall = tp / npos
        precision = tp / np.arange(1, len(idx) + 1)
        curves[cat] = (recall, precision)
    return curves


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP of one precision/recall curve (``recall`` non-decreasing).

    Both methods use the interpolated precision p(r) = max{precision_k : recall_k >= r} (0 beyond the
    last recall):

    * VOC2007: mean of p(r) at r = 0, 0.1, ..., 1 (11 points);
    * VOC2010+: area under the step function p(r) for r in [0, 1], i.e.
      sum_k (recall_k - recall_{k-1}) * p(recall_k) over the points where recall increases.
    """
    if len(recall) == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # p at each curve point
    if use_07_metric:
        first = np.searchsorted(recall, _VOC07_RECALLS, side="left")  # first point with recall >= r
        padded = np.append(envelope, 0.0)
        return float(padded[first].mean())
    steps = np.diff(recall, prepend=0.0)
    return float(np.sum(steps * envelope))


def voc_ap_checked(
    gt: GroundTruth, dets: Detections, use_07_metric: bool, iou_threshold: float = 0.5
) -> dict:
    """:func:`voc_ap50` on already validated inputs (see :mod:`detkd.evaluation.inputs`)."""
    curves = precision_recall(gt, dets, match_detections(gt, dets, iou_threshold))
    per_class = {cat: average_precision(rec, prec, use_07_metric) for cat, (rec, prec) in curves.items()}
    mean = float(np.mean(list(per_class.values()))) if per_class else -1.0
    return {"mAP": mean, "per_class": per_class}


def voc_ap50(coco_gt: Mapping, detections: Sequence[Mapping], use_07_metric: bool) -> dict:
    """PASCAL VOC AP at IoU 0.5 (rules in the module docstring).

    Args:
        coco_gt: COCO json dict; ``iscrowd=1`` boxes are VOC "difficult". Not modified.
        detections: COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
        use_07_metric: VOC2007 11-point interpolated AP; otherwise the VOC2010+ area under the
            monotone precision/recall curve.

    Returns:
        ``{"mAP": float, "per_class": {category_id: AP}}``; only classes with at least one non-difficult
        box appear, and ``mAP`` is their mean (-1 when there is none).
    """
    gt = check_coco_gt(coco_gt)
    return voc_ap_checked(gt, check_detections(detections, gt), use_07_metric)
