"""The global method's per-batch pieces (Tang et al., "Distilling Object Detectors with Global Knowledge",
ECCV 2022): a batch's instances and their relations to the prototypes (Eq. 5), sigma (Eq. 8), the L_global
terms (Eq. 6) and the feature masks of L_local_feat (Eq. 7). :mod:`detkd.distill.global_kd.distiller` documents the
decisions; this module holds the math it and :mod:`detkd.distill.global_kd.variants` share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.distill.global_kd.prototypes import Prototypes
from detkd.distill.masks import box_cell_ranges, weighted_box_mask
from detkd.taps import Taps


@dataclass
class Instances:
    """The instances of one batch: boxes per image (transformed frame) and, flattened in image order,
    their labels and canonical levels. ``gt_offsets[b]`` is where image b's ground truth starts
    (``instances="gt"``); ``roi_positions`` is each instance's row among the concatenated RoIs
    (``instances="positive_proposals"``)."""

    boxes: list[Tensor]
    labels: Tensor
    level: Tensor
    gt_offsets: list[int]
    roi_positions: Tensor | None = None

    @property
    def num(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class LevelRelations:
    """One pyramid level: pooled instance features and the Eq. 5 coordinates of the M instances whose class
    has prototypes, all classes together (zero beyond a row's own K_c, see
    :func:`detkd.distill.global_kd.pgm.project_grouped`).

    ``groups`` splits the coordinates per class, in ascending class order: (instance indices,
    Lambda^t (n, K_c), Lambda^s (n, K_c), prototypes).
    """

    ft: Tensor  # (N, Dt), constant
    fs: Tensor  # (N, Ds), differentiable
    idx: Tensor  # (M,) int64, the rows among the N instances
    lt: Tensor  # (M, K) Lambda^t, detached
    ls: Tensor  # (M, K) Lambda^s, differentiable
    kc: Tensor  # (M,) float, K_c of each row's class
    slot: Tensor  # (M,) int64, each row's class as an index into ``protos``
    protos: list[Prototypes]  # the level's classes with prototypes, ascending class order

    @property
    def groups(self) -> list[tuple[Tensor, Tensor, Tensor, Prototypes]]:
        out = []
        for j, p in enumerate(self.protos):
            rows = torch.nonzero(self.slot == j).squeeze(1)
            if rows.numel():
                kc = p.indices.numel()
                out.append((self.idx[rows], self.lt[rows, :kc], self.ls[rows, :kc], p))
        return out


def paper_sigma(lam_t: Tensor, lam_s: Tensor) -> Tensor:
    """Eq. 8: sigma = 1 - ||Lambda^s - Lambda^t||_2 per row, detached and clamped to [0, 1]."""
    return (1.0 - (lam_s.detach() - lam_t.detach()).norm(dim=1)).clamp(0.0, 1.0)


def cosine_max_sigma(ft: Tensor, fs: Tensor, proto_t: Tensor, proto_s: Tensor) -> Tensor:
    """Authors' sigma: 1 - |max_k cos(f^s, p_k^s) - max_k cos(f^t, p_k^t)| per row, detached, not clamped."""
    cs = F.normalize(fs.detach(), dim=1) @ F.normalize(proto_s, dim=1).T
    ct = F.normalize(ft.detach(), dim=1) @ F.normalize(proto_t, dim=1).T
    return 1.0 - (cs.max(dim=1).values - ct.max(dim=1).values).abs()


def paper_global_level(rel: LevelRelations, sigma: Tensor) -> Tensor:
    """:func:`paper_global_terms` of a whole level at once (padded coordinates are 0 in both spaces)."""
    sq = ((rel.ls - rel.lt) ** 2).sum(dim=1) / rel.kc
    return (sigma[rel.idx] * sq).sum()


def paper_global_terms(groups: list[tuple[Tensor, Tensor, Tensor, Prototypes]], sigma: Tensor) -> Tensor:
    """Eq. 6 numerator of one level: sum over instances of sigma ||Lambda^s - Lambda^t||^2 / K_c."""
    total = sigma.new_zeros(())
    for idx, lt, ls, _ in groups:
        sq = ((ls - lt) ** 2).sum(dim=1) / lt.shape[1]
        total = total + (sigma[idx] * sq).sum()
    return total


def cosine_all_terms(ft: Tensor, fs: Tensor, proto_t: Tensor, proto_s: Tensor, sigma: Tensor,
                     sigma_inside: bool = False) -> Tensor:
    """Authors' global loss on one level: sum over instances of sigma * mean_k smoothL1(cos(f^s, P^s_k),
    cos(f^t, P^t_k)) over the prototypes P of ALL classes.

    ``sigma_inside`` (the authors' code): sum over instances of mean_k smoothL1(sigma cos(f^s, P^s_k),
    sigma cos(f^t, P^t_k)): sigma scales both arguments, so it enters quadratically where |d| < 1.
    """
    rs = F.normalize(fs, dim=1) @ F.normalize(proto_s, dim=1).T
    rt = F.normalize(ft, dim=1) @ F.normalize(proto_t, dim=1).T
    if sigma_inside:
        s = sigma.detach()[:, None]
        return F.smooth_l1_loss(s * rs, s * rt.detach(), reduction="none").mean(dim=1).sum()
    rows = F.smooth_l1_loss(rs, rt.detach(), reduction="none").mean(dim=1)
    return (sigma * rows).sum()


