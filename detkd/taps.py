"""Taps: the one place that opens a torchvision detector.

A distiller needs more than a detector's losses: pyramid features, proposals, sampled RoIs, logits,
anchors and their matches. :func:`tap_student` runs a detector in training mode on an already
transformed batch, returns its detection losses and a :class:`Taps` record of its internals;
:func:`tap_teacher` runs a frozen teacher on the same batch (eval mode, ``torch.no_grad``) and fills
only what the distiller asked for (:class:`TapRequest`). Everything calls torchvision's own parts
(transform, backbone, rpn, roi_heads, head, anchor generator, matcher); nothing is re-implemented
except where torchvision computes a quantity inline and does not return it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class TapRequest:
    """What a distiller needs from the teacher (the student always records everything it computes)."""

    features: bool = True
    roi_outputs: bool = False  # two-stage: teacher box head on the student's sampled RoIs
    dense_outputs: bool = False  # one-stage: teacher head classification / regression outputs
    proposals: bool = False  # two-stage: teacher RPN proposals

    def merge(self, other: TapRequest) -> TapRequest:
        return TapRequest(**{k: getattr(self, k) or getattr(other, k) for k in self.__dataclass_fields__})


@dataclass
class Taps:
    """What one detector computed on one transformed batch.

    Coordinates are in the transformed (resized, un-padded) image frame: the frame of ``targets``.
    Optional fields are ``None`` when the detector family has no such quantity or it was not requested.
    """

    arch: str  # "faster_rcnn" | "retinanet" | "fcos"
    features: list[Tensor]  # pyramid maps (N, C, H, W), finest level first
    level_names: list[str]  # FPN keys in the same order ("0", "1", "2", "3", "pool" / "p6", "p7")
    strides: list[int]  # padded image size / feature size per level
    image_sizes: list[tuple[int, int]]  # (h, w) of each resized, un-padded image
    batch_shape: tuple[int, int]  # (H, W) of the padded batch tensor
    targets: list[dict[str, Tensor]]  # transformed targets: "boxes" (M, 4) xyxy, "labels" (M,)
    num_classes: int  # foreground classes: labels are 1..num_classes and every head has num_classes + 1
    # outputs (index 0 = background), the convention of torchvision's own COCO models

    # --- two-stage (Faster R-CNN)
    proposals: list[Tensor] | None = None  # RPN proposals per image (P_i, 4)
    rois: list[Tensor] | None = None  # RoIs sampled for the box head per image (R_i, 4)
    roi_labels: list[Tensor] | None = None  # assigned class per RoI (R_i,), 0 = background
    roi_matched_gt: list[Tensor] | None = None  # index of the matched ground truth per RoI (R_i,)
    roi_regression_targets: list[Tensor] | None = None  # (R_i, 4) encoded targets
    roi_features: Tensor | None = None  # box head input after MultiScaleRoIAlign (sum R_i, C, s, s)
    roi_embeddings: Tensor | None = None  # box head output (sum R_i, representation size)
    class_logits: Tensor | None = None  # (sum R_i, num_classes + 1), column 0 = background
    box_deltas: Tensor | None = None  # (sum R_i, (num_classes + 1) * 4)

    # --- one-stage (RetinaNet, FCOS)
    anchors: list[Tensor] | None = None  # per image (A, 4); FCOS: the anchor boxes around each point
    num_anchors_per_level: list[int] | None = None  # A split by level (per image)
    cls_logits: Tensor | None = None  # (N, A, num_classes + 1) sigmoid logits; column 0 never positive
    bbox_regression: Tensor | None = None  # (N, A, 4)
    bbox_ctrness: Tensor | None = None  # FCOS only: (N, A, 1)
    matched_idxs: list[Tensor] | None = None  # per image (A,): gt index >= 0, -1 background, -2 ignore

    extras: dict[str, object] = field(default_factory=dict)


def box_levels(boxes: Tensor, num_levels: int, first_level: int, canonical_scale: float = 224.0,
               canonical_level: int = 4) -> Tensor:
    """Pyramid level index (0 = finest) of each box by the FPN paper's rule (Eq. 1 of Lin et al.):
    k = floor(k0 + log2(sqrt(w h) / 224)), clamped to the available levels ``first_level ..``."""
    import torch

    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)
    k = torch.floor(canonical_level + torch.log2(torch.sqrt(wh[:, 0] * wh[:, 1]) / canonical_scale) + 1e-6)
    k = k.clamp(first_level, first_level + num_levels - 1)
    return (k - first_level).to(torch.int64)


def pool_boxes(taps: Taps, boxes: list[Tensor], output_size: int = 7, sampling_ratio: int = 2,
               levels: list[Tensor] | None = None) -> Tensor:
    """RoIAlign of arbitrary per-image boxes (transformed frame) on their canonical pyramid level.

    Returns (sum M_i, C, output_size, output_size) in the order of the concatenated boxes. ``levels``
    overrides the level of each box (0 = ``taps.features[0]``). Works for teacher and student alike, so
    the same boxes are pooled from the matching level of each pyramid.
    """
    import math

    import torch
    from torchvision.ops import roi_align

    feats = taps.features
    c = feats[0].shape[1]
    total = sum(int(b.shape[0]) for b in boxes)
    out = feats[0].new_zeros((total, c, output_size, output_size))
    if total == 0:
        return out
    rois = torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)])
    if levels is None:
        first = int(round(math.log2(taps.strides[0])))
        lv = box_levels(rois[:, 1:], len(feats), first)
    else:
        lv = torch.cat(levels).to(torch.int64)
    for li, f in enumerate(feats):
        idx = torch.nonzero(lv == li).squeeze(1)
        if idx.numel() == 0:
            continue
        out[idx] = roi_align(f, rois[idx].to(f.dtype), output_size, spatial_scale=1.0 / taps.strides[li],
                             sampling_ratio=sampling_ratio, aligned=False).to(out.dtype)
    return out
