"""Prototype math of the global-knowledge method: instance features, and the generators that pick prototypes.

Prototypes (Tang et al., ECCV 2022, Sec. 3.1) are K instances of one class used as common basis vectors
of the teacher and the student feature spaces: the same instance index in both spaces, so a prototype is
a *pair* of vectors (g^t, g^s).

Decisions this module makes (the paper leaves them open):

- **Levels.** "For detectors with FPN ... we independently apply the PGM and the RDM on each of the
  feature maps" (Sec. 3.3). Every ground-truth box is pooled on EVERY pyramid level, and prototypes are
  selected per (level, class): level l's prototypes are instances' level-l vectors. (The authors' code
  does the same: one vector per FPN level per box, prototypes per class per level.)
- **Instance feature.** ``extraction="roi_align"`` (default): RoIAlign of the box on the level
  (``roi_size`` x ``roi_size``) and a spatial mean -> one C-dim vector. ``"crop_mean"``: the mean of the
  feature cells covered by the box (start floored, end ceiled: at least one cell). ``"crop_mean_inclusive"``
  (the authors' crop, in their PGM and their per-batch sigma): the cells int(x1 / s) .. int(x2 / s), both
  ends included, so a box whose right / bottom edge falls on a stride multiple also takes the next column /
  row (clipped to the map).

The prototype pool (which instances, extracted where, gathered how) is :mod:`detkd.distill.global_kd.pool`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from detkd.distill.global_kd.pgm import select_prototypes
from detkd.distill.masks import box_cell_ranges
from detkd.taps import Taps, pool_boxes

GENERATORS = (
    "pgm",
    "kmeans_teacher",
    "kmeans_student",
    "dbscan_teacher",
    "dbscan_student",
    "ambiguous",
    "random",
)

# ----------------------------------------------------------------------------------------------------------
# Instance features


EXTRACTIONS = ("roi_align", "crop_mean", "crop_mean_inclusive")


def _crop_mean(feature: Tensor, boxes: Tensor, image_index: Tensor, stride: float,
               inclusive: bool = False) -> Tensor:
    """Mean of the cells a box covers on one map (N, C, H, W): the cells of
    :func:`detkd.distill.masks.box_cell_ranges` (start floored, end ceiled, >= 1 cell), or with ``inclusive``
    the authors' int(x1 / s) .. int(x2 / s) + 1 (exclusive end) clipped to the map, >= 1 cell."""
    h, w = feature.shape[-2:]
    if inclusive:  # int() truncates like the authors' int(abs(x) / s); boxes are non-negative here
        b = (boxes.detach().float().abs() / stride).trunc().long()
        x0, y0 = b[:, 0].clamp(max=w - 1), b[:, 1].clamp(max=h - 1)
        ranges = torch.stack([x0, y0, (b[:, 2] + 1).clamp(max=w), (b[:, 3] + 1).clamp(max=h)], dim=1).tolist()
    else:
        ranges = torch.stack(box_cell_ranges(boxes, h, w, stride), dim=1).long().tolist()  # (M, 4) x0 y0 x1 y1
    out = []
    for (x0, y0, x1, y1), i in zip(ranges, image_index.tolist()):
        out.append(feature[i, :, y0:y1, x0:x1].mean(dim=(1, 2)))
    if not out:
        return feature.new_zeros((0, feature.shape[1]))
    return torch.stack(out)


def instance_features(
    taps: Taps,
    boxes: Sequence[Tensor],
    level: int,
    extraction: str = "roi_align",
    roi_size: int = 7,
) -> Tensor:
    """One vector per box (sum M_i, C) pooled from pyramid level ``level`` of ``taps``.

    ``boxes`` are per-image (M_i, 4) xyxy boxes in the transformed frame. Differentiable with respect to
    the features (the student's gradients flow through it).
    """
    if extraction == "roi_align":
        levels = [torch.full((b.shape[0],), level, dtype=torch.int64, device=b.device) for b in boxes]
        pooled = pool_boxes(taps, list(boxes), output_size=roi_size, levels=levels)
        return pooled.mean(dim=(2, 3))
    if extraction in ("crop_mean", "crop_mean_inclusive"):
        feat = taps.features[level]
        if len(boxes) == 0:
            return feat.new_zeros((0, feat.shape[1]))
        image_index = torch.cat([torch.full((b.shape[0],), i, dtype=torch.int64) for i, b in enumerate(boxes)])
        return _crop_mean(feat, torch.cat(list(boxes)).float(), image_index, float(taps.strides[level]),
                          inclusive=extraction == "crop_mean_inclusive")
    raise ValueError(f"extraction: {extraction!r} is not one of {', '.join(EXTRACTIONS)}")