def finest56_box_levels(boxes: Tensor, num_levels: int) -> Tensor:
    """The authors' mask level of each box (M, 4): floor(log2(sqrt((w + 1)(h + 1)) / 56 + 1e-6)) clamped to
    0 .. num_levels - 1, an index into ALL the maps from the finest (P2-P6 for Faster R-CNN, P3-P7 for
    RetinaNet alike): mmdetection's RoI level rule with the legacy +1 pixel, over every map."""
    wh = boxes.detach().float()[:, 2:] - boxes.detach().float()[:, :2] + 1.0
    k = torch.floor(torch.log2(torch.sqrt(wh[:, 0] * wh[:, 1]) / 56.0 + 1e-6))
    return k.clamp(0, num_levels - 1).to(torch.int64)


def ordered_box_mask(boxes: Tensor, weights: Tensor, height: int, width: int, stride: float,
                     cell_range: str = "cover", mask_rule: str = "max") -> tuple[Tensor, Tensor]:
    """(height, width) map of per-box ``weights`` (M,) on one level, and the (height, width) bool cells written.

    ``cell_range``: ``cover`` = :func:`detkd.distill.masks.box_cell_ranges` (floor start, ceil end, >= 1
    cell); ``floor`` (authors' code) = columns int(x1 / s) .. int(x2 / s) - 1 clipped to the map (a box
    whose edge falls on a stride multiple does not reach the next cell), rows likewise; a box with no
    column or no row in that range marks the single cell (int(y1 / s), int(x1 / s)).
    ``mask_rule``: ``max`` = a cell holds the largest weight of the boxes covering it; ``overwrite``
    (authors' code) = boxes are written in order, a later box replacing the cells of earlier ones, except
    that a single-cell box (the ``floor`` case above) keeps the larger of its weight and the cell's.
    The weights are constants (detached).
    """
    device = boxes.device
    if cell_range == "cover" and mask_rule == "max":
        return weighted_box_mask(boxes, weights, height, width, stride)
    mask = torch.zeros((height, width), dtype=torch.float32, device=device)
    cover = torch.zeros((height, width), dtype=torch.bool, device=device)
    if boxes.numel() == 0:
        return mask, cover
    w = weights.detach().float()
    if cell_range == "cover":
        ranges = torch.stack(box_cell_ranges(boxes, height, width, stride), dim=1).long().tolist()
    else:  # int() truncates like the authors' int(x / s); boxes are non-negative in the transformed frame
        b = (boxes.detach().float() / stride).trunc().long()
        ranges = torch.stack([b[:, 0].clamp(min=0), b[:, 1].clamp(min=0), b[:, 2].clamp(max=width),
                              b[:, 3].clamp(max=height)], dim=1).tolist()
    for i, (x0, y0, x1, y1) in enumerate(ranges):
        if x0 == x1 or y0 == y1:  # only reachable with "floor": one cell, max (kept on the map)
            yc, xc = min(y0, height - 1), min(x0, width - 1)
            mask[yc, xc] = torch.maximum(mask[yc, xc], w[i]) if mask_rule == "overwrite" or cover[yc, xc] else w[i]
            cover[yc, xc] = True
            continue
        if mask_rule == "overwrite":
            mask[y0:y1, x0:x1] = w[i]
        else:
            region = mask[y0:y1, x0:x1]
            seen = cover[y0:y1, x0:x1]
            mask[y0:y1, x0:x1] = torch.where(seen, torch.maximum(region, w[i]), w[i])
        cover[y0:y1, x0:x1] = True
    return mask, cover


def authors_decoupled_terms(d2: Tensor, mask: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """The authors' point-wise feature loss on one level, before its weights (fg 1, bg 4): DeFeat's
    decoupled loss with the sigma map M as the foreground mask, repeated over the C channels.

        fg = sum M d2 / max(1, 2 C sum M)
        bg = sum B d2 / max(1, 2 C sum B),  B = 1 - M' with M' = 1 where M > 0 and M elsewhere

    ``d2``: (N, H, W) squared difference summed over channels; ``mask``: (N, H, W) sigma map. As in their
    code: a cell with sigma <= 0 is background (weight 1 - sigma, above 1 for a negative sigma) and a
    negative sigma also counts in fg with its sign; the max(1, .) floors a non-positive sum M at 1.
    """
    m = mask.detach().float()
    bg = 1.0 - torch.where(m > 0, torch.ones_like(m), m)
    fg_den = torch.clamp(2.0 * channels * m.sum(), min=1.0)
    bg_den = torch.clamp(2.0 * channels * bg.sum(), min=1.0)
    return (d2 * m).sum() / fg_den, (d2 * bg).sum() / bg_den


def level_masks(
    taps: Taps, inst: Instances, sigma: Tensor, level: int, assigned: Tensor | None = None,
    cell_range: str = "cover", mask_rule: str = "max",
) -> tuple[Tensor, Tensor]:
    """(N_img, H, W) sigma-weighted box map and coverage of the instances on ``level``
    (:func:`ordered_box_mask`; by default a cell holds the largest sigma of the boxes covering it).

    ``sigma`` (N,) weighs each instance; ``assigned`` (N,) int64 keeps the instances whose level it gives
    is ``level`` (None: every instance).
    """
    h, w = taps.features[level].shape[-2:]
    stride = float(taps.strides[level])
    maps, covers = [], []
    start = 0
    for boxes in inst.boxes:
        n = boxes.shape[0]
        s = sigma[start : start + n]
        keep = assigned[start : start + n] == level if assigned is not None else torch.ones_like(s, dtype=torch.bool)
        m, c = ordered_box_mask(boxes[keep], s[keep], h, w, stride, cell_range, mask_rule)
        maps.append(m)
        covers.append(c)
        start += n
    return torch.stack(maps), torch.stack(covers)
