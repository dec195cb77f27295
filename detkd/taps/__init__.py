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

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

from detkd.data import kept_boxes, scale_image
from detkd.models.build import detector_arch
from detkd.taps.head_walk import head_tail, run_head


@dataclass
class TapRequest:
    """What a distiller needs from the teacher (the student always records everything it computes)."""

    features: bool = True
    roi_outputs: bool = False  # two-stage: teacher box head on the student's sampled RoIs
    dense_outputs: bool = False  # one-stage: teacher head classification / regression outputs
    proposals: bool = False  # two-stage: teacher RPN proposals
    head_layer: int = -1  # one-stage: >= 0 records both heads' subnet features after conv ``head_layer``
    # (:func:`run_head`) and gives the teacher taps ``head_tail`` (CrossKD); -1 = not needed

    def merge(self, other: TapRequest) -> TapRequest:
        out = {k: getattr(self, k) or getattr(other, k) for k in self.__dataclass_fields__ if k != "head_layer"}
        return TapRequest(**out, head_layer=max(self.head_layer, other.head_layer))


@dataclass
class Taps:
    """What one detector computed on one transformed batch.

    Coordinates are in the transformed (resized, un-padded) image frame: the frame of ``targets``.
    Optional fields are ``None`` when the detector family has no such quantity or it was not requested.
    """

    arch: str  # "faster_rcnn" | "retinanet" | "fcos"
    features: list[Tensor]  # pyramid maps (N, C, H, W), finest level first
    level_names: list[str]  # FPN keys in the same order ("0", "1", "2", "3", "pool" / "p6", "p7")
    strides: list[int]  # padded image size / feature size per level, rounded to a power of two
    image_sizes: list[tuple[int, int]]  # (h, w) of each resized, un-padded image
    batch_shape: tuple[int, int]  # (H, W) of the padded batch tensor
    targets: list[dict[str, Tensor]]  # transformed targets: "boxes" (M, 4) xyxy, "labels" (M,)
    num_classes: int  # foreground classes: labels are 1..num_classes and every head has num_classes + 1
    # outputs (index 0 = background), the convention of torchvision's own COCO models

    # --- two-stage (Faster R-CNN)
    proposals: list[Tensor] | None = None  # RPN proposals per image (P_i, 4), train / eval top-n by mode
    rois: list[Tensor] | None = None  # RoIs sampled for the box head per image (R_i, 4)
    roi_labels: list[Tensor] | None = None  # assigned class per RoI (R_i,), 0 = background
    roi_matched_gt: list[Tensor] | None = None  # index of the matched ground truth per RoI (R_i,); 0 for
    # background RoIs (torchvision clamps it), so read it only where roi_labels > 0
    roi_regression_targets: list[Tensor] | None = None  # (R_i, 4) encoded targets
    roi_features: Tensor | None = None  # box head input after MultiScaleRoIAlign (sum R_i, C, s, s)
    roi_embeddings: Tensor | None = None  # box head output (sum R_i, representation size)
    class_logits: Tensor | None = None  # (sum R_i, num_classes + 1), column 0 = background
    box_deltas: Tensor | None = None  # (sum R_i, (num_classes + 1) * 4)

    # --- one-stage (RetinaNet, FCOS)
    anchors: list[Tensor] | None = None  # per image (A, 4); FCOS: boxes around each point; Faster R-CNN: RPN anchors
    num_anchors_per_level: list[int] | None = None  # A split by level (per image)
    cls_logits: Tensor | None = None  # (N, A, num_classes + 1) sigmoid logits; column 0 never positive
    bbox_regression: Tensor | None = None  # (N, A, 4)
    bbox_ctrness: Tensor | None = None  # FCOS only: (N, A, 1)
    matched_idxs: list[Tensor] | None = None  # per image (A,): gt index >= 0, -1 background, -2 ignore
    box_coder: object | None = None  # the head's own box coder (decode_boxes)
    # head subnet features, per level (N, C, H, W), when TapRequest.head_layer >= 0 (see run_head)
    head_layer: int | None = None
    head_cls_features: list[Tensor] | None = None
    head_reg_features: list[Tensor] | None = None
    # teacher only (head_layer >= 0): runs the teacher's head from head_layer on given per-level features
    # (cls, reg), with gradients to those features; returns head outputs like cls_logits / bbox_regression
    head_tail: Callable[[list[Tensor], list[Tensor]], dict[str, Tensor]] | None = None

    extras: dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Helpers


