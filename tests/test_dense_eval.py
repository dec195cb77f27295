"""Dense scenes: COCO's maximum detections per image as a setting (``eval.max_dets``)."""

from __future__ import annotations

import pytest

from detkd.config import Config, ConfigError, EvalConfig, ModelConfig, validate
from detkd.evaluation import evaluate, format_metrics


def dense_scene(n: int = 300):
    """One 1000 x 1000 image with ``n`` 40 x 40 boxes on a grid, and perfect detections of them."""
    anns, dets = [], []
    for k in range(n):
        x, y = 50 * (k % 20), 50 * (k // 20)
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, 40, 40], "area": 1600,
                     "iscrowd": 0})
        dets.append({"image_id": 1, "category_id": 1, "bbox": [x, y, 40, 40], "score": 1.0 - k / (2 * n)})
    gt = {"images": [{"id": 1, "width": 1000, "height": 1000}], "annotations": anns,
          "categories": [{"id": 1, "name": "thing"}]}
    return gt, dets


def test_more_than_100_objects_reach_recall_1_with_max_dets_raised():
    gt, dets = dense_scene(300)
    coco = evaluate(gt, dets)  # COCO's 1 / 10 / 100: two thirds of the objects are never counted
    assert coco["AR100"] == pytest.approx(100 / 300)
    assert coco["mAP"] < 0.35

    dense = evaluate(gt, dets, max_dets=(1, 10, 300))
    assert dense["AR300"] == pytest.approx(1.0)
    assert dense["mAP"] == pytest.approx(1.0)
    assert dense["AR10"] == pytest.approx(10 / 300)
    assert "AR100" not in dense and "AR300 100.0" in format_metrics(dense)


def test_max_dets_setting_checked_against_detections_per_img():
    cfg = Config(model=ModelConfig(detections_per_img=500), eval=EvalConfig(max_dets=[1, 10, 500]))
    validate(cfg)  # agree
    cfg.eval.max_dets = [1, 10, 100]
    with pytest.raises(ConfigError, match=r"detections_per_img \(500\) exceeds eval.max_dets.*\[1, 10, 500\]"):
        validate(cfg)
    cfg.eval.max_dets = [10, 1, 500]
    with pytest.raises(ConfigError, match="eval.max_dets: expected three increasing"):
        validate(cfg)
