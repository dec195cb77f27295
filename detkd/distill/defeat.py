"""DeFeat: distillation via decoupled features (Guo et al., "Distilling Object Detectors via Decoupled
Features", CVPR 2021, https://arxiv.org/abs/2103.14475).

Two decoupled parts, each with its own weights, from the paper's method section (decoupled feature
distillation on the neck, decoupled distillation of the RoI classification). Equation numbers are not
cited (they could not be checked against the paper's text): the terms are written out below and follow
the normalisation of the authors' released code:

1. Neck (FPN) features, split by a binary mask M of the ground-truth boxes rasterised on every level
   (:func:`detkd.distill.masks.box_masks`; padding of the batch counts as background):

       defeat_fg = fg_weight * mean_l  sum M_l (A_l(S_l) - T_l)^2 / (2 * count(M_l))
       defeat_bg = bg_weight * mean_l  sum (1 - M_l) (A_l(S_l) - T_l)^2 / (2 * count(1 - M_l))

   Counts are taken over the batch and channels, i.e. each term is half the mean squared error inside
   (outside) the boxes; this is the normalisation of the authors' released code, and their released
   Faster R-CNN VOC config (``configs/kd_faster_rcnn/voc_stu_faster_rcnn_r50_decouple_neck.py``) sets the
   weights 3 and 12 (background four times the foreground) with a 3x3 convolution adapter, our defaults.
   A level without any foreground (or background) cell contributes 0.

2. Faster R-CNN only: decoupled RoI distillation on the classification head. The teacher's box head runs
   on the student's sampled RoIs (``request().roi_outputs``); per RoI the softened KL(teacher || student)
   over the num_classes + 1 softmax times T^2 (:func:`detkd.distill.losses.softmax_kl`), averaged
   separately over positive RoIs (``roi_labels > 0``) and negative RoIs (``roi_labels == 0``):

       defeat_roi_fg = roi_fg_weight * mean_{positive RoIs} KL_T,  defeat_roi_bg = roi_bg_weight * mean_{neg} KL_T

   Defaults (weights 2 and 2, T = 1) are those of the same released config. RetinaNet and FCOS get the
   feature part only (the paper's one-stage experiments distil the neck).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from detkd.distill.adapters import build_adapters
from detkd.distill.base import Distiller, opt
from detkd.distill.checks import check_adapters, check_logits, check_pyramids
from detkd.distill.losses import graph_zero, softmax_kl
from detkd.distill.masks import box_masks
from detkd.taps import TapRequest, Taps


@dataclass
class DeFeatOptions:
    fg_weight: float = opt(3.0, ge=0)  # feature loss inside the boxes (authors' VOC config)
    bg_weight: float = opt(12.0, ge=0)  # feature loss outside the boxes
    adapter: Literal["conv1x1", "conv3x3", "identity"] = "conv3x3"  # student to teacher width
    roi: bool = True  # Faster R-CNN: also the decoupled RoI classification KD
    roi_fg_weight: float = opt(2.0, ge=0)  # RoI KD on positive RoIs
    roi_bg_weight: float = opt(2.0, ge=0)  # RoI KD on negative RoIs
    temperature: float = opt(1.0, gt=0)  # T of the RoI KD


def decoupled_feature_loss(adapters: nn.ModuleList, teacher: Taps, student: Taps, masks: list[Tensor],
                           weights: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Part 1 of the module doc before its weights (the paper's decoupled neck-feature loss, equation number
    not confirmed): the foreground and background terms, each averaged over the levels.

    ``masks``: per level the (N, 1, H, W) 0/1 box coverage (:func:`detkd.distill.masks.box_masks`); it sets
    both counts and the background. ``weights``: per level (N, 1, H, W) per-cell foreground weights, e.g. a
    per-box weight rasterised by :func:`detkd.distill.masks.weighted_box_mask` (``defeat_proto``); None =
    the mask itself (DeFeat).
    """
    fg_terms, bg_terms = [], []
    for level, (adapter, fs, ft, mask) in enumerate(zip(adapters, student.features, teacher.features, masks)):
        sq = (adapter(fs).float() - ft.detach().float()) ** 2  # (N, C, H, W)
        channels = sq.shape[1]
        fg_count = mask.sum() * channels
        bg_count = (1.0 - mask).sum() * channels
        fg_mask = mask if weights is None else weights[level]
        fg_terms.append((sq * fg_mask).sum() / (2.0 * fg_count).clamp(min=1.0))
        bg_terms.append((sq * (1.0 - mask)).sum() / (2.0 * bg_count).clamp(min=1.0))
    return torch.stack(fg_terms).mean(), torch.stack(bg_terms).mean()