def num_classes_of(model: nn.Module) -> int:
    """Foreground classes of a torchvision detector (its heads have this + 1 outputs)."""
    arch = detector_arch(model)
    if arch == "faster_rcnn":
        return int(model.roi_heads.box_predictor.cls_score.out_features) - 1
    return int(model.head.classification_head.num_classes) - 1


def _strides(features: list[Tensor], batch_shape: tuple[int, int]) -> list[int]:
    # padded size / map size, rounded to a power of two (as MultiScaleRoIAlign infers its scales); the
    # larger of the two ratios, so a map that collapsed to 1 px in one dimension still reads right
    out = []
    for f in features:
        ratio = max(batch_shape[0] / f.shape[-2], batch_shape[1] / f.shape[-1])
        out.append(int(2 ** round(math.log2(ratio))))
    return out


def _new_taps(model: nn.Module, arch: str, features: dict[str, Tensor], images: ImageList,
              targets: list[dict[str, Tensor]] | None) -> Taps:
    feats = list(features.values())
    batch_shape = (int(images.tensors.shape[-2]), int(images.tensors.shape[-1]))
    return Taps(
        arch=arch,
        features=feats,
        level_names=list(features.keys()),
        strides=_strides(feats, batch_shape),
        image_sizes=[(int(h), int(w)) for h, w in images.image_sizes],
        batch_shape=batch_shape,
        targets=targets if targets is not None else [],
        num_classes=num_classes_of(model),
    )


def _num_anchors_per_level(features: list[Tensor], cls_logits: Tensor) -> list[int]:
    hw = [int(f.shape[-2] * f.shape[-1]) for f in features]
    per_location = int(cls_logits.shape[1]) // sum(hw)
    return [n * per_location for n in hw]


def select_levels(taps: Taps, indices: list[int]) -> Taps:
    """A copy of ``taps`` restricted to the pyramid levels ``indices`` (in that order; an index may repeat):
    features, level names and strides, and the per-level parts of the anchors and the dense head outputs,
    which are concatenated level by level. Everything else (losses, RoIs, proposals) is shared as is.
    This is how teacher and student levels of equal stride are lined up (``detkd.models.pair_levels``)."""
    out = dataclasses.replace(
        taps,
        features=[taps.features[i] for i in indices],
        level_names=[taps.level_names[i] for i in indices],
        strides=[taps.strides[i] for i in indices],
    )
    per_level = taps.num_anchors_per_level
    if per_level is None:
        return out
    per_level = [int(n) for n in per_level]

    def pick(t: Tensor, dim: int) -> Tensor:
        chunks = t.split(per_level, dim=dim)
        return torch.cat([chunks[i] for i in indices], dim=dim)

    out.num_anchors_per_level = [per_level[i] for i in indices]
    for name in ("head_cls_features", "head_reg_features"):
        value = getattr(taps, name)
        if value is not None:
            setattr(out, name, [value[i] for i in indices])
    if taps.anchors is not None:
        out.anchors = [pick(a, 0) for a in taps.anchors]
    if taps.matched_idxs is not None:
        out.matched_idxs = [pick(m, 0) for m in taps.matched_idxs]
    for name in ("cls_logits", "bbox_regression", "bbox_ctrness"):
        value = getattr(taps, name)
        if value is not None:
            setattr(out, name, pick(value, 1))
    return out


# ----------------------------------------------------------------------------------------------------------
# Anchor matching (the one-stage detectors compute it inline inside compute_loss and do not return it)


