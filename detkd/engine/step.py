"""One training step's forward pass: the student's detection losses and the distillers' weighted terms."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detkd.runtime import dist
from detkd.runtime.console import info
from detkd.taps import TapRequest, select_levels, tap_student, tap_teacher, transform_batch


class DistillStep(nn.Module):
    """Student and distillers in one module, so that DDP synchronises the adapters' gradients too.

    The teacher is held outside the parameter tree: it is frozen, in eval mode, and never optimised.
    """

    def __init__(self, student: nn.Module, distillers: nn.ModuleList | None = None,
                 weights: list[float] | None = None, teacher: nn.Module | None = None, balance: float = 0.0,
                 pairs: list[tuple[int, int]] | None = None):
        super().__init__()
        self.student = student
        # (teacher level, student level) of equal stride (detkd.models.pair_levels); None: the two pyramids
        # are the same levels, passed to the distillers whole
        self.pairs = pairs
        self.distillers = distillers if distillers is not None else nn.ModuleList()
        self.weights = weights or []
        self._teacher = [teacher] if teacher is not None else []  # a list hides it from .parameters()
        self.scale = 1.0  # distillation decay factor, set by the loop every epoch
        self.balance = balance  # distill.balance: > 0 caps each method's loss at balance x detection loss
        self.balance_scales: list[dict[str, float]] = []  # per method and term, fixed on the first step
        self.cache = None  # a detkd.engine.teacher_cache.TeacherCache (set by the trainer); None: tap_teacher
        if self.distillers:
            req = TapRequest()
            for d in self.distillers:
                req = req.merge(d.request())
            self.request = req

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if not self.distillers:
            return self.student(images, targets), {}
        image_list, tgts = transform_batch(self.student, images, targets)
        det_losses, s_taps = tap_student(self.student, image_list, tgts, self.request)
        if self.cache is not None:
            t_taps = self.cache.tap(self.teacher, image_list, tgts, self.request, s_taps)
        else:
            t_taps = tap_teacher(self.teacher, image_list, tgts, self.request, s_taps)
        if self.pairs is not None:
            t_taps = select_levels(t_taps, [i for i, _ in self.pairs])
            s_taps = select_levels(s_taps, [j for _, j in self.pairs])
        outputs = [d(t_taps, s_taps, tgts) for d in self.distillers]
        if self.balance > 0 and not self.balance_scales:
            self.balance_scales = balance_scales(det_losses, outputs, self.weights, self.balance)
            info("distill.balance: term factors " + ", ".join(
                f"{k} {b:.3g}" for scales in self.balance_scales for k, b in scales.items()))
        factors = self.balance_scales or [{} for _ in outputs]
        return det_losses, weigh_terms(outputs, list(self.distillers), self.weights, factors, self.scale)


def weigh_terms(outputs: list[dict[str, Tensor]], distillers: list[nn.Module], weights: list[float],
                factors: list[dict[str, float]], scale: float) -> dict[str, Tensor]:
    """Every distiller's terms times its run-level ``weight``, its balance factor and the decay ``scale``
    (``distill.decay``), except the terms the distiller lists in ``undecayed``, which keep scale 1."""
    kd_losses: dict[str, Tensor] = {}
    for d, out, w, b in zip(distillers, outputs, weights, factors):
        exempt = getattr(d, "undecayed", frozenset())
        for k, v in out.items():
            kd_losses[k] = v * (w * b.get(k, 1.0) * (1.0 if k in exempt else scale))
    return kd_losses


def balance_scales(det_losses: dict[str, Tensor], outputs: list[dict[str, Tensor]], weights: list[float],
                   balance: float) -> list[dict[str, float]]:
    """``distill.balance``: one factor per distillation term, min(1, balance * detection loss / weighted
    term), measured on the first batch (averaged over DDP ranks) and then fixed for the run.

    The papers' loss weights were set on ImageNet-pretrained pairs; on a pair trained from scratch the
    feature-imitation terms can start 20-10,000x above the detection loss and swamp it. The
    factor never raises a weight, and terms that do not grow with the feature scale (KL divergences,
    relations, projections on prototypes) usually keep their published weight.
    """
    det = sum(float(v.detach()) for v in det_losses.values())
    names = [(i, k) for i, out in enumerate(outputs) for k in out]
    values = [weights[i] * float(outputs[i][k].detach()) for i, k in names]
    device = next(iter(det_losses.values())).device  # NCCL reduces CUDA tensors only
    ratios = torch.tensor([balance * det / v if v > 0 else 1.0 for v in values], dtype=torch.float64,
                          device=device)
    ratios = dist.all_reduce_mean(ratios)
    scales: list[dict[str, float]] = [{} for _ in outputs]
    for (i, k), r in zip(names, ratios.tolist()):
        scales[i][k] = min(1.0, r)
    return scales