def decoupled_roi_kd(teacher: Taps, student: Taps, temperature: float, method: str,
                     weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean softened KL over the student's positive and over its negative sampled RoIs: part 2 of the module
    doc (the paper's decoupled RoI distillation, equation number not confirmed).

    ``weights``: (R,) per-RoI constants multiplying the KL of the positive RoIs (``defeat_proto``: the sigma
    of each RoI's instance); the means still divide by the number of RoIs. None = 1 (DeFeat).
    """
    # the teacher's box head runs on the student's RoIs, so the logits have the same rows
    zs, zt = check_logits(teacher, student, "class_logits", "roi_outputs", method)
    if student.roi_labels is None:
        raise ValueError(f"{method}: the student taps have no roi_labels (not a Faster R-CNN?)")
    labels = torch.cat(student.roi_labels)
    kl = softmax_kl(zs, zt, temperature)  # (R,)
    if weights is not None and weights.shape != kl.shape:
        raise ValueError(f"{method}: {tuple(weights.shape)} RoI weights for {kl.shape[0]} RoIs")
    zero = graph_zero([zs])
    pos = (labels > 0).float()
    neg = (labels == 0).float()
    fg_kl = kl if weights is None else weights * kl
    fg = (fg_kl * pos).sum() / pos.sum().clamp(min=1.0) + zero
    bg = (kl * neg).sum() / neg.sum().clamp(min=1.0) + zero
    return fg, bg


def defeat_setup(opts: DeFeatOptions, teacher_channels: list[int], student_channels: list[int], arch: str,
                 method: str) -> tuple[nn.ModuleList, bool]:
    """DeFeat's set-up, shared with ``defeat_proto``: one adapter per level, and whether the RoI terms run
    (``roi`` and a Faster R-CNN student)."""
    adapters = build_adapters(student_channels, teacher_channels, opts.adapter, where=f"{method}.options.adapter")
    return adapters, opts.roi and arch == "faster_rcnn"


def defeat_request(use_roi: bool) -> TapRequest:
    return TapRequest(features=True, roi_outputs=use_roi)


class DeFeat(Distiller):
    """Decoupled foreground / background feature imitation, plus decoupled RoI KD on Faster R-CNN (parts 1
    and 2 of the module docstring)."""

    name = "defeat"

    Options = DeFeatOptions

    def __init__(self, opts: DeFeatOptions, teacher_channels: list[int], student_channels: list[int],
                 arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        self.adapters, self.use_roi = defeat_setup(opts, teacher_channels, student_channels, arch, self.name)

    def request(self) -> TapRequest:
        return defeat_request(self.use_roi)

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        check_pyramids(teacher, student, "defeat")
        check_adapters(self.adapters, student, "defeat")
        masks = box_masks(student, [t["boxes"] for t in student.targets])
        fg, bg = decoupled_feature_loss(self.adapters, teacher, student, masks)
        out = {"defeat_fg": self.opts.fg_weight * fg, "defeat_bg": self.opts.bg_weight * bg}
        if self.use_roi:
            fg, bg = decoupled_roi_kd(teacher, student, self.opts.temperature, "defeat")
            out["defeat_roi_fg"] = self.opts.roi_fg_weight * fg
            out["defeat_roi_bg"] = self.opts.roi_bg_weight * bg
        return out