def retinanet_matched_idxs(model: RetinaNet, anchors: list[Tensor],
                           targets: list[dict[str, Tensor]]) -> list[Tensor]:
    """RetinaNet's anchor assignment, as in ``RetinaNet.compute_loss``: the detector's own
    ``proposal_matcher`` on the IoU matrix; -1 background, -2 between thresholds (ignored)."""
    matched = []
    for anchors_i, t in zip(anchors, targets):
        if t["boxes"].numel() == 0:
            matched.append(torch.full((anchors_i.shape[0],), -1, dtype=torch.int64, device=anchors_i.device))
            continue
        matched.append(model.proposal_matcher(box_ops.box_iou(t["boxes"], anchors_i)))
    return matched


def fcos_matched_idxs(model: FCOS, anchors: list[Tensor], targets: list[dict[str, Tensor]],
                      num_anchors_per_level: list[int]) -> list[Tensor]:
    """FCOS's location assignment, as in ``FCOS.compute_loss`` (FCOS paper Sec. 2.2 with center sampling).

    A location (the center of its anchor box, side ``s`` = the level's anchor size) may take a ground
    truth box when (1) it lies within ``center_sampling_radius * s`` of the box center (Chebyshev
    distance), (2) it is inside the box, and (3) its largest distance to the box sides is in
    ``(4 s, 8 s)``, the range of its level (open below for the first level, above for the last). Among
    several candidates the smallest box wins; -1 = background.
    """
    matched = []
    for anchors_i, t in zip(anchors, targets):
        gt = t["boxes"]
        if gt.numel() == 0:
            matched.append(torch.full((anchors_i.shape[0],), -1, dtype=torch.int64, device=anchors_i.device))
            continue
        gt_centers = (gt[:, :2] + gt[:, 2:]) / 2  # (M, 2)
        centers = (anchors_i[:, :2] + anchors_i[:, 2:]) / 2  # (A, 2)
        sizes = anchors_i[:, 2] - anchors_i[:, 0]  # (A,)

        # (1) center sampling
        offset = (centers[:, None, :] - gt_centers[None, :, :]).abs().max(dim=2).values  # (A, M)
        ok = offset < model.center_sampling_radius * sizes[:, None]
        # (2) inside the box: left, top, right, bottom distances all positive
        x, y = centers[:, 0:1], centers[:, 1:2]  # (A, 1)
        x0, y0, x1, y1 = gt[None, :, 0], gt[None, :, 1], gt[None, :, 2], gt[None, :, 3]  # (1, M)
        sides = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)  # (A, M, 4)
        ok &= sides.min(dim=2).values > 0
        # (3) scale range of the location's level
        lower = sizes * 4
        lower[: num_anchors_per_level[0]] = 0
        upper = sizes * 8
        upper[-num_anchors_per_level[-1]:] = float("inf")
        reach = sides.max(dim=2).values
        ok &= (reach > lower[:, None]) & (reach < upper[:, None])

        # the smallest matching box: score = 1e8 - area where matched, 0 elsewhere
        areas = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
        score = ok.to(torch.float32) * (1e8 - areas[None, :])
        best, idx = score.max(dim=1)
        idx[best < 1e-5] = -1
        matched.append(idx)
    return matched


def match_anchors(model: nn.Module, anchors: list[Tensor], targets: list[dict[str, Tensor]],
                  num_anchors_per_level: list[int]) -> list[Tensor]:
    """Per-image ground-truth index of every anchor / location, by the detector's own rule."""
    arch = detector_arch(model)
    if arch == "retinanet":
        return retinanet_matched_idxs(model, anchors, targets)
    if arch == "fcos":
        return fcos_matched_idxs(model, anchors, targets, num_anchors_per_level)
    raise ValueError(f"match_anchors: {arch} has no dense anchor assignment")


# ----------------------------------------------------------------------------------------------------------
# Batch


