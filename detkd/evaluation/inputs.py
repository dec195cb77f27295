"""Checked, array view of the evaluation inputs.

The COCO and VOC evaluators both start from a COCO ground-truth dict and a list of COCO result dicts.
Both are validated once here and turned into flat numpy arrays; the caller's objects are never modified
(pycocotools-style ``loadRes`` writes ``id`` / ``area`` / ``segmentation`` into the result dicts).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class GroundTruth:
    """Ground-truth boxes of a COCO json dict, one row per annotation (input order kept)."""

    images: list[dict]  # shallow copies of coco_gt["images"], ids as int
    categories: list[dict]  # shallow copies of coco_gt["categories"], ids as int
    image_id: np.ndarray  # (M,) int64
    category_id: np.ndarray  # (M,) int64
    boxes: np.ndarray  # (M, 4) float64, xywh
    area: np.ndarray  # (M,) float64, the json "area" or w * h when absent
    iscrowd: np.ndarray  # (M,) bool; VOC "difficult" / COCO crowd, ignored by both evaluators


@dataclass
class Detections:
    """Detections in COCO result format, one row per detection (input order kept)."""

    image_id: np.ndarray  # (N,) int64
    category_id: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 4) float64, xywh
    scores: np.ndarray  # (N,) float64


def _as_int(value: object, where: str) -> int:
    """``value`` as an int: ints, numpy / 0-d tensor integers and integral floats (3.0 from json) pass."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            if isinstance(value, (float, np.floating)) and float(value).is_integer():
                return int(value)
    raise ValueError(f"{where} must be an integer id, got {value!r}")


def _check_box(box: object, where: str) -> list[float]:
    if not isinstance(box, (Sequence, np.ndarray)) or isinstance(box, str) or len(box) != 4:
        raise ValueError(f"{where} must be [x, y, w, h] (4 numbers), got {box!r}")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be [x, y, w, h] (4 numbers), got {box!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where} has a non-finite coordinate: {box!r}")
    if values[2] < 0 or values[3] < 0:
        raise ValueError(f"{where} has a negative width or height: {box!r} (expected xywh, not xyxy?)")
    return values


