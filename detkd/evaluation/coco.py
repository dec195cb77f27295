"""COCO box metrics (AP over IoU 0.50:0.95, AP50, AP75, per-size AP and AR) via faster-coco-eval.

faster-coco-eval re-implements the pycocotools matching and accumulation in C++ with identical results.
The COCO objects are built from the in-memory dicts (no temporary json files) and the library's progress
prints are silenced unless ``verbose=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from detkd.evaluation.inputs import Detections, GroundTruth, check_coco_gt, check_detections

# Order of COCOeval.stats[:12] (the standard 12-line COCO summary), fractions in [0, 1], -1 = undefined.
COCO_KEYS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet(*args, **kwargs) -> None:
    pass


def _coco_from_dict(dataset: dict) -> COCO:
    """A COCO api object over an in-memory dict (no file, no deep copy)."""
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


DEFAULT_MAX_DETS = (1, 10, 100)


def coco_keys(max_dets: Sequence[int] = DEFAULT_MAX_DETS) -> tuple[str, ...]:
    """Names of the 12 summary metrics: :data:`COCO_KEYS`, with the AR keys named after ``max_dets``."""
    if len(max_dets) != 3:
        raise ValueError(f"max_dets: expected three counts, got {list(max_dets)}")
    return (*COCO_KEYS[:6], *(f"AR{m}" for m in max_dets), *COCO_KEYS[9:])


def coco_metrics_checked(gt: GroundTruth, dets: Detections, verbose: bool = False,
                         max_dets: Sequence[int] = DEFAULT_MAX_DETS) -> dict[str, float]:
    """:func:`coco_metrics` on already validated inputs (see :mod:`detkd.evaluation.inputs`)."""
    keys = coco_keys(max_dets)
    # Annotation ids are numbered from 1: the C++ matcher uses id 0 as "unmatched".
    gt_anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": int(z)}
        for k, (i, c, b, a, z) in enumerate(
            zip(gt.image_id.tolist(), gt.category_id.tolist(), gt.boxes.tolist(), gt.area.tolist(),
                gt.iscrowd.tolist())
        )
    ]
    # What loadRes would add to the results (id, area = w * h, iscrowd 0), minus the unused polygons.
    dt_anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "score": s, "area": b[2] * b[3], "iscrowd": 0}
        for k, (i, c, b, s) in enumerate(
            zip(dets.image_id.tolist(), dets.category_id.tolist(), dets.boxes.tolist(), dets.scores.tolist())
        )
    ]
    coco_gt = _coco_from_dict({"images": gt.images, "annotations": gt_anns, "categories": gt.categories})
    coco_dt = _coco_from_dict({"images": gt.images, "annotations": dt_anns, "categories": gt.categories})
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=print if verbose else _quiet)
    evaluator.params.maxDets = [int(m) for m in max_dets]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = np.asarray(evaluator.stats, dtype=np.float64)[: len(keys)]
    return {key: float(value) for key, value in zip(keys, stats)}


def coco_metrics(coco_gt: Mapping, detections: Sequence[Mapping], verbose: bool = False,
                 max_dets: Sequence[int] = DEFAULT_MAX_DETS) -> dict[str, float]:
    """The 12 standard COCO box metrics of ``detections`` against ``coco_gt``.

    Args:
        coco_gt: COCO json dict (``images``, ``annotations`` with ``bbox`` xywh, ``categories``); a missing
            ``area`` is taken as ``w * h`` and a missing ``iscrowd`` as 0. Not modified.
        detections: COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``). Not modified.
        verbose: print the library's usual 12-line summary.
        max_dets: COCO's ``maxDets``, three increasing counts; AP and the per-size AR count the top
            ``max_dets[-1]`` detections of an image, and the AR keys are ``AR{m}`` for each count.

    Returns:
        ``{mAP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}`` as fractions; -1 where COCO
        leaves a metric undefined (no ground truth in that size range). With no detections every defined
        metric is 0.
    """
    gt = check_coco_gt(coco_gt)
    return coco_metrics_checked(gt, check_detections(detections, gt), verbose, max_dets)
