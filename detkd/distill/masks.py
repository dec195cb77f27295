"""Ground-truth masks on the pyramid levels: boxes rasterised on each level (DeFeat-style masks; the
weighted one keeps the largest per-box weight of each cell), and the anchors and near-object anchor masks
of FGFI.

Everything works on :class:`~detkd.taps.Taps` in the transformed frame: feature cell ``(i, j)`` of a
level with stride ``s`` covers the pixels ``[j s, (j + 1) s) x [i s, (i + 1) s)`` of the padded batch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detkd.taps import Taps


def box_cell_ranges(boxes: Tensor, height: int, width: int,
                    stride: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cells each of ``boxes`` (M, 4) covers on a level of stride ``stride``: columns ``x0 .. x1 - 1`` and
    rows ``y0 .. y1 - 1`` as float (M,) tensors.

    The start is floored and the end ceiled (``floor(x1 / s) .. ceil(x2 / s) - 1``), clamped to the map, and
    every box covers at least one cell, so even a box smaller than a cell marks the cell it falls in.
    """
    b = boxes.detach().float() / stride
    x0 = b[:, 0].floor().clamp(0, width - 1)
    y0 = b[:, 1].floor().clamp(0, height - 1)
    x1 = torch.maximum(b[:, 2].ceil().clamp(max=width), x0 + 1)
    y1 = torch.maximum(b[:, 3].ceil().clamp(max=height), y0 + 1)
    return x0, y0, x1, y1


def box_cells(boxes: Tensor, height: int, width: int, stride: float) -> Tensor:
    """(M, height, width) bool: the cells of one level each box covers (:func:`box_cell_ranges`)."""
    x0, y0, x1, y1 = box_cell_ranges(boxes, height, width, stride)
    cols = torch.arange(width, device=boxes.device, dtype=torch.float32)
    rows = torch.arange(height, device=boxes.device, dtype=torch.float32)
    in_x = (cols[None, :] >= x0[:, None]) & (cols[None, :] < x1[:, None])  # (M, W)
    in_y = (rows[None, :] >= y0[:, None]) & (rows[None, :] < y1[:, None])  # (M, H)
    return in_y[:, :, None] & in_x[:, None, :]


def box_mask(boxes: Tensor, height: int, width: int, stride: float) -> Tensor:
    """(height, width) float 0/1 map of the cells of one level that overlap any of ``boxes`` (M, 4)
    (cells as :func:`box_cell_ranges`)."""
    if boxes.numel() == 0:
        return torch.zeros((height, width), dtype=torch.float32, device=boxes.device)
    return box_cells(boxes, height, width, stride).any(dim=0).float()


def weighted_box_mask(boxes: Tensor, weights: Tensor, height: int, width: int,
                      stride: float) -> tuple[Tensor, Tensor]:
    """Per-box weighted :func:`box_mask`: the (height, width) float map of the largest of ``weights`` (M,)
    over the boxes covering each cell (0 where none does; the weights are taken as constants) and the
    (height, width) bool coverage, which also holds the cells of zero-weight boxes."""
    if boxes.numel() == 0:
        mask = torch.zeros((height, width), dtype=torch.float32, device=boxes.device)
        return mask, mask.bool()
    inside = box_cells(boxes, height, width, stride)
    weighted = (inside.float() * weights.detach().float()[:, None, None]).amax(dim=0)
    return weighted, inside.any(dim=0)


def box_masks(taps: Taps, boxes: list[Tensor]) -> list[Tensor]:
    """Per level, (N, 1, H, W) 0/1 masks of the per-image ``boxes`` (transformed frame) on that level."""
    masks = []
    for feat, stride in zip(taps.features, taps.strides):
        h, w = feat.shape[-2:]
        masks.append(torch.stack([box_mask(b, h, w, stride) for b in boxes])[:, None])
    return masks


# ----------------------------------------------------------------------------------------------------------
# Anchors and the FGFI imitation mask


