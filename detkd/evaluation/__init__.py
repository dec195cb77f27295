"""Detection metrics: COCO (faster-coco-eval) and PASCAL VOC AP50 (07 11-point and area).

``evaluate(coco_gt, detections)`` is the single entry point used by the engine; detections are COCO
result dicts in original image coordinates, e.g. from :func:`outputs_to_detections`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from detkd.evaluation.coco import COCO_KEYS, DEFAULT_MAX_DETS, coco_metrics, coco_metrics_checked
from detkd.evaluation.inputs import check_coco_gt, check_detections
from detkd.evaluation.voc import average_precision, match_detections, precision_recall, voc_ap50

METRIC_KEYS = (*COCO_KEYS, "VOC07_AP50", "VOC_AP50")

__all__ = [
    "METRIC_KEYS",
    "coco_metrics",
    "evaluate",
    "format_metrics",
    "outputs_to_detections",
    "voc_ap50",
]


def evaluate(coco_gt: Mapping, detections: Sequence[Mapping],
             max_dets: Sequence[int] = DEFAULT_MAX_DETS) -> dict[str, float]:
    """COCO metrics plus VOC AP50, all fractions in [0, 1] (-1 = undefined); keys :data:`METRIC_KEYS`
    (the AR keys named after ``max_dets``, COCO's maximum detections per image: ``eval.max_dets``).

    ``VOC07_AP50`` is the VOC2007 11-point AP, ``VOC_AP50`` the VOC2010+ area AP (see
    :mod:`detkd.evaluation.voc`). Neither argument is modified.
    """
    gt = check_coco_gt(coco_gt)
    dets = check_detections(detections, gt)
    metrics = coco_metrics_checked(gt, dets, max_dets=max_dets)

    # One matching pass serves both VOC variants.
    curves = precision_recall(gt, dets, match_detections(gt, dets, 0.5))
    for key, use_07 in (("VOC07_AP50", True), ("VOC_AP50", False)):
        aps = [average_precision(rec, prec, use_07) for rec, prec in curves.values()]
        metrics[key] = sum(aps) / len(aps) if aps else -1.0
    return metrics


def outputs_to_detections(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int] | torch.Tensor,
    scales: Sequence[tuple[float, float]] | torch.Tensor,
) -> list[dict]:
    """torchvision detector outputs -> COCO result dicts in original image coordinates.

    Args:
        outputs: per image ``{"boxes": (N, 4) xyxy, "labels": (N,), "scores": (N,)}`` in the frame of the
            image the model was given; labels are already the data set's category ids 1..C.
        image_ids: the data set's ``image_id`` of each output.
        scales: per image ``(sy, sx) = (orig_h / h, orig_w / w)``: box y coordinates are multiplied by
            ``sy`` and x coordinates by ``sx`` to reach the original image.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` with plain Python numbers.
    """
    if not len(outputs) == len(image_ids) == len(scales):
        raise ValueError(
            f"outputs_to_detections: got {len(outputs)} outputs, {len(image_ids)} image_ids and "
            f"{len(scales)} scales; expected one of each per image"
        )
    detections: list[dict] = []
    for k, (out, image_id, scale) in enumerate(zip(outputs, image_ids, scales)):
        for key in ("boxes", "labels", "scores"):
            if key not in out:
                raise ValueError(f"outputs[{k}] has no '{key}' (got keys {sorted(out)})")
        boxes = out["boxes"].detach().to("cpu", torch.float64)
        labels = out["labels"].detach().cpu().reshape(-1).tolist()
        scores = out["scores"].detach().cpu().reshape(-1).tolist()
        if boxes.ndim != 2 or boxes.shape[1] != 4 or len(labels) != len(boxes) or len(scores) != len(boxes):
            raise ValueError(
                f"outputs[{k}]: boxes must be (N, 4) with N labels and N scores, got boxes "
                f"{tuple(boxes.shape)}, {len(labels)} labels, {len(scores)} scores"
            )
        sy, sx = (float(s) for s in scale)
        if not (sy > 0 and sx > 0):
            raise ValueError(f"scales[{k}] = ({sy}, {sx}) must be positive (sy, sx) factors")
        boxes = boxes * boxes.new_tensor([sx, sy, sx, sy])
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        image_id = int(image_id)
        detections.extend(
            {"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)}
            for box, label, score in zip(xywh, labels, scores)
        )
    return detections


def format_metrics(metrics: Mapping[str, float]) -> str:
    """One-line summary of the known metric keys present, in percent (``n/a`` where undefined)."""
    parts = []
    extra_ar = [k for k in metrics if k.startswith("AR") and k[2:].isdigit() and k not in METRIC_KEYS]
    for key in (*METRIC_KEYS, *extra_ar):
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key} {100.0 * value:.1f}" if value >= 0 else f"{key} n/a")
    return " | ".join(parts)
