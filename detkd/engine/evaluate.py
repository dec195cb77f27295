"""Evaluation loop: run a detector over a data set, gather detections from every rank, score on rank 0;
and ``detkd eval``'s evaluation of a checkpoint. (The metrics themselves: :mod:`detkd.evaluation`.)"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detkd.config import Config
from detkd.data import build_dataset, build_loader, scale_image
from detkd.data.samplers import ShardSampler
from detkd.engine.assemble import resolve_device
from detkd.engine.logger import Progress
from detkd.evaluation import evaluate, outputs_to_detections
from detkd.models import build_detector, checkpoint_state_dict, load_checked
from detkd.models.weights import check_checkpoint_fits
from detkd.runtime import dist
from detkd.runtime.faults import fault_point


def shutdown_workers(batches: Any) -> None:
    """Stop the worker processes of a DataLoader iterator now.

    A loop that ends with an exception leaves its iterator in the traceback's frames, and with it the
    workers, until that traceback is freed (never, for a caller that keeps it); this ends them at once.
    ``_shutdown_workers`` is what the iterator's own ``__del__`` calls; calling it twice is harmless.
    """
    stop = getattr(batches, "_shutdown_workers", None)
    if stop is not None:
        stop()


@torch.no_grad()
def detect(model: nn.Module, loader: Any, device: torch.device, progress: bool = True) -> list[dict]:
    """Detections of this rank's share of ``loader`` in COCO result format, in original image coordinates
    (label 0, background / never positive, is dropped)."""
    was_training = model.training
    model.eval()
    detections: list[dict] = []
    bar = Progress(len(loader), "eval", enabled=progress)
    batches = iter(loader)
    try:
        for images, targets in batches:
            batch = [scale_image(img, device) for img in images]
            outputs = model(batch)
            # RetinaNet / FCOS heads have an output for index 0 that is never trained positive (docs/
            # architecture.md, "Labels"); early in training it can still pass score_thresh. It is no category.
            outputs = [{k: v.cpu()[o["labels"].cpu() > 0] for k, v in o.items()} for o in outputs]
            ids = [int(t["image_id"]) for t in targets]
            scales = []
            for img, t in zip(images, targets):
                oh, ow = (int(x) for x in t["orig_size"])
                scales.append((oh / img.shape[-2], ow / img.shape[-1]))
            detections.extend(outputs_to_detections(outputs, ids, scales))
            bar.update(len(images))
            fault_point("eval_batch")
    finally:
        bar.close()
        shutdown_workers(batches)
        model.train(was_training)
    return detections


def evaluate_model(model: nn.Module, loader: Any, coco_gt: dict, device: torch.device,
                   progress: bool = True, max_dets: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """COCO + VOC metrics of ``model`` on ``loader``; identical on every rank (computed on rank 0).
    ``max_dets``: COCO's maximum detections per image (``eval.max_dets``)."""
    t0 = time.perf_counter()
    dets = detect(model, loader, device, progress)
    gathered = dist.all_gather_objects(dets)
    metrics: dict[str, float] | None = None
    if dist.is_main():
        all_dets = [d for part in gathered for d in part]
        metrics = evaluate(coco_gt, all_dets, max_dets)
        metrics["eval_s"] = time.perf_counter() - t0
    return dist.broadcast_object(metrics)


def evaluate_checkpoint(cfg: Config, checkpoint: str, progress: bool = True) -> dict[str, float]:
    """Evaluate a detkd checkpoint, or a plain/exported state dict, with the model of ``cfg``."""
    device = resolve_device(cfg.train.device, cfg.train.dist_timeout_s)
    if Path(checkpoint).is_file():
        check_checkpoint_fits(checkpoint, cfg.model, "model", "--checkpoint")
    model = build_detector(cfg.model)
    load_checked(model, checkpoint_state_dict(checkpoint), checkpoint)
    model.to(device)
    val_set = build_dataset(cfg.data, "val", cfg.model)
    loader = build_loader(val_set, cfg.data.batch_size, cfg.data.workers, shuffle=False,
                          sampler=ShardSampler(len(val_set), dist.rank(), dist.world_size()))
    return evaluate_model(model, loader, val_set.coco_gt(), device, progress, cfg.eval.max_dets)