def check_coco_gt(coco_gt: Mapping) -> GroundTruth:
    """Validate a COCO ground-truth dict (``images``, ``annotations``, ``categories``).

    ``area`` defaults to ``w * h`` and ``iscrowd`` to 0 when an annotation lacks them. Annotation ids are
    not needed (the evaluators number the boxes themselves).
    """
    if not isinstance(coco_gt, Mapping):
        raise ValueError(f"coco_gt must be a COCO json dict, got {type(coco_gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in coco_gt:
            raise ValueError(f"coco_gt has no '{key}' list (keys: {sorted(coco_gt)})")

    images = []
    for i, img in enumerate(coco_gt["images"]):
        if not isinstance(img, Mapping) or "id" not in img:
            raise ValueError(f"coco_gt['images'][{i}] must be a dict with an 'id', got {img!r}")
        images.append({**img, "id": _as_int(img["id"], f"coco_gt['images'][{i}]['id']")})
    image_ids = [img["id"] for img in images]
    if len(set(image_ids)) != len(image_ids):
        dup = next(x for x in image_ids if image_ids.count(x) > 1)
        raise ValueError(f"coco_gt['images'] has the id {dup} twice")

    categories = []
    for i, cat in enumerate(coco_gt["categories"]):
        if not isinstance(cat, Mapping) or "id" not in cat:
            raise ValueError(f"coco_gt['categories'][{i}] must be a dict with an 'id', got {cat!r}")
        categories.append({**cat, "id": _as_int(cat["id"], f"coco_gt['categories'][{i}]['id']")})
    category_ids = [cat["id"] for cat in categories]
    if len(set(category_ids)) != len(category_ids):
        dup = next(x for x in category_ids if category_ids.count(x) > 1)
        raise ValueError(f"coco_gt['categories'] has the id {dup} twice")

    known_images, known_categories = set(image_ids), set(category_ids)
    anns = coco_gt["annotations"]
    img_col = np.empty(len(anns), np.int64)
    cat_col = np.empty(len(anns), np.int64)
    boxes = np.empty((len(anns), 4), np.float64)
    area = np.empty(len(anns), np.float64)
    iscrowd = np.empty(len(anns), bool)
    for i, ann in enumerate(anns):
        where = f"coco_gt['annotations'][{i}]"
        if not isinstance(ann, Mapping):
            raise ValueError(f"{where} must be a dict, got {ann!r}")
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise ValueError(f"{where} has no '{key}'")
        img_col[i] = _as_int(ann["image_id"], f"{where}['image_id']")
        cat_col[i] = _as_int(ann["category_id"], f"{where}['category_id']")
        if img_col[i] not in known_images:
            raise ValueError(f"{where}['image_id'] = {img_col[i]} is not in coco_gt['images']")
        if cat_col[i] not in known_categories:
            raise ValueError(f"{where}['category_id'] = {cat_col[i]} is not in coco_gt['categories']")
        boxes[i] = _check_box(ann["bbox"], f"{where}['bbox']")
        area[i] = float(ann["area"]) if "area" in ann else boxes[i, 2] * boxes[i, 3]
        iscrowd[i] = bool(ann.get("iscrowd", 0))

    return GroundTruth(images, categories, img_col, cat_col, boxes, area, iscrowd)


def _diagnose_detection(i: int, det: object) -> None:
    """Raise a ValueError that says what is wrong with ``detections[i]`` (called once a check failed)."""
    where = f"detections[{i}]"
    if not isinstance(det, Mapping):
        raise ValueError(f"{where} must be a dict, got {det!r}")
    for key in ("image_id", "category_id", "bbox", "score"):
        if key not in det:
            raise ValueError(f"{where} has no '{key}' (got keys {sorted(det)})")
    _as_int(det["image_id"], f"{where}['image_id']")
    _as_int(det["category_id"], f"{where}['category_id']")
    _check_box(det["bbox"], f"{where}['bbox']")
    score = det["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}['score'] must be a number, got {score!r}")
    if not math.isfinite(score):
        raise ValueError(f"{where}['score'] is not finite: {score!r}")


def _int_column(values: np.ndarray) -> np.ndarray | None:
    """``values`` as int64 when every entry is an integer (3 or 3.0), else None."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "f" and np.isfinite(values).all() and (values == np.round(values)).all():
        return values.astype(np.int64)
    return None


def check_detections(detections: Sequence[Mapping], gt: GroundTruth) -> Detections:
    """Validate COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``) against ``gt``."""
    if not isinstance(detections, Sequence):
        raise ValueError(f"detections must be a list of COCO result dicts, got {type(detections).__name__}")
    n = len(detections)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Detections(empty, empty.copy(), np.zeros((0, 4)), np.zeros(0))

    # Fast path: one column at a time; any failure falls back to a per-entry diagnosis.
    try:
        img_col = _int_column(np.asarray([d["image_id"] for d in detections]))
        cat_col = _int_column(np.asarray([d["category_id"] for d in detections]))
        boxes = np.asarray([d["bbox"] for d in detections], dtype=np.float64)
        scores = np.asarray([d["score"] for d in detections], dtype=np.float64)
        ok = img_col is not None and cat_col is not None and boxes.shape == (n, 4) and scores.shape == (n,)
    except (KeyError, TypeError, ValueError, OverflowError, IndexError):
        ok = False
    if ok:
        finite = np.isfinite(boxes).all(1) & np.isfinite(scores) & (boxes[:, 2:] >= 0).all(1)
        ok = bool(finite.all())
    if not ok:
        for i, det in enumerate(detections):
            _diagnose_detection(i, det)
        raise ValueError(
            "detections: 'image_id' / 'category_id' must be plain integers and 'bbox' / 'score' plain numbers"
        )

    known_images = np.array(sorted(img["id"] for img in gt.images), np.int64)
    bad = np.flatnonzero(~np.isin(img_col, known_images))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"detections[{i}]['image_id'] = {img_col[i]} is not an image of coco_gt['images']")
    known_categories = np.array(sorted(cat["id"] for cat in gt.categories), np.int64)
    bad = np.flatnonzero(~np.isin(cat_col, known_categories))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"detections[{i}]['category_id'] = {cat_col[i]} is not a category of coco_gt['categories'] "
            f"(ids {known_categories.tolist()})"
        )
    return Detections(img_col, cat_col, boxes, scores)
