"""Vanilla knowledge distillation on classification outputs (Hinton et al., "Distilling the Knowledge in a
Neural Network", 2015, https://arxiv.org/abs/1503.02531).

Hinton et al. (Sec. 2) soften both models' class distributions with a temperature, q_i = exp(z_i / T) /
sum_j exp(z_j / T) (Eq. 1), train the student on the cross-entropy with the teacher's soft targets, and
multiply that term by T^2 because its gradient, (1 / T)(q_i - p_i) per logit (Eq. 2), shrinks as 1 / T^2 at
high temperature (Eq. 3 and the zero-mean case after it, Sec. 2.1). The soft-target objective itself has no
equation number in the paper; detkd computes it as KL(teacher || student), which differs from that
cross-entropy by the teacher's entropy (a constant: same gradients, and 0 when the student agrees).
For detectors:

- Faster R-CNN: the box head's softmax over num_classes + 1 (background included) on the student's
  sampled RoIs, with the teacher's box head run on the same RoIs (``request().roi_outputs``):
  ``kd_cls = weight * mean_RoIs KL(softmax(z_t / T) || softmax(z_s / T)) * T^2``.
- RetinaNet / FCOS: per-class sigmoid outputs, so the per-class Bernoulli KL (summed over the foreground
  classes 1..C, column 0 is never positive) averaged over anchors / points:
  ``kd_cls = weight * mean_anchors sum_c KL(sigmoid(z_t,c / T) || sigmoid(z_s,c / T)) * T^2``.

``samples``: ``auto`` (default) = all sampled RoIs for Faster R-CNN (they are already balanced 1:3 by the
RoI sampler) and the positive anchors (``matched_idxs >= 0``) for one-stage detectors (the dense
background would otherwise swamp the term); ``all`` / ``positive`` force one choice (positive RoIs:
``roi_labels > 0``). ``class_reduction: mean`` averages over classes instead of summing (the variant of
the global-knowledge authors' response loss). Default T = 2, the temperature of that response loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from detkd.distill.base import Distiller, opt
from detkd.distill.checks import check_logits
from detkd.distill.losses import graph_zero, sigmoid_kl, softmax_kl
from detkd.taps import TapRequest, Taps


@dataclass
class KDOptions:
    weight: float = opt(1.0, ge=0)  # multiplies kd_cls
    temperature: float = opt(2.0, gt=0)  # T of the softened outputs; the KL is scaled by T^2
    samples: Literal["auto", "all", "positive"] = "auto"  # auto: all sampled RoIs (Faster R-CNN), positive
    # anchors / points (RetinaNet, FCOS)
    class_reduction: Literal["sum", "mean"] = "sum"  # the KL summed over classes, or that sum / classes


def _mean_over(values: Tensor, keep: Tensor, anchor: Tensor) -> Tensor:
    """Mean of ``values`` where ``keep``; an empty selection gives a graph-connected 0."""
    keep = keep.float()
    return (values * keep).sum() / keep.sum().clamp(min=1.0) + graph_zero([anchor])


def roi_kd(teacher: Taps, student: Taps, temperature: float, samples: str = "auto", class_reduction: str = "sum",
           weights: Tensor | None = None, method: str = "kd") -> Tensor:
    """Faster R-CNN ``kd_cls`` before its weight: the mean over the kept sampled RoIs (``samples``: all, or
    ``positive``) of the softmax KL times T^2, the softmax at temperature T being Eq. 1 of the paper (module
    doc).

    ``weights``: (R,) per-RoI constants multiplying each RoI's KL (``kd_proto``: the sigma of a positive RoI's
    instance, 1 for negatives); the mean still divides by the number of kept RoIs. None = 1 (vanilla KD).
    """
    zs, zt = check_logits(teacher, student, "class_logits", "roi_outputs", method)
    if student.roi_labels is None:
        raise ValueError(f"{method}: the student taps have no roi_labels")
    kl = softmax_kl(zs, zt, temperature)
    if class_reduction == "mean":
        kl = kl / zs.shape[1]
    if weights is not None:
        if weights.shape != kl.shape:
            raise ValueError(f"{method}: {tuple(weights.shape)} RoI weights for {kl.shape[0]} RoIs")
        kl = weights * kl
    labels = torch.cat(student.roi_labels)
    keep = labels > 0 if samples == "positive" else labels >= 0
    return _mean_over(kl, keep, zs)


def dense_kd(teacher: Taps, student: Taps, temperature: float, samples: str = "auto", class_reduction: str = "sum",
             weights: Tensor | None = None, method: str = "kd", kl: str = "sigmoid") -> Tensor:
    """RetinaNet / FCOS ``kd_cls`` before its weight: the mean over the kept anchors / points (``samples``:
    the positives ``matched_idxs >= 0``, or ``all``) of the per-class sigmoid KL times T^2 (module doc): Eq. 1
    of the paper with two outcomes per class, sigmoid(z / T), in place of the softmax over classes.

    ``weights``: (N, A) per-anchor constants multiplying each anchor's KL (``kd_proto``: the sigma of a
    positive's matched instance, 1 elsewhere); the mean still divides by the number of kept anchors.
    None = 1 (vanilla KD).

    ``kl: softmax`` (the global-knowledge authors' one-stage code): the softmax KL over the C class logits
    1..C of a row instead of the per-class sigmoid KL; ``class_reduction: mean`` divides it by C.
    """
    zs, zt = check_logits(teacher, student, "cls_logits", "dense_outputs", method)
    if student.matched_idxs is None:
        raise ValueError(f"{method}: the student taps have no matched_idxs")
    matched = torch.stack(student.matched_idxs)  # (N, A)
    if matched.shape != zs.shape[:2]:
        raise ValueError(
            f"{method}: matched_idxs {tuple(matched.shape)} do not match cls_logits {tuple(zs.shape)}"
        )
    if weights is not None and weights.shape != matched.shape:
        raise ValueError(f"{method}: anchor weights {tuple(weights.shape)} != matched_idxs {tuple(matched.shape)}")
    keep = torch.ones_like(matched, dtype=torch.bool) if samples == "all" else matched >= 0
    # select first: the dense (N, A, C) KL would be mostly thrown away; column 0 is never a class
    if kl == "softmax":
        kl_rows = softmax_kl(zs[keep][:, 1:], zt[keep][:, 1:], temperature)  # (P,)
        kl_rows = kl_rows / (zs.shape[-1] - 1) if class_reduction == "mean" else kl_rows
    else:
        per_class = sigmoid_kl(zs[keep][:, 1:], zt[keep][:, 1:], temperature)  # (P, C)
        kl_rows = per_class.mean(dim=1) if class_reduction == "mean" else per_class.sum(dim=1)
    if weights is not None:
        kl_rows = weights[keep] * kl_rows
    return kl_rows.sum() / max(kl_rows.shape[0], 1) + graph_zero([zs])


class KD(Distiller):
    """Temperature-softened KL between teacher and student classification outputs (Eq. 1 softening, T^2
    scaling of Sec. 2; module docstring)."""

    name = "kd"

    Options = KDOptions

    def request(self) -> TapRequest:
        if self.arch == "faster_rcnn":
            return TapRequest(features=False, roi_outputs=True)
        return TapRequest(features=False, dense_outputs=True)

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        o = self.opts
        term = roi_kd if self.arch == "faster_rcnn" else dense_kd
        return {"kd_cls": o.weight * term(teacher, student, o.temperature, o.samples, o.class_reduction)}