def transform_batch(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
    """Run ``model.transform`` (normalise, resize, pad) on a batch, like the detector's own forward.

    ``images``: (3, H, W) uint8 (scaled to [0, 1] here) or float in [0, 1], moved to the model's device.
    ``targets``: dicts with ``boxes`` (M, 4) xyxy and ``labels`` (M,) in 1..num_classes; boxes flagged in
    an optional ``ignore`` entry are dropped, other entries are not passed on. Raises ``ValueError``
    naming the image for degenerate boxes or labels outside 1..num_classes.
    """
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"transform_batch: {len(images)} images but {len(targets)} targets")
    device = next(model.parameters()).device
    tensors = []
    for i, img in enumerate(images):
        if img.dtype == torch.uint8:
            img = scale_image(img, device)
        else:
            img = img.as_subclass(Tensor).to(device, non_blocking=True)  # tv_tensors.Image -> plain tensor
        if not img.is_floating_point():
            raise TypeError(f"transform_batch: image {i} has dtype {img.dtype}, expected uint8 or float")
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"transform_batch: image {i} has shape {tuple(img.shape)}, expected (3, H, W)")
        tensors.append(img)

    clean = None
    if targets is not None:
        num_classes = num_classes_of(model)
        clean = []
        for i, t in enumerate(targets):
            boxes = t["boxes"].as_subclass(Tensor).to(device=tensors[i].device, dtype=torch.float32)
            labels = t["labels"].as_subclass(Tensor).to(device=tensors[i].device, dtype=torch.int64)
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"transform_batch: target {i}: boxes {tuple(boxes.shape)} and labels "
                                 f"{tuple(labels.shape)} do not have shapes (M, 4) and (M,)")
            if "ignore" in t:
                keep = kept_boxes(t).to(boxes.device)
                boxes, labels = boxes[keep], labels[keep]
            bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if bad.any():
                raise ValueError(f"transform_batch: target {i} has a box with no area: "
                                 f"{boxes[bad][0].tolist()}")
            if labels.numel() and (labels.min() < 1 or labels.max() > num_classes):
                raise ValueError(f"transform_batch: target {i} has labels {labels.unique().tolist()}, "
                                 f"expected 1..{num_classes} (0 is background)")
            clean.append({"boxes": boxes, "labels": labels})
    return model.transform(tensors, clean)


def decode_boxes(taps: Taps, regression: Tensor) -> Tensor:
    """(N, A, 4) head regression outputs -> (N, A, 4) xyxy boxes on ``taps.anchors``, with the head's own
    box coder (RetinaNet: deltas on anchors; FCOS: side distances scaled by the anchor size)."""
    if taps.box_coder is None or taps.anchors is None:
        raise ValueError(f"decode_boxes: the {taps.arch} taps have no box coder / anchors (one-stage only)")
    if taps.arch == "fcos":
        return taps.box_coder.decode(regression, torch.stack(taps.anchors))
    return torch.stack([taps.box_coder.decode_single(r, a) for r, a in zip(regression, taps.anchors)])


def _box_coder(model: nn.Module) -> object:
    return model.head.box_coder if detector_arch(model) == "fcos" else model.head.regression_head.box_coder


# ----------------------------------------------------------------------------------------------------------
# Student


