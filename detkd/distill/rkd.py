"""RKD: relational knowledge distillation between instance embeddings (Park et al., "Relational Knowledge
Distillation", CVPR 2019, https://arxiv.org/abs/1904.05068).

Instances are the ground-truth boxes of the batch (``Taps.targets``, transformed frame), RoIAligned on
their canonical pyramid level of each detector (:func:`detkd.taps.pool_boxes`) and global-average-pooled
(``embedding: gap``) or flattened. Teacher and student embeddings may have different widths: RKD compares
relations, not the embeddings themselves.

- distance-wise loss (Sec. 3.2.1): psi_D(t_i, t_j) = ||t_i - t_j|| / mu, mu the mean distance over the
  pairs i != j; Huber loss (delta = 1, i.e. smooth L1) between teacher and student psi_D, averaged over
  the pairs i != j;
- angle-wise loss (Sec. 3.2.2): psi_A(t_i, t_j, t_k) = <e_ij, e_kj>, e_ij = (t_i - t_j) / ||t_i - t_j||,
  the cosine of the angle at t_j; Huber loss averaged over the triplets of distinct instances (the
  authors' code averages over all N^3 index triplets, degenerate ones included, which only rescales).

Equation numbers are not cited (they could not be checked against the paper's text): both losses are
cited by their sections and written out above.

Weights 25 (distance) and 50 (angle) are the paper's for classification (Sec. 4.2), times ``weight``.
``scope: batch`` relates all instances of the batch; ``image`` relates instances within each image and
averages over images. Fewer than 2 (distance) / 3 (angle) instances contribute an exact 0. When a scope
holds more than ``max_instances`` instances a random subset of that size is used (the angle loss costs
O(N^2 D) memory and O(N^3) time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.distill.base import Distiller, opt
from detkd.distill.losses import graph_zero
from detkd.taps import Taps, pool_boxes


def _pair_distances(x: Tensor) -> Tensor:
    """(N, D) -> (N, N) Euclidean distances; the clamp gives coincident points a zero, finite gradient."""
    sq = (x[:, None, :] - x[None, :, :]).pow(2).sum(dim=-1)
    return sq.clamp(min=1e-12).sqrt()


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Distance-wise RKD loss (RKD-D, the paper's Sec. 3.2.1: psi_D normalised by the mean pair distance,
    Huber loss) between (N, Ds) student and (N, Dt) teacher embeddings, averaged over the pairs i != j;
    0 when N < 2. Equation number not confirmed."""
    n = student.shape[0]
    if n < 2:
        return student.new_zeros((), dtype=torch.float32)
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    with torch.no_grad():
        dt = _pair_distances(teacher.float())[off]
        dt = dt / dt.mean().clamp(min=1e-12)
    ds = _pair_distances(student.float())[off]
    ds = ds / ds.mean().clamp(min=1e-12)
    return F.smooth_l1_loss(ds, dt, beta=1.0)


def _angles(x: Tensor) -> Tensor:
    """(N, D) -> (N, N, N) with [j, i, k] = cosine of the angle at x_j between x_i and x_k."""
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # e[j, i] = unit(x_i - x_j)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Angle-wise RKD loss (RKD-A, the paper's Sec. 3.2.2: cosine psi_A of the angle at the middle instance,
    Huber loss) between (N, Ds) student and (N, Dt) teacher embeddings, averaged over the triplets of distinct
    instances; 0 when N < 3. Equation number not confirmed."""
    n = student.shape[0]
    if n < 3:
        return student.new_zeros((), dtype=torch.float32)
    eye = torch.eye(n, dtype=torch.bool, device=student.device)
    distinct = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])  # j != i, j != k, i != k
    with torch.no_grad():
        at = _angles(teacher.float())[distinct]
    a_s = _angles(student.float())[distinct]
    return F.smooth_l1_loss(a_s, at, beta=1.0)


@dataclass
class RKDOptions:
    weight: float = opt(1.0, ge=0)  # multiplies both terms
    distance_weight: float = opt(25.0, ge=0)  # rkd_distance weight (the paper's, for classification)
    angle_weight: float = opt(50.0, ge=0)  # rkd_angle weight; 0 drops the angle term
    embedding: Literal["gap", "flatten"] = "gap"  # RoIAligned instance features: global average pooled or flat
    pool_size: int = opt(7, ge=1)  # RoIAlign output size
    scope: Literal["batch", "image"] = "batch"  # relate all instances of the batch, or within each image
    max_instances: int = opt(64, ge=3)  # a random subset of this size when a scope holds more (the angle term is cubic)


class RKD(Distiller):
    """``rkd_distance`` (Sec. 3.2.1) and ``rkd_angle`` (Sec. 3.2.2) terms on pooled box embeddings (an angle
    weight of 0 drops the angle term)."""

    name = "rkd"

    Options = RKDOptions

    def embed(self, taps: Taps, boxes: list[Tensor]) -> Tensor:
        pooled = pool_boxes(taps, boxes, output_size=self.opts.pool_size).float()
        if self.opts.embedding == "gap":
            return pooled.mean(dim=(2, 3))
        return pooled.flatten(1)

    def _subset(self, n: int, device: torch.device) -> Tensor | None:
        if n <= self.opts.max_instances:
            return None
        return torch.randperm(n, device=device)[: self.opts.max_instances]

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        boxes = [t["boxes"].detach() for t in student.targets]
        es = self.embed(student, boxes)
        et = self.embed(teacher, boxes)
        if self.opts.scope == "batch":
            groups = [torch.arange(es.shape[0], device=es.device)]
        else:
            counts = [int(b.shape[0]) for b in boxes]
            groups = list(torch.arange(es.shape[0], device=es.device).split(counts))
        dist_terms, angle_terms = [], []
        for idx in groups:
            keep = self._subset(idx.numel(), idx.device)
            if keep is not None:
                idx = idx[keep]
            if idx.numel() >= 2:
                dist_terms.append(rkd_distance_loss(es[idx], et[idx]))
            if idx.numel() >= 3 and self.opts.angle_weight != 0:
                angle_terms.append(rkd_angle_loss(es[idx], et[idx]))
        zero = graph_zero(student.features)
        out = {}
        distance = torch.stack(dist_terms).mean() + zero if dist_terms else zero
        out["rkd_distance"] = self.opts.weight * self.opts.distance_weight * distance
        if self.opts.angle_weight != 0:
            angle = torch.stack(angle_terms).mean() + zero if angle_terms else zero
            out["rkd_angle"] = self.opts.weight * self.opts.angle_weight * angle
        return out
