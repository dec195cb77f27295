"""Evaluation loop: run a detector over a data set, gather detections from every rank, score on rank 0."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from detkd.engine import dist
from detkd.engine.logger import Progress


@torch.no_grad()
def predict(model: nn.Module, loader: Any, device: torch.device, progress: bool = True) -> list[dict]:
    """Detections of this rank's share of ``loader`` in COCO result format, in original image coordinates."""
    from detkd.evaluation import outputs_to_detections

    was_training = model.training
    model.eval()
    detections: list[dict] = []
    bar = Progress(len(loader), "eval", enabled=progress)
    try:
        for images, targets in loader:
            batch = [img.to(device, non_blocking=True).float() / 255.0 for img in images]
            outputs = model(batch)
            outputs = [{k: v.cpu() for k, v in o.items()} for o in outputs]
            ids = [int(t["image_id"]) for t in targets]
            scales = []
            for img, t in zip(images, targets):
                oh, ow = (int(x) for x in t["orig_size"])
                scales.append((oh / img.shape[-2], ow / img.shape[-1]))
            detections.extend(outputs_to_detections(outputs, ids, scales))
            bar.update(len(images))
    finally:
        bar.close()
        model.train(was_training)
    return detections


def evaluate_model(model: nn.Module, loader: Any, coco_gt: dict, device: torch.device,
                   progress: bool = True) -> dict[str, float]:
    """COCO + VOC metrics of ``model`` on ``loader``; identical on every rank (computed on rank 0)."""
    from detkd.evaluation import evaluate

    t0 = time.perf_counter()
    dets = predict(model, loader, device, progress)
    gathered = dist.all_gather_objects(dets)
    metrics: dict[str, float] | None = None
    if dist.is_main():
        all_dets = [d for part in gathered for d in part]
        metrics = evaluate(coco_gt, all_dets)
        metrics["eval_s"] = time.perf_counter() - t0
    return dist.broadcast_object(metrics)