def instance_features_levels(
    taps: Taps,
    boxes: Sequence[Tensor],
    extraction: str = "roi_align",
    roi_size: int = 7,
) -> list[Tensor]:
    """:func:`instance_features` of the boxes on every level of ``taps``: a list of (sum M_i, C_l), level order.

    With ``roi_align`` and equal channels on every level (FPN) the RoIs are built once and pooled in one
    :func:`detkd.taps.pool_boxes` call: one RoIAlign per level, no per-box or per-level Python work.
    RoIAlign pools every RoI on its own, so the vectors equal :func:`instance_features`'s.
    """
    num_levels = len(taps.features)
    if extraction != "roi_align" or len({int(f.shape[1]) for f in taps.features}) != 1:
        return [instance_features(taps, boxes, lv, extraction, roi_size) for lv in range(num_levels)]
    counts = torch.tensor([int(b.shape[0]) for b in boxes], dtype=torch.int64)
    total = int(counts.sum())
    # image i contributes num_levels copies of its boxes, level-major: rows start_i + lv * M_i + j
    repeated = [b.repeat(num_levels, 1) for b in boxes]
    levels = [torch.arange(num_levels, device=b.device).repeat_interleave(b.shape[0]) for b in boxes]
    pooled = pool_boxes(taps, repeated, output_size=roi_size, levels=levels).mean(dim=(2, 3))
    first = torch.cumsum(counts, 0) - counts  # each image's first instance among the sum M_i
    image = torch.repeat_interleave(torch.arange(len(boxes)), counts)
    within = torch.arange(total) - first[image]
    start = num_levels * first[image] + within
    rows = [(start + lv * counts[image]).to(pooled.device) for lv in range(num_levels)]
    return [pooled[r] for r in rows]


# ----------------------------------------------------------------------------------------------------------
# Generators (Table 6)


def _nearest_distinct(x: Tensor, centres: Tensor) -> Tensor:
    """For each centre in turn, the nearest row of ``x`` not already taken (keeps prototypes distinct)."""
    d = torch.cdist(centres.float(), x.float())
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    out = []
    for row in d:
        row = row.masked_fill(taken, float("inf"))
        j = int(torch.argmin(row))
        taken[j] = True
        out.append(j)
    return torch.tensor(out, dtype=torch.int64)


def kmeans(x: Tensor, k: int, seed: int = 0, iters: int = 50) -> tuple[Tensor, Tensor]:
    """Lloyd's K-means with k-means++ seeding; returns (centres (k, D), assignment (N,)).

    Deterministic for a given ``seed``. An empty cluster is re-seeded at the point farthest from its
    centre, so exactly ``k`` non-empty clusters come back when ``x`` has at least ``k`` distinct rows.
    """
    x = x.float()
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:
            j = int(torch.randint(n, (1,), generator=g))
        else:
            j = int(torch.multinomial((d2 / total).cpu(), 1, generator=g))
        centres.append(x[j])
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    c = torch.stack(centres)
    assign = torch.zeros(n, dtype=torch.int64, device=x.device)
    for _ in range(iters):
        dist = torch.cdist(x, c)
        new = dist.argmin(1)
        for j in range(k):
            members = new == j
            if members.any():
                c[j] = x[members].mean(0)
            else:  # re-seed an empty cluster at the worst-served point
                far = int(dist.gather(1, new[:, None]).squeeze(1).argmax())
                c[j] = x[far]
                new[far] = j
        if torch.equal(new, assign):
            break
        assign = new
    return c, assign


