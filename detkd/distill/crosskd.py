"""CrossKD: the student's head features continue through the teacher's head, and those cross-head
predictions mimic the teacher's (Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object
Detection", CVPR 2024, https://arxiv.org/abs/2306.11369; code: github.com/jbwang1997/CrossKD).

Method (paper Sec. 3, "Cross-head knowledge distillation"; the equation numbers could not be checked from
here, so the formulas are written out). A dense head has two towers of n conv blocks (n = 4) and predictor
convs. Let f_s^i be the output of the student's i-th conv block (i = ``cross_at``), C_t^{i+1..n} the
teacher's remaining blocks and predictor. The cross-head prediction is

    p_hat_s = C_t^{i+1..n}(f_s^i)

computed for the classification and the regression tower alike, and the distillation loss is

    L_CrossKD = 1 / |S| * sum_r S(r) * D_pred(p_hat_s(r), p_t(r))

over the head's locations / anchors r, p_t = the teacher's own predictions. Classification: D_pred is the
quality-focal form on the sigmoid scores (KD-QFL), per class c of a location,

    D_cls = BCE(sigmoid(z_hat_s,c), sigmoid(z_t,c)) * |sigmoid(z_hat_s,c) - sigmoid(z_t,c)|^beta

summed over the classes, S(r) = 1 at every location that is not ignored by the student's assignment
(RetinaNet's between-threshold anchors, matched index -2). Regression: D_pred is the detector's box loss on
the boxes decoded from both predictions (GIoU loss for RetinaNet, IoU loss -log IoU for FCOS, as the
authors' configs), S(r) = the teacher's largest class score at r (locations where the teacher sees an
object count). |S| = the number of positive anchors of the student's assignment (at least 1), the
``avg_factor`` of the authors' code. The student's own head is trained by the detection loss only: the
CrossKD gradient enters the student at f_s^i and goes back through its first i blocks, FPN and backbone;
the teacher is frozen (its parameters get nothing) but passes the gradient through.

Defaults: the authors' released configs (``reused_teacher_head_idx``, ``kd_cfg``), since the full text of
the paper's position ablation could not be read from here: RetinaNet ``cross_at`` 3 (the student's first
three convs feed the teacher's fourth conv and predictors), weights 1 / 1, GIoU loss; FCOS ``cross_at`` 2,
weights 0.4 / 0.75, IoU loss; beta 1. Where the authors' code does something the paper does not say, detkd
follows the code: f_s^i is taken *before* the block's ReLU, then the teacher's ReLU and blocks i+1..n
follow.

Differences: the authors' code also standardises f_s^i per channel over batch and positions and rescales
it to the teacher's f_t^i statistics; that is ``align_scale: true`` here, off by default: the paper does
not describe it, and it divides by the student's per-channel standard deviation, which is ~0 on the
1 x 1 pyramid levels of small (digits) images, where a tiny FCOS pair diverged in its second step. The
paper uses same-width heads; when the widths differ a 1x1 conv (``adapter``, one per tower, shared by
the levels) maps the student's features to the teacher's width. FCOS's centerness output of the cross
head is not distilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from detkd.distill.adapters import build_adapters, resolve_adapter
from detkd.distill.base import Distiller, opt
from detkd.distill.losses import graph_zero, standardize
from detkd.taps import TapRequest, Taps, decode_boxes

# the authors' configs per head type: cross_at, cls weight, box weight, box loss
AUTHORS = {"retinanet": (3, 1.0, 1.0, "giou"), "fcos": (2, 0.4, 0.75, "iou")}


@dataclass
class CrossKDOptions:
    cross_at: int | None = opt(None, ge=0, le=4)  # student head conv block (1..4) whose output, before its
    # ReLU, enters the teacher's head; 0 = the FPN features; None = the authors': 3 for RetinaNet, 2 for FCOS
    # (torchvision's towers have 4 blocks; the models' own depth is checked at start-up)
    cls_weight: float | None = opt(None, ge=0)  # weight of crosskd_cls; None = 1.0 (RetinaNet), 0.4 (FCOS)
    box_weight: float | None = opt(None, ge=0)  # weight of crosskd_box; None = 1.0 (RetinaNet), 0.75 (FCOS)
    box_loss: Literal["auto", "giou", "iou", "l1"] = "auto"  # on the decoded boxes; auto: giou for
    # RetinaNet, iou (-log IoU) for FCOS, as the authors; l1: summed |x1 y1 x2 y2 differences|
    beta: float = opt(1.0, ge=0)  # focal exponent of the quality-focal KD loss, |p_s - p_t|^beta
    align_scale: bool = False  # standardise the student's features per channel and give them the teacher's
    # mean / std before the teacher's layers (the authors' code, not the paper; off: it divides by the
    # student's per-channel std, ~0 on 1 x 1 levels of small images, and diverged there)
    adapter: Literal["auto", "conv1x1", "conv3x3", "identity"] = "auto"  # maps the student's head width to
    # the teacher's; auto: a 1x1 conv only where the widths differ (the paper has equal widths)
    eps: float = opt(1e-6, ge=0)  # added to standard deviations and IoUs


def quality_focal_kd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0) -> Tensor:
    """Element-wise KD-QFL: BCE(sigmoid(s), sigmoid(t)) * |sigmoid(s) - sigmoid(t)|^beta; teacher detached."""
    t = teacher_logits.detach().float().sigmoid()
    s = student_logits.float()
    bce = F.binary_cross_entropy_with_logits(s, t, reduction="none")
    return bce * (s.sigmoid() - t).abs().pow(beta)


def box_distance(student_boxes: Tensor, teacher_boxes: Tensor, kind: str, eps: float = 1e-6) -> Tensor:
    """(..., 4) xyxy -> (...,) per-box loss: ``giou`` 1 - GIoU, ``iou`` -log IoU, ``l1`` summed |diff|."""
    s, t = student_boxes.float(), teacher_boxes.detach().float()
    if kind == "giou":
        return generalized_box_iou_loss(s, t, reduction="none", eps=eps)
    if kind == "l1":
        return (s - t).abs().sum(dim=-1)
    lt = torch.max(s[..., :2], t[..., :2])
    rb = torch.min(s[..., 2:], t[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_s = (s[..., 2:] - s[..., :2]).clamp(min=0).prod(dim=-1)
    area_t = (t[..., 2:] - t[..., :2]).clamp(min=0).prod(dim=-1)
    iou = inter / (area_s + area_t - inter + eps)
    return -iou.clamp(min=eps).log()


def crosskd_losses(cross_logits: Tensor, teacher_logits: Tensor, cross_boxes: Tensor, teacher_boxes: Tensor,
                   matched: Tensor, beta: float = 1.0, box_loss: str = "giou", eps: float = 1e-6
                   ) -> tuple[Tensor, Tensor]:
    """The two CrossKD terms before their weights (module docstring), on (N, A, C + 1) logits (column 0,
    background, is never a class and left out), (N, A, 4) boxes and the student's (N, A) matches."""
    valid = (matched != -2).float()  # RetinaNet's ignored anchors count in neither term
    npos = (matched >= 0).sum().clamp(min=1).float()
    cls = quality_focal_kd(cross_logits[..., 1:], teacher_logits[..., 1:], beta).sum(dim=-1)
    cls_term = (cls * valid).sum() / npos
    weight = teacher_logits[..., 1:].detach().float().sigmoid().max(dim=-1).values * valid
    box = box_distance(cross_boxes, teacher_boxes, box_loss, eps)
    box_term = (box * weight).sum() / npos
    return cls_term, box_term