def grid_anchors(height: int, width: int, stride: float, sizes: list[float], aspect_ratios: list[float],
                 device: torch.device | str = "cpu") -> Tensor:
    """Anchors of one level as (height * width * A, 4) xyxy, location-major: the layout and the rounding of
    torchvision's ``AnchorGenerator`` (A = len(sizes) * len(aspect_ratios), aspect ratio = h / w)."""
    scales = torch.as_tensor(sizes, dtype=torch.float32, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # (A, 4) centred on 0
    xs = torch.arange(width, dtype=torch.float32, device=device) * stride
    ys = torch.arange(height, dtype=torch.float32, device=device) * stride
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


def level_anchors(taps: Taps, image: int, sizes: list[float] | None = None,
                  aspect_ratios: tuple[float, ...] | list[float] = (0.5, 1.0, 2.0)) -> list[Tensor]:
    """Anchors of image ``image`` per level as (H * W, A_l, 4).

    Uses ``taps.anchors`` split by ``taps.num_anchors_per_level`` when the taps carry them (RetinaNet, FCOS,
    and Faster R-CNN if the taps record the RPN anchors); otherwise generates them with
    :func:`grid_anchors` from ``sizes`` (one per level; ``None`` = 8 x stride, torchvision's Faster R-CNN
    default 32..512 on strides 4..64) and ``aspect_ratios``.
    """
    shapes = [tuple(f.shape[-2:]) for f in taps.features]
    out = []
    if taps.anchors is not None:
        if taps.num_anchors_per_level is None or len(taps.num_anchors_per_level) != len(shapes):
            raise ValueError(
                f"taps.num_anchors_per_level {taps.num_anchors_per_level} does not give one count per "
                f"pyramid level ({len(shapes)} levels)"
            )
        chunks = taps.anchors[image].split(list(taps.num_anchors_per_level))
        for level, (chunk, (h, w)) in enumerate(zip(chunks, shapes)):
            if chunk.shape[0] % (h * w) != 0:
                raise ValueError(
                    f"taps.anchors level {level}: {chunk.shape[0]} anchors is not a multiple of the "
                    f"{h}x{w} feature map"
                )
            out.append(chunk.reshape(h * w, -1, 4))
        return out
    if sizes is not None and len(sizes) != len(shapes):
        raise ValueError(f"anchor sizes {list(sizes)} must give one size per pyramid level ({len(shapes)})")
    device = taps.features[0].device
    for level, ((h, w), stride) in enumerate(zip(shapes, taps.strides)):
        size = 8.0 * stride if sizes is None else float(sizes[level])
        out.append(grid_anchors(h, w, stride, [size], list(aspect_ratios), device).reshape(h * w, -1, 4))
    return out


def imitation_mask_batch(taps: Taps, factor: float = 0.5, sizes: list[float] | None = None,
                         aspect_ratios: tuple[float, ...] | list[float] = (0.5, 1.0, 2.0)) -> list[Tensor]:
    """Per level, the (N, H, W) float 0/1 FGFI imitation masks (:func:`imitation_masks`) of the batch's
    images, from their ground-truth boxes and the anchors of :func:`level_anchors`."""
    shapes = [tuple(f.shape[-2:]) for f in taps.features]
    per_image = [imitation_masks(level_anchors(taps, i, sizes, aspect_ratios), shapes, t["boxes"], factor)
                 for i, t in enumerate(taps.targets)]
    return [torch.stack([m[level] for m in per_image]) for level in range(len(shapes))]


def imitation_masks(anchors: list[Tensor], shapes: list[tuple[int, int]], boxes: Tensor,
                    factor: float = 0.5) -> list[Tensor]:
    """FGFI near-object imitation mask of one image, per level (H, W) float 0/1 (Wang et al., CVPR 2019,
    Sec. 3.1).

    For every ground-truth box: the IoU with every anchor of every level, its maximum ``m`` over all
    anchors, and the threshold ``factor * m``; a location is in the mask when any of its anchors reaches
    the threshold of any box. With one level this is the paper's per-image IoU map; with a pyramid the
    maximum is taken over all the detector's anchors, so each box marks the locations of the levels whose
    anchors fit it. Boxes no anchor overlaps (max IoU 0) mark nothing.
    """
    masks = [torch.zeros(shape, dtype=torch.float32, device=boxes.device) for shape in shapes]
    if boxes.shape[0] == 0:
        return masks
    gt = boxes.detach().float()
    ious = [box_iou(a.reshape(-1, 4).float(), gt).reshape(a.shape[0], a.shape[1], -1) for a in anchors]
    best = torch.stack([iou.amax(dim=(0, 1)) for iou in ious]).amax(dim=0)  # (M,)
    thresh = factor * best
    valid = best > 0
    for level, iou in enumerate(ious):
        hit = (iou >= thresh) & valid  # (HW, A, M)
        masks[level] = hit.any(dim=2).any(dim=1).float().reshape(shapes[level])
    return masks