def tap_student(model: nn.Module, images: ImageList, targets: list[dict[str, Tensor]],
                request: TapRequest | None = None) -> tuple[dict[str, Tensor], Taps]:
    """The detector's training forward on a transformed batch, step by step through its own modules.

    Returns torchvision's loss dict (same keys and values as ``model(images, targets)`` for the same
    random state) and a :class:`Taps` with every field of the detector's family. ``request.head_layer >= 0``
    (one-stage) also records the head towers' features after that block (:func:`run_head`).
    """
    arch = detector_arch(model)
    if not model.training:
        raise ValueError("tap_student runs the training forward: call model.train() first")
    if targets is None:
        raise ValueError("tap_student needs targets (the training losses need ground truth)")
    features = model.backbone(images.tensors)
    taps = _new_taps(model, arch, features, images, targets)

    if arch == "faster_rcnn":
        proposals, rpn_losses = model.rpn(images, features, targets)
        rh = model.roi_heads
        rois, matched_gt, labels, regression_targets = rh.select_training_samples(list(proposals), targets)
        roi_features = rh.box_roi_pool(features, rois, images.image_sizes)
        embeddings = rh.box_head(roi_features)
        class_logits, box_deltas = rh.box_predictor(embeddings)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_deltas, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, **rpn_losses}
        # the RPN's anchors too (recomputed: rpn.forward does not return them), for anchor-based masks
        taps.anchors = model.rpn.anchor_generator(images, taps.features)
        taps.num_anchors_per_level = [f.shape[-2] * f.shape[-1] * a for f, a in
                                      zip(taps.features, model.rpn.anchor_generator.num_anchors_per_location())]
        taps.proposals = proposals
        taps.rois = rois
        taps.roi_labels = labels
        taps.roi_matched_gt = matched_gt
        taps.roi_regression_targets = regression_targets
        taps.roi_features = roi_features
        taps.roi_embeddings = embeddings
        taps.class_logits = class_logits
        taps.box_deltas = box_deltas
        return losses, taps

    feats = taps.features
    layer = request.head_layer if request is not None else -1
    if layer >= 0:
        head_outputs, taps.head_cls_features, taps.head_reg_features = run_head(model, feats, layer)
        taps.head_layer = layer
    else:
        head_outputs = model.head(feats)
    anchors = model.anchor_generator(images, feats)
    per_level = _num_anchors_per_level(feats, head_outputs["cls_logits"])
    matched = match_anchors(model, anchors, targets, per_level)
    losses = model.head.compute_loss(targets, head_outputs, anchors, matched)
    taps.anchors = anchors
    taps.num_anchors_per_level = per_level
    taps.cls_logits = head_outputs["cls_logits"]
    taps.bbox_regression = head_outputs["bbox_regression"]
    taps.bbox_ctrness = head_outputs.get("bbox_ctrness")
    taps.matched_idxs = matched
    taps.box_coder = _box_coder(model)
    return losses, taps


# ----------------------------------------------------------------------------------------------------------
# Teacher


def _check_request(arch: str, request: TapRequest, student: Taps | None) -> None:
    if arch != "faster_rcnn" and request.roi_outputs:
        raise ValueError(f"roi_outputs were requested from a {arch} teacher: only a Faster R-CNN teacher has "
                         f"a box head to run on RoIs")
    if arch != "faster_rcnn" and request.proposals:
        raise ValueError(f"proposals were requested from a {arch} teacher: only Faster R-CNN has an RPN")
    if arch == "faster_rcnn" and (request.dense_outputs or request.head_layer >= 0):
        raise ValueError("dense_outputs / head_layer were requested from a faster_rcnn teacher: only "
                         "RetinaNet / FCOS teachers have dense per-anchor outputs and head towers")
    if request.roi_outputs and (student is None or student.rois is None):
        raise ValueError("roi_outputs need the student's sampled RoIs: pass the taps of a Faster R-CNN "
                         "student (student.rois is None)")


def tap_teacher(model: nn.Module, images: ImageList, targets: list[dict[str, Tensor]] | None,
                request: TapRequest, student: Taps | None = None) -> Taps:
    """A frozen teacher on the student's transformed batch, in eval mode and without gradients.

    Computes the pyramid features always, and per ``request``: ``roi_outputs`` (Faster R-CNN: the
    teacher's RoI pooling, box head and predictor on ``student.rois``, with the student's RoI labels and
    matches copied), ``proposals`` (the teacher RPN's eval-mode proposals), ``dense_outputs`` (RetinaNet /
    FCOS: head outputs, anchors and, given targets, the teacher's own anchor matches). A module left in
    training mode is switched to eval for the call and restored after.
    """
    arch = detector_arch(model)
    _check_request(arch, request, student)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            features = model.backbone(images.tensors)
            taps = _new_taps(model, arch, features, images, targets)
            if arch == "faster_rcnn":
                _teacher_two_stage(model, images, features, request, student, taps)
            elif request.dense_outputs or request.head_layer >= 0:
                _teacher_one_stage(model, images, targets, taps, request.head_layer)
    finally:
        for m, training in modes:
            m.training = training
    if arch != "faster_rcnn" and request.head_layer >= 0:
        taps.head_tail = head_tail(model, request.head_layer)
    return taps