def align_scale(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """``student`` standardised per channel over batch and positions, then given the per-channel mean and
    (Bessel) standard deviation of ``teacher`` (detached), as the authors' ``align_scale``."""
    t = teacher.detach().float()
    mean = t.mean(dim=(0, 2, 3), keepdim=True)
    std = t.var(dim=(0, 2, 3), keepdim=True, correction=1 if t[:, 0].numel() > 1 else 0).sqrt()
    return standardize(student, "batch", eps) * std + mean


class CrossKD(Distiller):
    """``crosskd_cls + crosskd_box``: the teacher's head run on the student's head features mimics the teacher."""

    name = "crosskd"
    Options = CrossKDOptions
    archs = ("retinanet", "fcos")
    why = ("it runs the teacher's head layers on the student's head features, so both must have the same "
           "RetinaNet or FCOS head")

    def __init__(self, opts: CrossKDOptions, teacher_channels: list[int], student_channels: list[int],
                 arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        cross_at, cls_w, box_w, box_loss = AUTHORS[arch]
        self.cross_at = cross_at if opts.cross_at is None else opts.cross_at
        self.cls_weight = cls_w if opts.cls_weight is None else opts.cls_weight
        self.box_weight = box_w if opts.box_weight is None else opts.box_weight
        self.box_loss = box_loss if opts.box_loss == "auto" else opts.box_loss
        sc, tc = [student_channels[0]], [teacher_channels[0]]  # heads are as wide as the FPN
        kind = resolve_adapter(opts.adapter, sc, tc)
        self.cls_adapter = build_adapters(sc, tc, kind, where="crosskd.options.adapter")[0]
        self.reg_adapter = build_adapters(sc, tc, kind, where="crosskd.options.adapter")[0]

    def request(self) -> TapRequest:
        return TapRequest(features=False, dense_outputs=True, head_layer=self.cross_at)

    def cross_head(self, teacher: Taps, student: Taps) -> dict[str, Tensor]:
        """The teacher's head on the student's (adapted, aligned) head features: the cross-head outputs."""
        if teacher.head_tail is None or student.head_cls_features is None or teacher.head_cls_features is None:
            raise ValueError("crosskd: the taps hold no head features / teacher head tail (request head_layer)")
        if student.head_layer != self.cross_at:  # merged requests keep one head layer: a second crosskd differs
            raise ValueError(f"crosskd: the taps recorded head layer {student.head_layer}, this method's "
                             f"cross_at is {self.cross_at} (one crosskd per run, or the same cross_at)")
        cls_in = [self.cls_adapter(f) for f in student.head_cls_features]
        reg_in = [self.reg_adapter(f) for f in student.head_reg_features]
        if self.opts.align_scale:
            cls_in = [align_scale(s, t, self.opts.eps) for s, t in zip(cls_in, teacher.head_cls_features)]
            reg_in = [align_scale(s, t, self.opts.eps) for s, t in zip(reg_in, teacher.head_reg_features)]
        return teacher.head_tail(cls_in, reg_in)

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        cross = self.cross_head(teacher, student)
        if cross["cls_logits"].shape != teacher.cls_logits.shape:
            raise ValueError(f"crosskd: cross-head logits {tuple(cross['cls_logits'].shape)} != teacher "
                             f"{tuple(teacher.cls_logits.shape)} (different anchors per location?)")
        matched = torch.stack(student.matched_idxs)
        cls_term, box_term = crosskd_losses(
            cross["cls_logits"], teacher.cls_logits, decode_boxes(teacher, cross["bbox_regression"]),
            decode_boxes(teacher, teacher.bbox_regression), matched, self.opts.beta, self.box_loss, self.opts.eps,
        )
        anchor = graph_zero([cross["cls_logits"], cross["bbox_regression"]])
        return {"crosskd_cls": self.cls_weight * cls_term + anchor, "crosskd_box": self.box_weight * box_term + anchor}
