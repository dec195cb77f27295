"""Global-knowledge distillation (Tang et al., "Distilling Object Detectors with Global Knowledge", ECCV 2022,
https://arxiv.org/abs/2210.09022):
the robust distillation module (RDM, Eq. 6-9) on prototypes chosen by PGM (Alg. 1), refreshed every
``refresh_every`` epochs (Alg. 2). The Table 4 "+prototypes" variants of DeFeat, vanilla KD and RKD build on
:class:`PrototypeDistiller` in :mod:`detkd.distill.global_kd.variants`.

Registered name: ``global``.

Per training batch, every instance (a ground-truth box by default) is pooled on every pyramid level
(:func:`detkd.distill.global_kd.prototypes.instance_features`), in both detectors. On level l an instance of class c
is projected on that class's level-l prototypes, in each space, by the sequential coupled coefficients of
Eq. 5 (:func:`detkd.distill.global_kd.pgm.project_grouped`: all classes of a level in one call): Lambda^t, Lambda^s
(K_c,). The teacher side and the prototypes are constants; gradients reach the student through its instance
features (and the adapters).

Decisions (the paper leaves them open; each documented where it is made):

- sigma_{i,j} (Eq. 8): i = image, j = instance in it (the paper's Eq. 6 indexing). Since "PGM and RDM are
  applied on each pyramid level independently", sigma is computed per (instance, level):
  sigma = 1 - ||Lambda^s - Lambda^t||_2, detached and clamped to [0, 1] (``sigma="paper"``). A loss tied
  to one place of the pyramid (an RoI, an anchor) uses the sigma of its instance on the instance's
  canonical FPN level (:func:`detkd.taps.box_levels`). An instance whose class has no prototype yet gets
  sigma = 1 and contributes 0 to L_global. ``sigma="cosine_max"`` (authors' code): 1 - |max_k cos(f^s,
  p_k^s) - max_k cos(f^t, p_k^t)| over the class's prototypes, detached, not clamped. ``sigma="one"``
  (ablation): every sigma is 1, so no term is down-weighted for a poorly represented instance.
- Levels: each level's loss is an independent RDM term; the levels' terms are summed.
- L_global (Eq. 6): per level sum_inst sigma ||Lambda^s - Lambda^t||^2 / K_c, divided by 2N (N = all
  instances of the batch). ``global_loss="cosine_all"`` (authors' unused global loss): cosine similarity
  of an instance to the prototypes of ALL classes, smooth-L1 between the student and teacher rows (mean
  over the row), rows weighted by sigma, averaged over instances (the authors weighted it by 5: set
  ``a_global: 5``; they put sigma inside the smooth-L1, on both arguments: ``sigma_inside_smooth_l1``).
- L_local_feat (Eq. 7): FGFI-style near-object region = the feature cells each instance box covers on
  every level (start floored, end ceiled: at least one cell); cell weight = the largest sigma of the boxes
  covering it; per level sum_cells w ||H(f^s) - f^t||^2 / (2 * number of covered cells) (FGFI's 1/(2 N_p)
  normalisation), H = 1x1 conv + ReLU (paper; note FPN outputs are signed). ``feat_norm="all"`` divides
  the sum over all levels by the covered cells of all levels instead (FGFI's N_p over the pyramid: each
  cell counts once, so fine levels are not outweighed by the one or two cells of a coarse level; a
  detkd option measured in the fixed-budget bench). ``feat_region="imitation"`` imitates on FGFI's
  anchor-IoU mask instead of every covered cell of every level (a detkd option, same bench).
  ``feat_loss="defeat"`` (authors' code,
  :func:`authors_decoupled_terms`): on each level only the boxes assigned to it (``feat_box_level``), mask
  M = sigma, foreground sum M d^2 / max(1, 2 C sum M) with weight ``defeat_fg`` (1), background the same
  with B = 1 - M' (M' = 1 where M > 0, else M) and ``defeat_bg`` (4), both averaged over the levels
  (``feat_level_reduce: sum`` sums them, as the authors' one-stage code does);
  usually with ``adapter="conv3x3"`` (no ReLU). The mask's cells (``cell_range``) and overlapping boxes
  (``mask_rule``): :func:`ordered_box_mask`.
- L_local_resp: KL(teacher || student), temperature ``temperature`` (the paper gives none; the authors
  use 2), times T^2. Faster R-CNN: softmax over the box head's num_classes + 1 logits on the student's
  sampled RoIs (the teacher's box head runs on the same RoIs); a positive RoI weighs the sigma of its
  matched instance, a negative RoI weighs 1 (``resp_rois="all"``, the paper's "proposals") or is left out
  (``"positive"``, the authors' code); averaged over the RoIs used. RetinaNet / FCOS: per-class sigmoid
  KL over classes 1..C on the positive anchors / points (``matched_idxs >= 0``), each weighted by the
  sigma of its matched ground truth, averaged over positives. ``kl_class_mean`` averages over classes
  instead of summing (authors). ``resp_sigma_from="roi_align"`` (authors): the weight of an instance is the
  sigma of its box's RoIAlign on its RoI-head level (:meth:`PrototypeDistiller.pooled_sigma`) instead of
  its sigma from ``extraction``. ``one_stage_kl="softmax"`` (authors' one-stage code, no released config,
  so inferred): the softmax KL over the C class logits instead of the per-class sigmoid KL.
- ``instances="positive_proposals"`` (Faster R-CNN, authors' code): the instances of a batch are the
  student's positive sampled RoIs with their assigned labels instead of the ground-truth boxes.

Eq. 9: L = L_det + a_global L_global + a_feat L_local_feat + a_resp L_local_resp, (1, 1, 5). A term is
switched off (Table 3 ablation) by ``use_global`` / ``use_feat`` / ``use_resp: false`` or a zero weight.
The authors' linear decay (1 - epoch / epochs) of the feature and pair terms is the run-level engine
option ``distill.decay``; their RoI-score KL is not decayed: ``decay_resp: false`` lists
``loss_local_resp`` in :attr:`undecayed`. The authors weight the KL by 1 (``a_resp: 1``).
docs/methods.md tabulates every difference between the paper, the authors' code and these defaults.

The engine must call :meth:`on_epoch_start` before every epoch (epoch 0 included): it (re)selects the
prototypes when due. ``stats`` holds the last batch's statistics for logging: ``sigma_mean``,
``sigma_min`` (over the instance-levels whose class has prototypes) and ``proto_covered`` (that fraction).
The prototypes are part of ``state_dict()`` (``get_extra_state``), so a resumed run continues without
reselecting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from detkd.distill.adapters import build_adapters
from detkd.distill.base import opt, range_error
from detkd.distill.checks import check_pyramids
from detkd.distill.global_kd.base import PrototypeDistiller
from detkd.distill.global_kd.pool import PrototypeOptions
from detkd.distill.global_kd.terms import (
    Instances,
    authors_decoupled_terms,
    cosine_all_terms,
    finest56_box_levels,
    level_masks,
    paper_global_level,
)
from detkd.distill.kd import dense_kd, roi_kd
from detkd.distill.losses import graph_zero
from detkd.distill.masks import imitation_mask_batch
from detkd.taps import TapRequest, Taps


@dataclass
class GlobalOptions(PrototypeOptions):
    a_global: float = opt(1.0, ge=0)  # Eq. 9 alpha_1
    a_feat: float = opt(1.0, ge=0)  # alpha_2
    a_resp: float = opt(5.0, ge=0)  # alpha_3
    use_global: bool = True
    use_feat: bool = True
    use_resp: bool = True
    global_loss: Literal["paper", "cosine_all"] = "paper"
    feat_loss: Literal["paper", "defeat"] = "paper"
    # feat_loss paper: "level" divides each level's sum by that level's covered cells (paper, Eq. 7 per
    # level); "all" divides the sum over levels by the covered cells of all levels (FGFI's N_p), so the
    # fine levels, which hold most cells, carry most of the term
    feat_norm: Literal["level", "all"] = "level"
    # feat_loss paper: where Eq. 7 imitates. "boxes" (paper): the cells each box covers, on every level;
    # "imitation": FGFI's anchor-IoU mask (each object on the locations whose anchors fit it, so on the levels
    # of its size), a cell weighted by the largest sigma of the boxes covering it (1 outside every box)
    feat_region: Literal["boxes", "imitation"] = "boxes"
    # H of Eq. 7: the paper's 1x1 conv + ReLU; "conv1x1" drops the ReLU, whose output cannot reach the negative
    # values of a teacher's FPN map (a floor under the term); "conv3x3": the authors' code
    adapter: Literal["conv1x1_relu", "conv1x1", "conv3x3"] = "conv1x1_relu"
    defeat_fg: float = opt(1.0, ge=0)  # feat_loss defeat: foreground / background weights (authors' code)
    defeat_bg: float = opt(4.0, ge=0)
    temperature: float = opt(2.0, gt=0)
    kl_class_mean: bool = False
    resp_rois: Literal["all", "positive"] = "all"  # Faster R-CNN: negatives weight 1, or left out
    # Options that only reproduce the authors' code (docs/methods.md, global, table of differences):
    # the feature mask: cells of a box "cover" (floor start, ceil end, >= 1 cell) or "floor"
    # ([int(x1/s), int(x2/s)); a box thinner than a cell marks only its top-left cell)
    cell_range: Literal["cover", "floor"] = "cover"
    # overlapping boxes: a cell holds the largest sigma ("max") or the last box's ("overwrite": box after box)
    mask_rule: Literal["max", "overwrite"] = "max"
    # feat_loss defeat: a box's mask level, the canonical FPN level of the pooled levels ("canonical") or
    # floor(log2(sqrt((w + 1)(h + 1)) / 56)) counted from the finest map over every map ("finest_56")
    feat_box_level: Literal["canonical", "finest_56"] = "canonical"
    # feat_loss defeat: the levels' fg and bg terms averaged (authors' two-stage code) or summed (their one-stage
    # code returns the per-level list, which mmdetection sums; no released config: inferred)
    feat_level_reduce: Literal["mean", "sum"] = "mean"
    sigma_inside_smooth_l1: bool = False  # global_loss cosine_all: smoothL1(sigma cs, sigma ct), not sigma smoothL1
    # sigma weighting loss_local_resp: the instance's on its canonical level (from ``extraction``), or from
    # the RoIAlign (roi_size) of its box on that level, as the detector's RoI head pools it ("roi_align")
    resp_sigma_from: Literal["instance", "roi_align"] = "instance"
    decay_resp: bool = True  # distill.decay also scales loss_local_resp (the authors' code leaves it undecayed)
    # RetinaNet / FCOS: per-class sigmoid KL, or KL of a softmax over the C sigmoid logits (authors' one-stage
    # code, no released config: inferred)
    one_stage_kl: Literal["sigmoid", "softmax"] = "sigmoid"


# ----------------------------------------------------------------------------------------------------------
# global: RDM (Eq. 6-9)


class GlobalKD(PrototypeDistiller):
    """RDM of the global-knowledge method (Sec. 3.2-3.3; module docstring): L_global (Eq. 6), L_local_feat
    (Eq. 7) and L_local_resp, weighted per instance by sigma (Eq. 8) and combined as in Eq. 9."""

    name = "global"

    Options = GlobalOptions

    def __init__(self, opts: GlobalOptions, teacher_channels: list[int], student_channels: list[int],
                 arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        self.use_global = opts.use_global and opts.a_global != 0
        self.use_feat = opts.use_feat and opts.a_feat != 0
        self.use_resp = opts.use_resp and opts.a_resp != 0
        if opts.feat_loss != "paper" and (opts.feat_region != "boxes" or opts.feat_norm != "level"):
            raise range_error("global.options.feat_region / feat_norm", f"boxes / level with feat_loss "
                              f"{opts.feat_loss} (they shape the paper's Eq. 7, feat_loss: paper)",
                              f"{opts.feat_region} / {opts.feat_norm}")
        if self.use_feat:
            kind, relu = ("conv1x1", True) if opts.adapter == "conv1x1_relu" else (opts.adapter, False)
            self.adapters = build_adapters(student_channels, teacher_channels, kind, relu=relu,
                                           where="global.options.adapter")
        if not opts.decay_resp:  # the authors decay the feature and pair terms, not the RoI-score KL
            self.undecayed = frozenset({"loss_local_resp"})

    def request(self) -> TapRequest:
        two_stage = self.arch == "faster_rcnn"
        return TapRequest(features=True, roi_outputs=self.use_resp and two_stage,
                          dense_outputs=self.use_resp and not two_stage)

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        check_pyramids(teacher, student, "global")
        opts = self.opts
        device = student.features[0].device
        inst, rels, sig = self.batch_sigmas(teacher, student, targets)  # sig: (L, N)
        n = max(inst.num, 1)
        anchor = graph_zero(list(student.features))
        out: dict[str, Tensor] = {}

        if self.use_global:
            total = anchor
            for lv, rel in enumerate(rels):
                if opts.global_loss == "paper":
                    total = total + paper_global_level(rel, sig[lv]) / (2.0 * n)
                else:
                    protos = self.bank.all_classes(lv, device)
                    if protos is not None and inst.num:
                        total = total + cosine_all_terms(rel.ft, rel.fs, protos[0], protos[1], sig[lv],
                                                         opts.sigma_inside_smooth_l1) / n
            out["loss_global"] = opts.a_global * total

        if self.use_feat:
            out["loss_local_feat"] = opts.a_feat * self.local_feat(teacher, student, inst, sig, anchor)

        if self.use_resp:
            if opts.resp_sigma_from == "roi_align":
                sigma_inst = self.pooled_sigma(teacher, student, inst)
            else:
                sigma_inst = self.canonical_sigma(sig, inst)
            out["loss_local_resp"] = opts.a_resp * self.response(teacher, student, inst, sigma_inst)
        return out

    def local_feat(self, teacher: Taps, student: Taps, inst: Instances, sig: Tensor, anchor: Tensor) -> Tensor:
        """L_local_feat before ``a_feat`` (module docstring): Eq. 7 (``feat_loss: paper``), or the authors'
        point-wise loss (``defeat``): ``defeat_fg * mean_l fg_l + defeat_bg * mean_l bg_l`` with the terms of
        :func:`authors_decoupled_terms`, each level's mask holding the boxes assigned to it."""
        opts = self.opts
        device = student.features[0].device
        mask_opts = {"cell_range": opts.cell_range, "mask_rule": opts.mask_rule}
        assigned = None
        if opts.feat_loss == "defeat":
            if opts.feat_box_level == "finest_56":
                boxes = torch.cat(inst.boxes) if inst.num else torch.zeros((0, 4), device=device)
                assigned = finest56_box_levels(boxes, len(student.features))
            else:
                assigned = inst.level
        total = anchor
        fg_sum, bg_sum = anchor, anchor
        cells = torch.zeros((), device=device)  # feat_norm "all": covered cells of every level
        region = imitation_mask_batch(student) if opts.feat_region == "imitation" else None
        for lv, (adapter, fs_map, ft_map) in enumerate(zip(self.adapters, student.features, teacher.features)):
            d2 = ((adapter(fs_map).float() - ft_map.detach().float()) ** 2).sum(dim=1)  # (N_img, H, W)
            w, cover = level_masks(student, inst, sig[lv], lv, assigned, **mask_opts)
            if region is not None:  # FGFI's locations; sigma where a box covers them, 1 elsewhere
                w = region[lv] * torch.where(cover, w, torch.ones_like(w))
                cover = region[lv] > 0
            if opts.feat_loss == "defeat":
                fg, bg = authors_decoupled_terms(d2, w, ft_map.shape[1])
                fg_sum, bg_sum = fg_sum + fg, bg_sum + bg
            elif opts.feat_norm == "all":
                total = total + (w * d2).sum()
                cells = cells + cover.sum()
            else:
                total = total + (w * d2).sum() / (2.0 * cover.sum().clamp(min=1))
        if opts.feat_loss == "defeat":  # the authors' two-stage code averages both terms over the levels
            levels = len(student.features) if opts.feat_level_reduce == "mean" else 1
            return total + (opts.defeat_fg * fg_sum + opts.defeat_bg * bg_sum) / levels
        if opts.feat_norm == "all":
            return total / (2.0 * cells.clamp(min=1))
        return total

    def response(self, teacher: Taps, student: Taps, inst: Instances, sigma_inst: Tensor) -> Tensor:
        """L_local_resp (Sec. 3.2, named in the text but given no equation): sigma-weighted (Eq. 8)
        KL(teacher || student) (module docstring), i.e. vanilla KD's terms
        (:func:`detkd.distill.kd.roi_kd` / :func:`~detkd.distill.kd.dense_kd`) with sigma weights."""
        opts = self.opts
        reduction = "mean" if opts.kl_class_mean else "sum"
        if self.arch == "faster_rcnn":
            w = self.roi_weights(student, inst, sigma_inst)
            samples = "positive" if opts.resp_rois == "positive" else "all"
            return roi_kd(teacher, student, opts.temperature, samples, reduction, weights=w, method="global")
        w = self.anchor_weights(student, inst, sigma_inst)
        return dense_kd(teacher, student, opts.temperature, "positive", reduction, weights=w, method="global",
                        kl=opts.one_stage_kl)