def _teacher_two_stage(model: FasterRCNN, images: ImageList, features: dict[str, Tensor],
                       request: TapRequest, student: Taps | None, taps: Taps) -> None:
    if request.proposals:
        taps.proposals, _ = model.rpn(images, features)
    if request.roi_outputs:
        rh = model.roi_heads
        rois = [r.detach() for r in student.rois]
        taps.rois = rois
        taps.roi_labels = student.roi_labels
        taps.roi_matched_gt = student.roi_matched_gt
        taps.roi_regression_targets = student.roi_regression_targets
        taps.roi_features = rh.box_roi_pool(features, rois, images.image_sizes)
        taps.roi_embeddings = rh.box_head(taps.roi_features)
        taps.class_logits, taps.box_deltas = rh.box_predictor(taps.roi_embeddings)


def _teacher_one_stage(model: nn.Module, images: ImageList, targets: list[dict[str, Tensor]] | None,
                       taps: Taps, layer: int = -1) -> None:
    if layer >= 0:
        head_outputs, taps.head_cls_features, taps.head_reg_features = run_head(model, taps.features, layer)
        taps.head_layer = layer
    else:
        head_outputs = model.head(taps.features)
    taps.box_coder = _box_coder(model)
    taps.anchors = model.anchor_generator(images, taps.features)
    taps.num_anchors_per_level = _num_anchors_per_level(taps.features, head_outputs["cls_logits"])
    taps.cls_logits = head_outputs["cls_logits"]
    taps.bbox_regression = head_outputs["bbox_regression"]
    taps.bbox_ctrness = head_outputs.get("bbox_ctrness")
    if targets is not None:
        taps.matched_idxs = match_anchors(model, taps.anchors, targets, taps.num_anchors_per_level)


# ----------------------------------------------------------------------------------------------------------
# Pooling arbitrary boxes


def box_levels(boxes: Tensor, num_levels: int, first_level: int, canonical_scale: float = 224.0,
               canonical_level: int = 4) -> Tensor:
    """Pyramid level index (0 = finest) of each box by the FPN paper's rule (Eq. 1 of Lin et al.):
    k = floor(k0 + log2(sqrt(w h) / 224)), clamped to the available levels ``first_level ..``."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)
    k = torch.floor(canonical_level + torch.log2(torch.sqrt(wh[:, 0] * wh[:, 1]) / canonical_scale) + 1e-6)
    k = k.clamp(first_level, first_level + num_levels - 1)
    return (k - first_level).to(torch.int64)


def pool_levels(taps: Taps) -> int:
    """How many pyramid levels :func:`pool_boxes` pools from: all but Faster R-CNN's max-pooled ``"pool"``
    level, which torchvision's own ``MultiScaleRoIAlign`` leaves out too."""
    return sum(1 for name in taps.level_names if name != "pool")


def pool_boxes(taps: Taps, boxes: list[Tensor], output_size: int = 7, sampling_ratio: int = 2,
               levels: list[Tensor] | None = None) -> Tensor:
    """RoIAlign of arbitrary per-image boxes (transformed frame) on their canonical pyramid level.

    Returns (sum M_i, C, output_size, output_size) in the order of the concatenated boxes. ``levels``
    overrides the level of each box (0 = ``taps.features[0]``). Works for teacher and student alike, so
    the same boxes are pooled from the matching level of each pyramid. Levels as in torchvision's
    ``MultiScaleRoIAlign``: P2-P5 for Faster R-CNN (not ``"pool"``), every level P3-P7 for one-stage.
    """
    feats = taps.features[: pool_levels(taps)] if levels is None else taps.features
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
        lv = torch.cat(levels).to(device=rois.device, dtype=torch.int64)
    for li, f in enumerate(feats):
        idx = torch.nonzero(lv == li).squeeze(1)
        if idx.numel() == 0:
            continue
        out[idx] = roi_align(f, rois[idx].to(f.dtype), output_size, spatial_scale=1.0 / taps.strides[li],
                             sampling_ratio=sampling_ratio, aligned=False).to(out.dtype)
    return out