def dbscan_labels(x: Tensor, eps: float = 0.0, min_samples: int = 5) -> Tensor:
    """DBSCAN (Ester et al. 1996) cluster labels (N,), -1 = noise, via scikit-learn.

    Euclidean distances on the features as given, like the K-means generator. ``eps=0`` picks it from the
    data (so it follows the feature scale): the median distance to the ``min_samples``-th nearest neighbour.
    """
    from sklearn.cluster import DBSCAN  # here: scikit-learn adds ~2 s to the import, and only DBSCAN needs it

    z = x.detach().double().cpu()
    if eps <= 0:
        d = torch.cdist(z, z)
        kth = min(min_samples, z.shape[0] - 1)
        eps = float(d.kthvalue(kth + 1, dim=1).values.median()) if kth > 0 else 1.0
        eps = max(eps, 1e-6)
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(z.numpy())
    return torch.as_tensor(labels, dtype=torch.int64)


def generate(
    feat_t: Tensor,
    feat_s: Tensor,
    k: int,
    method: str = "pgm",
    *,
    lam: float = 10.0,
    seed: int = 0,
    areas: Tensor | None = None,
    dbscan_eps: float = 0.0,
    dbscan_min_samples: int = 5,
    **pgm_opts: Any,
) -> Tensor:
    """Indices (K',) int64 of the prototypes among N paired instances (``feat_t`` (N, Dt), ``feat_s`` (N, Ds)).

    - ``pgm``: Alg. 1 (:func:`detkd.distill.global_kd.pgm.select_prototypes`, ``lam`` and ``pgm_opts`` passed on);
    - ``kmeans_teacher`` / ``kmeans_student``: K-means in one space, then the instance nearest each centre;
    - ``dbscan_teacher`` / ``dbscan_student``: DBSCAN in one space, the instance nearest each cluster's
      mean, largest clusters first, at most K (fewer when there are fewer clusters);
    - ``ambiguous``: the K smallest instances by box area (``areas`` (N,) required);
    - ``random``: K distinct instances drawn with ``seed``.
    When N <= K every generator but ``pgm`` returns all N instances.
    """
    n = feat_t.shape[0]
    if feat_s.shape[0] != n:
        raise ValueError(f"generate: {n} teacher features but {feat_s.shape[0]} student features")
    if method not in GENERATORS:
        raise ValueError(f"generator: {method!r} is not one of {', '.join(GENERATORS)}")
    if n == 0 or k <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if method == "pgm":
        return select_prototypes(feat_t, feat_s, k=k, lam=lam, **pgm_opts).indices.cpu().to(torch.int64)
    if n <= k:
        return torch.arange(n, dtype=torch.int64)
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=g)[:k].sort().values
    if method == "ambiguous":
        if areas is None or areas.shape[0] != n:
            raise ValueError("generator 'ambiguous' needs areas (N,) of the instances' boxes")
        return torch.argsort(areas.cpu().double(), stable=True)[:k]
    x = feat_t if method.endswith("teacher") else feat_s
    if method.startswith("kmeans"):
        centres, _ = kmeans(x, k, seed=seed)
        return _nearest_distinct(x, centres)
    labels = dbscan_labels(x, eps=dbscan_eps, min_samples=dbscan_min_samples).to(x.device)
    clusters = [c for c in labels.unique().tolist() if c >= 0]
    if not clusters:  # everything is noise: treat the class as one cluster
        labels = torch.zeros_like(labels)
        clusters = [0]
    clusters.sort(key=lambda c: (-int((labels == c).sum()), c))
    centres = torch.stack([x[labels == c].float().mean(0) for c in clusters[:k]])
    return _nearest_distinct(x, centres)


@dataclass
class Prototypes:
    """The prototypes of one class on one level: indices into the pooled instances and both vectors."""

    indices: Tensor  # (K',) int64
    teacher: Tensor  # (K', Dt)
    student: Tensor  # (K', Ds)
