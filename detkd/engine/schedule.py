"""Optimizer and learning-rate schedule (linear warm-up, then multi-step or cosine, in epochs)."""

from __future__ import annotations

import math

import torch
from torch import nn

from detkd.config import TrainConfig


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(it: int, iters_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at iteration ``it`` (0-based, counted over the whole run)."""
    epoch = it / max(1, iters_per_epoch)
    if cfg.schedule == "multistep":
        factor = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    else:
        total = cfg.epochs * iters_per_epoch
        factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, it / max(1, total))))
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(opt: torch.optim.Optimizer, iters_per_epoch: int, cfg: TrainConfig):
    """Per-iteration LambdaLR; its state is just the step count, so resume is exact."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(it, iters_per_epoch, cfg))
