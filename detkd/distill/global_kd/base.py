"""The base of every prototype method (the global method and the Table 4 "+prototypes" variants): the
prototype bank and its refresh schedule, persistence in ``state_dict()``, and the per-batch relations of
the instances to their class's prototypes (sigma, Eq. 8)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from detkd.config import ConfigError
from detkd.distill.base import DistillContext, Distiller, range_error
from detkd.distill.global_kd.pgm import project, project_grouped
from detkd.distill.global_kd.pool import PrototypeBank, PrototypeOptions
from detkd.distill.global_kd.prototypes import Prototypes, instance_features_levels
from detkd.distill.global_kd.terms import (
    Instances,
    LevelRelations,
    cosine_max_sigma,
    paper_sigma,
)
from detkd.runtime.faults import fault_point
from detkd.taps import Taps, box_levels, pool_boxes, pool_levels


class PrototypeDistiller(Distiller):
    """Base of the distillers that use prototypes: owns the :class:`PrototypeBank`, refreshes it every
    ``refresh_every`` epochs from :meth:`on_epoch_start`, and computes per-batch relations and sigma."""

    Options = PrototypeOptions

    def __init__(self, opts: PrototypeOptions, teacher_channels: list[int], student_channels: list[int],
                 arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        where = f"{self.name}.options"
        if opts.instances == "positive_proposals" and arch != "faster_rcnn":
            raise range_error(f"{where}.instances", f"'gt' for a {arch} student ('positive_proposals' needs a "
                              "two-stage detector, faster_rcnn)", repr(opts.instances))
        if len(teacher_channels) != len(student_channels):
            raise ConfigError(
                f"{where}: teacher has {len(teacher_channels)} pyramid levels, student {len(student_channels)}; "
                "prototypes are per level and need the same levels in both detectors"
            )
        self.bank = PrototypeBank(opts)
        self.refreshed_epoch = -1
        self.stats: dict[str, float] = {}
        # level_stack's padded prototype stacks per (level, device), with the bank entries they came from
        self._stack_cache: dict[tuple[int, str], tuple[list[int], list[Prototypes], Any]] = {}

    # -- Alg. 2 schedule
    def on_epoch_start(self, context: DistillContext) -> None:
        """Reselect the prototypes before epoch ``e`` when e % T == 0 (Alg. 2 line 3), or when there are
        none yet; never twice for the same epoch (a resumed run keeps the checkpoint's prototypes)."""
        due = self.bank.is_empty() or context.epoch % self.opts.refresh_every == 0
        if due and self.refreshed_epoch != context.epoch:
            self.bank.refresh(context)
            fault_point("prototype_refresh")
            self.refreshed_epoch = context.epoch

    def get_extra_state(self) -> dict[str, Any]:
        return {"bank": self.bank.state(), "refreshed_epoch": self.refreshed_epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bank.load_state(state["bank"])
        self.refreshed_epoch = int(state.get("refreshed_epoch", -1))

    # -- per batch
    def instances(self, student: Taps, targets: list[dict[str, Tensor]]) -> Instances:
        """Ground-truth boxes (default) or the student's positive sampled RoIs (``positive_proposals``)."""
        first = int(round(math.log2(student.strides[0])))
        num_levels = pool_levels(student)  # canonical levels as MultiScaleRoIAlign (not Faster R-CNN's "pool")
        device = student.features[0].device
        if self.opts.instances == "positive_proposals":
            if student.rois is None or student.roi_labels is None:
                raise ValueError(f"{self.name}: instances 'positive_proposals' but the student taps have no rois")
            boxes, labels, positions = [], [], []
            start = 0
            for rois, lab in zip(student.rois, student.roi_labels):
                pos = torch.nonzero(lab > 0).squeeze(1)
                boxes.append(rois[pos].detach())
                labels.append(lab[pos])
                positions.append(pos + start)
                start += rois.shape[0]
            offsets = [0] * len(boxes)
            roi_positions: Tensor | None = torch.cat(positions) if positions else None
        else:
            if len(targets) != len(student.features[0]):
                raise ValueError(f"{self.name}: {len(targets)} targets for a batch of {len(student.features[0])}")
            boxes = [t["boxes"].detach() for t in targets]
            labels = [t["labels"] for t in targets]
            offsets, acc = [], 0
            for b in boxes:
                offsets.append(acc)
                acc += int(b.shape[0])
            roi_positions = None
        all_boxes = torch.cat(boxes) if boxes else torch.zeros((0, 4), device=device)
        level = (box_levels(all_boxes, num_levels, first) if all_boxes.shape[0]
                 else torch.zeros(0, dtype=torch.int64, device=device))
        lab = torch.cat(labels).to(torch.int64) if labels else torch.zeros(0, dtype=torch.int64, device=device)
        return Instances(boxes, lab, level, offsets, roi_positions)

    def level_stack(self, level: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                   list[Prototypes]] | None:
        """The prototypes of every class on ``level`` as zero-padded stacks for
        :func:`detkd.distill.global_kd.pgm.project_grouped`: (slot (max class + 1,) int64, -1 for a class without
        prototypes; teacher (C, K, Dt); student (C, K, Ds); K_c (C,) float; the C :class:`Prototypes` in
        slot order, which is ascending class order).

        Cached until the bank's entries for the level change (a refresh or a loaded state replaces them).
        """
        protos = self.bank.protos[level] if level < len(self.bank.protos) else {}
        classes = sorted(c for c, p in protos.items() if p.indices.numel() > 0)
        if not classes:
            return None
        key = (level, str(device))
        cached = self._stack_cache.get(key)
        if (cached is not None and cached[0] == classes
                and all(a is protos[c] for a, c in zip(cached[1], classes))):
            return cached[2]
        ps = [p for c in classes if (p := self.bank.get(level, c, device)) is not None]  # all of them
        k = max(p.indices.numel() for p in ps)
        pt = torch.zeros((len(ps), k, ps[0].teacher.shape[1]), device=device)
        pst = torch.zeros((len(ps), k, ps[0].student.shape[1]), device=device)
        for i, p in enumerate(ps):  # zero rows after a class's K_c prototypes: coordinates 0 (project_grouped)
            pt[i, : p.teacher.shape[0]] = p.teacher
            pst[i, : p.student.shape[0]] = p.student
        slot = torch.full((max(classes) + 1,), -1, dtype=torch.int64, device=device)
        slot[classes] = torch.arange(len(classes), device=device)
        counts = torch.tensor([float(p.indices.numel()) for p in ps], device=device)
        stack = (slot, pt, pst, counts, ps)
        self._stack_cache[key] = (classes, [protos[c] for c in classes], stack)
        return stack

    def relations(self, teacher: Taps, student: Taps, inst: Instances) -> list[LevelRelations]:
        """Per level: pooled features and Eq. 5 coordinates of every instance whose class has prototypes,
        all classes of a level in one :func:`~detkd.distill.global_kd.pgm.project_grouped` call."""
        opts = self.opts
        out = []
        device = student.features[0].device
        labels = inst.labels
        any_instance = inst.num > 0
        with torch.autocast(device_type=device.type, enabled=False):
            fts = instance_features_levels(teacher, inst.boxes, opts.extraction, opts.roi_size)
            fss = instance_features_levels(student, inst.boxes, opts.extraction, opts.roi_size)
            for lv in range(len(student.features)):
                ft, fs = fts[lv].detach().float(), fss[lv].float()
                stack = self.level_stack(lv, device)
                if stack is None or not any_instance:
                    none = torch.zeros(0, dtype=torch.int64, device=device)
                    out.append(LevelRelations(ft, fs, none, ft.new_zeros(0, 0), ft.new_zeros(0, 0),
                                              ft.new_zeros(0), none, []))
                    continue
                slot_of, pt, pst, counts, ps = stack
                # each instance's row in the stacks (-1: its class has no prototypes on this level)
                in_range = (labels >= 0) & (labels < slot_of.shape[0])
                slot = torch.where(in_range, slot_of[labels.clamp(0, slot_of.shape[0] - 1)], -1)
                keep = torch.nonzero(slot >= 0).squeeze(1)
                slot = slot[keep]
                lt, ls = project_grouped(ft[keep], fs[keep], slot, pt, pst, opts.lam, normalize=opts.normalize)
                out.append(LevelRelations(ft, fs, keep, lt.detach(), ls, counts[slot], slot, ps))
        return out

    def sigmas(self, rels: list[LevelRelations], n: int, device: torch.device) -> Tensor:
        """(L, N) sigma of every instance on every level (1 where its class has no prototype)."""
        sig = torch.ones((len(rels), n), device=device)
        if self.opts.sigma == "one":
            return sig
        for lv, rel in enumerate(rels):
            if self.opts.sigma == "paper":
                sig[lv, rel.idx] = paper_sigma(rel.lt, rel.ls)  # the zero padding leaves the norm unchanged
                continue
            for idx, _, _, p in rel.groups:
                sig[lv, idx] = cosine_max_sigma(rel.ft[idx], rel.fs[idx], p.teacher, p.student)
        return sig

    def batch_sigmas(self, teacher: Taps, student: Taps,
                     targets: list[dict[str, Tensor]]) -> tuple[Instances, list[LevelRelations], Tensor]:
        """The batch's instances, their relations and (L, N) sigma; records ``stats``."""
        inst = self.instances(student, targets)
        rels = self.relations(teacher, student, inst)
        sig = self.sigmas(rels, inst.num, student.features[0].device)
        self.record_stats(rels, sig)
        return inst, rels, sig

    @staticmethod
    def canonical_sigma(sig: Tensor, inst: Instances) -> Tensor:
        """(N,) sigma of every instance on its canonical level (for the losses tied to one RoI / anchor)."""
        if not inst.num:
            return sig.new_zeros(0)
        return sig[inst.level, torch.arange(inst.num, device=sig.device)]

    def pooled_sigma(self, teacher: Taps, student: Taps, inst: Instances) -> Tensor:
        """(N,) sigma of every instance from the RoIAlign (``roi_size`` x ``roi_size``, averaged) of its box on
        its canonical level, the level and pooling of the detector's RoI head (torchvision's
        MultiScaleRoIAlign), with the class's prototypes of that level (authors' RoI-score KL weight:
        ``resp_sigma_from: roi_align``). The kind of sigma is ``sigma``; 1 for a class without prototypes."""
        opts = self.opts
        device = student.features[0].device
        sig = torch.ones(inst.num, device=device)
        if not inst.num or opts.sigma == "one":
            return sig
        levels = list(inst.level.split([int(b.shape[0]) for b in inst.boxes]))
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            ft = pool_boxes(teacher, list(inst.boxes), opts.roi_size, levels=levels).float().mean(dim=(2, 3))
            fs = pool_boxes(student, list(inst.boxes), opts.roi_size, levels=levels).float().mean(dim=(2, 3))
            groups = torch.stack([inst.level, inst.labels], dim=1).unique(dim=0).tolist()
            for lv, c in groups:
                p = self.bank.get(lv, c, device)
                if p is None or p.indices.numel() == 0:
                    continue  # no prototypes: the authors' code crashes here; sigma stays 1
                rows = torch.nonzero((inst.level == lv) & (inst.labels == c)).squeeze(1)
                if opts.sigma == "cosine_max":
                    sig[rows] = cosine_max_sigma(ft[rows], fs[rows], p.teacher, p.student)
                else:
                    lt, ls = project(ft[rows], fs[rows], p.teacher, p.student, opts.lam, normalize=opts.normalize)
                    sig[rows] = paper_sigma(lt, ls)
        return sig

    def record_stats(self, rels: list[LevelRelations], sig: Tensor) -> None:
        has = torch.zeros_like(sig, dtype=torch.bool)
        for lv, rel in enumerate(rels):
            has[lv, rel.idx] = True
        vals = sig[has]
        self.stats = {
            "sigma_mean": float(vals.mean()) if vals.numel() else 1.0,
            "sigma_min": float(vals.min()) if vals.numel() else 1.0,
            "proto_covered": float(has.float().mean()) if has.numel() else 0.0,
        }

    def roi_weights(self, student: Taps, inst: Instances, sigma_inst: Tensor) -> Tensor:
        """Faster R-CNN: per sampled RoI, the sigma of its instance if positive, 1 if negative."""
        if student.roi_labels is None:
            raise ValueError(f"{self.name}: the student taps have no roi_labels")
        labels = torch.cat(student.roi_labels)
        w = torch.ones(labels.shape[0], device=labels.device)
        if inst.roi_positions is not None:
            w[inst.roi_positions] = sigma_inst
            return w
        if student.roi_matched_gt is None:
            raise ValueError(f"{self.name}: the student taps have no roi_matched_gt")
        matched = torch.cat([m + off for m, off in zip(student.roi_matched_gt, inst.gt_offsets)])
        pos = labels > 0
        w[pos] = sigma_inst[matched[pos]]
        return w

    def anchor_weights(self, student: Taps, inst: Instances, sigma_inst: Tensor) -> Tensor:
        """One-stage: (N_img, A) per anchor / point, the sigma of its matched instance if positive, else 1."""
        if student.matched_idxs is None:
            raise ValueError(f"{self.name}: the student taps have no matched_idxs")
        matched = torch.stack(student.matched_idxs)
        pos = matched >= 0
        offsets = torch.tensor(inst.gt_offsets, device=matched.device)[:, None]
        w = torch.ones(matched.shape, device=matched.device)
        w[pos] = sigma_inst[(matched + offsets)[pos]]
        return w
