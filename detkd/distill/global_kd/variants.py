"""The paper's Table 4 "+prototypes" variants of DeFeat, vanilla KD and RKD (Tang et al., "Distilling Object
Detectors with Global Knowledge", ECCV 2022,
https://arxiv.org/abs/2210.09022, Table 4).

They call the terms of :mod:`detkd.distill.defeat` / :mod:`detkd.distill.kd` (same normalisations and
defaults) with the prototype-based weights (sigma, Eq. 8); RKD's relation is replaced. The prototype bank
and its refresh are :class:`detkd.distill.global_kd.distiller.PrototypeDistiller`'s.

The paper describes these variants in words only (Sec. 4.2: sigma of Eq. 8 as the distilling weight for
DeFeat and vanilla KD, projection on the prototypes (Eq. 5 coordinates) as RKD's relation; details in its
supplement), so no equation of their own is cited; the baseline terms keep their own papers' equations.

Registered names: ``defeat_proto``, ``kd_proto``, ``rkd_proto``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from detkd.distill.base import opt
from detkd.distill.checks import check_pyramids
from detkd.distill.defeat import (
    DeFeatOptions,
    decoupled_feature_loss,
    decoupled_roi_kd,
    defeat_request,
    defeat_setup,
)
from detkd.distill.global_kd.base import PrototypeDistiller
from detkd.distill.global_kd.pool import PrototypeOptions
from detkd.distill.global_kd.terms import level_masks
from detkd.distill.kd import KDOptions, dense_kd, roi_kd
from detkd.distill.losses import graph_zero
from detkd.taps import TapRequest, Taps


@dataclass
class DeFeatProtoOptions(DeFeatOptions, PrototypeOptions):
    """The prototype options, then DeFeat's (same names and defaults)."""


class DeFeatProto(PrototypeDistiller):
    """DeFeat + prototypes (Table 4, Sec. 4.2): the foreground mask of the decoupled feature loss holds, on
    each level, the sigma (Eq. 8) of the instance covering the cell (largest if several), and each positive
    RoI's KL is weighted by the sigma of its instance on its canonical level. Background terms are DeFeat's.

        defeat_proto_fg = fg_weight * mean_l sum w_l (A(S_l) - T_l)^2 / (2 * count(box cells_l) * C)
        defeat_proto_roi_fg = roi_fg_weight * sum_{pos RoIs} sigma KL_T / count(pos RoIs)
    """

    name = "defeat_proto"

    Options = DeFeatProtoOptions

    def __init__(self, opts: DeFeatProtoOptions, teacher_channels: list[int], student_channels: list[int],
                 arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        self.adapters, self.use_roi = defeat_setup(opts, teacher_channels, student_channels, arch, self.name)

    def request(self) -> TapRequest:
        return defeat_request(self.use_roi)

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        check_pyramids(teacher, student, "defeat_proto")
        opts = self.opts
        inst, _, sig = self.batch_sigmas(teacher, student, targets)
        masks, weights = [], []
        for lv in range(len(student.features)):
            w, cover = level_masks(student, inst, sig[lv], lv)
            masks.append(cover.float()[:, None])
            weights.append(w[:, None])
        fg, bg = decoupled_feature_loss(self.adapters, teacher, student, masks, weights)
        out = {"defeat_proto_fg": opts.fg_weight * fg, "defeat_proto_bg": opts.bg_weight * bg}
        if self.use_roi:
            w = self.roi_weights(student, inst, self.canonical_sigma(sig, inst))
            fg, bg = decoupled_roi_kd(teacher, student, opts.temperature, "defeat_proto", weights=w)
            out["defeat_proto_roi_fg"] = opts.roi_fg_weight * fg
            out["defeat_proto_roi_bg"] = opts.roi_bg_weight * bg
        return out


@dataclass
class KDProtoOptions(KDOptions, PrototypeOptions):
    """The prototype options, then vanilla KD's (same names and defaults)."""


class KDProto(PrototypeDistiller):
    """Vanilla KD + prototypes (Table 4, Sec. 4.2): the softened KL of every positive RoI / anchor is
    weighted by the sigma (Eq. 8) of its instance on the instance's canonical level; negatives keep weight 1.
    Samples, temperature (the softening of Eq. 1 of Hinton et al.) and normalisation as
    :mod:`detkd.distill.kd` (``auto``: all sampled RoIs for Faster R-CNN, positive anchors for one-stage
    detectors), i.e. ``kd_proto_cls = weight * sum w KL / count``."""

    name = "kd_proto"

    Options = KDProtoOptions

    def request(self) -> TapRequest:
        two_stage = self.arch == "faster_rcnn"
        return TapRequest(features=True, roi_outputs=two_stage, dense_outputs=not two_stage)

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        o = self.opts
        inst, _, sig = self.batch_sigmas(teacher, student, targets)
        sigma_inst = self.canonical_sigma(sig, inst)
        if self.arch == "faster_rcnn":
            w, term = self.roi_weights(student, inst, sigma_inst), roi_kd
        else:
            w, term = self.anchor_weights(student, inst, sigma_inst), dense_kd
        loss = term(teacher, student, o.temperature, o.samples, o.class_reduction, weights=w, method="kd_proto")
        return {"kd_proto_cls": o.weight * loss}


@dataclass
class RKDProtoOptions(PrototypeOptions):
    weight: float = opt(1.0, ge=0)


class RKDProto(PrototypeDistiller):
    """RKD + prototypes (Table 4, Sec. 4.2): the relation of an instance is its projection on its class's
    prototypes (Eq. 5 coordinates Lambda) instead of its distances to the other instances of the batch. As in RKD,
    the student's relations match the teacher's under a Huber (smooth-L1) penalty:

        rkd_proto = weight * sum_l (1/N) sum_i mean_k smoothL1(Lambda^s_ik, Lambda^t_ik)

    (no sigma weighting; instances of classes without prototypes contribute 0).
    """

    name = "rkd_proto"

    Options = RKDProtoOptions

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        inst, rels, _ = self.batch_sigmas(teacher, student, targets)
        n = max(inst.num, 1)
        total = graph_zero(list(student.features))
        for rel in rels:  # mean over each row's own K_c coordinates (the padded ones are 0 in both)
            rows = F.smooth_l1_loss(rel.ls, rel.lt, reduction="none").sum(dim=1) / rel.kc
            total = total + rows.sum() / n
        return {"rkd_proto": self.opts.weight * total}
