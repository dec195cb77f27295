"""GID: General Instance Distillation for Object Detection (Dai et al., CVPR 2021,
https://arxiv.org/abs/2103.02340).

No ground truth is used to choose what to distil. The general instance selection module (GISM) compares
the teacher's and the student's predictions box by box:

- GI score of a prediction r: max over foreground classes of |P_t(r, c) - P_s(r, c)|;
- GI box: the box of the model that is more confident at r (max class probability);
- class-agnostic NMS at IoU 0.3 on the GI scores, then the top K (10) per image.

Three losses on the selected general instances (GIs):

- feature: RoIAlign of each GI on its FPN level in both pyramids, 1x1 adapter on the student,
  1/K sum_i ||t_i - adapt(s_i)||_2 (the L2 norm, not squared): ``gid_feat``;
- relation: RKD distance loss among each image's GIs: pairwise L2 distances of the pooled
  embeddings, each set normalised by its mean, smooth L1 between student and teacher: ``gid_relation``;
- response: head outputs where the detector's own assignment rule makes a GI box the target:
  classification distillation ``gid_resp_cls`` and regression distillation ``gid_resp_reg``.

Total: L_GT + l1 L_feat + l2 L_relation + l3 L_resp. Predictions come from the heads: for
RetinaNet / FCOS every anchor (point) of the dense head, decoded with the detector's own box coder; for
Faster R-CNN the RoI head on the student's sampled RoIs (the teacher's box head runs on the same RoIs).
Choices beyond the paper are written in ``docs/methods.md``.

Equation numbers are not cited (they could not be checked against the paper's text): each piece is cited
by the part of the paper's method section it comes from (GISM; feature-based, relation-based and response-based
distillation; the overall loss) and written out above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder, Matcher
from torchvision.ops import box_iou, clip_boxes_to_image, nms

from detkd.config import ConfigError
from detkd.distill.base import Distiller, opt, range_error
from detkd.distill.losses import sigmoid_kl
from detkd.taps import TapRequest, Taps, pool_boxes

# torchvision's box coders: RetinaNet BoxCoder(1, 1, 1, 1), FCOS BoxLinearCoder(normalize_by_size=True),
# Faster R-CNN RoI head BoxCoder(10, 10, 5, 5)
RETINANET_CODER = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
FCOS_CODER = BoxLinearCoder(normalize_by_size=True)
ROI_CODER = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
FCOS_CENTER_SAMPLING_RADIUS = 1.5  # torchvision FCOS default
ROI_SMOOTH_L1_BETA = 1.0 / 9  # torchvision fastrcnn_loss


@dataclass
class GIDOptions:
    """Options of ``gid``. Loss weights default to the values of the authors' reproduction."""

    feature_weight: float = opt(5e-3, ge=0)  # l1 of the overall loss
    relation_weight: float = opt(40.0, ge=0)  # l2
    response_weight: float = opt(1.0, ge=0)  # l3
    top_k: int = opt(10, ge=1)  # general instances per image
    nms_iou: float = opt(0.3, gt=0, le=1)  # NMS IoU among the general-instance candidates (the paper's 0.3)
    pre_nms_top_n: int = opt(1000, ge=1)  # candidates per image (by GI score) kept before NMS (at least top_k)
    min_score: float = opt(0.0, unbounded=True)  # a candidate needs a GI score strictly above this
    pool_size: int = opt(7, ge=1)  # RoIAlign output size of the feature / relation embeddings
    resp_iou: float = opt(0.5, gt=0, le=1)  # IoU that assigns an anchor (RetinaNet) or a RoI (Faster R-CNN) to a GI box
    temperature: float = opt(1.0, gt=0)  # of the classification response distillation


# ----------------------------------------------------------------------------------------------------------
# General instance selection


def gi_scores(probs_t: Tensor, probs_s: Tensor) -> tuple[Tensor, Tensor]:
    """GISM's GI score and GI-box choice (the paper's general instance selection): on (..., C) foreground
    class probabilities, the GI score max_c |P_t - P_s| and whether the teacher is the more confident model
    (max_c P_t > max_c P_s; a tie takes the student's box)."""
    score = (probs_t - probs_s).abs().amax(dim=-1)
    teacher_wins = probs_t.amax(dim=-1) > probs_s.amax(dim=-1)
    return score, teacher_wins


def general_instances(probs_t: Tensor, probs_s: Tensor, boxes_t: Tensor, boxes_s: Tensor,
                      image_size: tuple[int, int] | None = None, nms_iou: float = 0.3, top_k: int = 10,
                      min_score: float = 0.0) -> tuple[Tensor, Tensor]:
    """GISM for one image on R candidate predictions: probabilities (R, C), decoded boxes (R, 4) of each
    model. Returns the selected boxes (K, 4) and their GI scores (K,), highest score first.

    Boxes are clipped to ``image_size`` (h, w) when given; empty boxes and scores <= ``min_score`` are
    dropped, then class-agnostic NMS at ``nms_iou`` and the ``top_k`` best.
    """
    score, teacher_wins = gi_scores(probs_t, probs_s)
    boxes = torch.where(teacher_wins[:, None], boxes_t, boxes_s).float()
    if image_size is not None:
        boxes = clip_boxes_to_image(boxes, image_size)
    keep = (score > min_score) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, score = boxes[keep], score[keep].float()
    keep = nms(boxes, score, nms_iou)[:top_k]  # nms returns indices by decreasing score
    return boxes[keep], score[keep]


def decode_dense(arch: str, regression: Tensor, anchors: Tensor) -> Tensor:
    """Boxes from one-stage regression outputs (R, 4) at anchors (R, 4), with the detector's box coder."""
    if arch == "retinanet":
        return RETINANET_CODER.decode_single(regression.float(), anchors.float())
    if arch == "fcos":
        return FCOS_CODER.decode(regression.float(), anchors.float())
    raise ValueError(f"gid: no dense box decoder for arch {arch!r}")


def decode_roi(deltas: Tensor, rois: Tensor, classes: Tensor) -> Tensor:
    """Faster R-CNN boxes: the deltas (R, (C+1)*4) of class ``classes`` (R,) applied to the RoIs (R, 4)."""
    per_class = deltas.float().reshape(deltas.shape[0], -1, 4)
    picked = per_class[torch.arange(deltas.shape[0], device=deltas.device), classes]
    return ROI_CODER.decode_single(picked, rois.float())


@torch.no_grad()
def select_dense(teacher: Taps, student: Taps, opts: GIDOptions) -> list[Tensor]:
    """General instances per image from the dense heads of RetinaNet / FCOS (column 0 never positive)."""
    probs_t = torch.sigmoid(teacher.cls_logits[..., 1:].float())
    probs_s = torch.sigmoid(student.cls_logits[..., 1:].float())
    score, _ = gi_scores(probs_t, probs_s)  # (N, A)
    out = []
    for i, anchors in enumerate(student.anchors):
        m = min(opts.pre_nms_top_n, score.shape[1])
        idx = score[i].topk(m).indices
        boxes_t = decode_dense(student.arch, teacher.bbox_regression[i, idx], anchors[idx])
        boxes_s = decode_dense(student.arch, student.bbox_regression[i, idx], anchors[idx])
        boxes, _ = general_instances(probs_t[i, idx], probs_s[i, idx], boxes_t, boxes_s,
                                     tuple(student.image_sizes[i]), opts.nms_iou, opts.top_k, opts.min_score)
        out.append(boxes)
    return out


@torch.no_grad()
def select_roi(teacher: Taps, student: Taps, opts: GIDOptions) -> list[Tensor]:
    """General instances per image from the Faster R-CNN RoI head (softmax over background + classes; the
    GI score uses the foreground classes). Each model's box: its deltas of its most probable class."""
    probs_t = F.softmax(teacher.class_logits.float(), dim=1)[:, 1:]
    probs_s = F.softmax(student.class_logits.float(), dim=1)[:, 1:]
    rois = torch.cat(student.rois)
    boxes_t = decode_roi(teacher.box_deltas, rois, probs_t.argmax(1) + 1)
    boxes_s = decode_roi(student.box_deltas, rois, probs_s.argmax(1) + 1)
    out = []
    start = 0
    for i, r in enumerate(student.rois):
        sl = slice(start, start + r.shape[0])
        start += r.shape[0]
        score, _ = gi_scores(probs_t[sl], probs_s[sl])
        idx = score.topk(min(opts.pre_nms_top_n, score.shape[0])).indices
        boxes, _ = general_instances(probs_t[sl][idx], probs_s[sl][idx], boxes_t[sl][idx], boxes_s[sl][idx],
                                     tuple(student.image_sizes[i]), opts.nms_iou, opts.top_k, opts.min_score)
        out.append(boxes)
    return out


# ----------------------------------------------------------------------------------------------------------
# Response assignment: which head outputs belong to a general instance


def retinanet_assign(anchors: Tensor, gi_boxes: Tensor, iou: float = 0.5) -> Tensor:
    """(A,) bool: anchors RetinaNet's matcher would make positive for the GI boxes (IoU >= ``iou``, plus
    each box's best anchors, as torchvision's Matcher with allow_low_quality_matches)."""
    if gi_boxes.shape[0] == 0:
        return torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    matcher = Matcher(iou, iou, allow_low_quality_matches=True)
    return matcher(box_iou(gi_boxes.float(), anchors.float())) >= 0


def fcos_assign(anchors: Tensor, num_anchors_per_level: list[int], gi_boxes: Tensor,
                radius: float = FCOS_CENTER_SAMPLING_RADIUS) -> Tensor:
    """(A,) bool: FCOS points torchvision's FCOS assigner (``FCOS.compute_loss``) would make positive for
    the GI boxes: the point lies inside the box and within ``radius`` x anchor size of its centre, and the
    box's largest side distance from the point falls in the level's range (4 x .. 8 x anchor size; the
    first level has no lower bound and the last no upper bound)."""
    if gi_boxes.shape[0] == 0:
        return torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    anchors = anchors.float()
    boxes = gi_boxes.float()
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # (A, 2)
    sizes = anchors[:, 2] - anchors[:, 0]  # (A,)
    box_centers = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2)
    near = (centers[:, None] - box_centers[None]).abs().amax(dim=2) < radius * sizes[:, None]  # (A, M)
    x, y = centers[:, 0:1], centers[:, 1:2]
    dist = torch.stack([x - boxes[None, :, 0], y - boxes[None, :, 1], boxes[None, :, 2] - x,
                        boxes[None, :, 3] - y], dim=2)  # (A, M, 4) left, top, right, bottom
    inside = dist.amin(dim=2) > 0
    lower = sizes * 4
    lower[: num_anchors_per_level[0]] = 0
    upper = sizes * 8
    upper[-num_anchors_per_level[-1]:] = math.inf
    reach = dist.amax(dim=2)
    in_range = (reach > lower[:, None]) & (reach < upper[:, None])
    return (near & inside & in_range).any(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Losses


def _image_weights(counts: list[int], device: torch.device) -> Tensor:
    """1 / K_i for every instance of image i (the per-image mean of the feature loss)."""
    return torch.cat([torch.full((k,), 1.0 / k, device=device) for k in counts if k > 0]
                     or [torch.zeros(0, device=device)])


def feature_loss(t_pooled: Tensor, s_adapted: Tensor, counts: list[int], batch_size: int) -> Tensor:
    """The paper's feature-based distillation loss: per image, 1/K_i sum_i ||t_i - adapt(s_i)||_2 over its
    K_i instances (0 when K_i = 0), averaged over the ``batch_size`` images. Inputs (sum K_i, C, s, s) in
    image order."""
    dist = (t_pooled.detach().float() - s_adapted.float()).flatten(1).norm(dim=1)
    return (dist * _image_weights(counts, dist.device)).sum() / batch_size


def distance_relation(x: Tensor) -> Tensor:
    """Pairwise L2 distances of the rows of ``x`` (K, D) over the pairs i < j, divided by their mean
    (the RKD distance potential). The square root is taken of distances clamped at 1e-12, so the
    gradient of coincident embeddings stays finite."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    d = ((x[i] - x[j]) ** 2).sum(dim=1).clamp(min=1e-12).sqrt()
    return d / d.mean().clamp(min=1e-12)


def relation_loss(t_emb: Tensor, s_emb: Tensor, counts: list[int], batch_size: int) -> Tensor:
    """The paper's relation-based distillation loss (RKD's distance loss within each image's GIs): per
    image, smooth L1 (beta 1) between student and teacher normalised distances, averaged over the image's
    pairs; images with fewer than 3 instances give 0 (two points always have normalised distance 1).
    Averaged over the ``batch_size`` images. Embeddings (sum K_i, D); teacher and student dimensions may
    differ."""
    total = s_emb.new_zeros((), dtype=torch.float32)
    start = 0
    for k in counts:
        if k >= 3:
            dt = distance_relation(t_emb[start:start + k].detach().float())
            ds = distance_relation(s_emb[start:start + k].float())
            total = total + F.smooth_l1_loss(ds, dt, beta=1.0, reduction="mean")
        start += k
    if s_emb.shape[0] > 0:  # keep the graph connected for images that contributed nothing
        total = total + 0.0 * s_emb.float().sum()
    return total / batch_size


def dense_response_loss(t_cls: Tensor, s_cls: Tensor, t_reg: Tensor, s_reg: Tensor, mask: Tensor,
                        temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The paper's response-based loss for one-stage heads, on the anchors in ``mask`` (N, A) (those the
    detector's assigner gives to a GI box): binary KL summed over the foreground classes (column 0 is never
    positive and is left out), L1 summed over the 4 regression outputs (the loss torchvision's RetinaNet
    trains them with), each averaged over the selected anchors."""
    num = mask.sum().clamp(min=1).float()
    cls = sigmoid_kl(s_cls[mask][:, 1:], t_cls[mask][:, 1:], temperature).sum() / num
    reg = (s_reg[mask].float() - t_reg[mask].detach().float()).abs().sum() / num
    return cls, reg


def roi_response_loss(t_logits: Tensor, s_logits: Tensor, t_deltas: Tensor, s_deltas: Tensor, mask: Tensor,
                      temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The paper's response-based loss for the Faster R-CNN RoI head, on the RoIs in ``mask`` (R,):
    KL(softmax_t || softmax_s) over background + classes at ``temperature`` times T^2, and smooth L1 (beta
    1/9, as torchvision's box loss) summed over the 4 deltas of the teacher's most probable foreground class;
    averaged over the RoIs."""
    num = mask.sum().clamp(min=1).float()
    log_ps = F.log_softmax(s_logits[mask].float() / temperature, dim=1)
    log_pt = F.log_softmax(t_logits[mask].detach().float() / temperature, dim=1)
    cls = (log_pt.exp() * (log_pt - log_ps)).sum() * temperature**2 / num
    classes = t_logits[mask][:, 1:].argmax(dim=1) + 1
    rows = torch.arange(classes.shape[0], device=classes.device)
    per_class = s_deltas.shape[1] // 4  # explicit: reshape cannot infer -1 when no RoI is selected
    ds = s_deltas[mask].reshape(classes.shape[0], per_class, 4)[rows, classes].float()
    dt = t_deltas[mask].reshape(classes.shape[0], per_class, 4)[rows, classes].detach().float()
    reg = F.smooth_l1_loss(ds, dt, beta=ROI_SMOOTH_L1_BETA, reduction="sum") / num
    return cls, reg


# ----------------------------------------------------------------------------------------------------------
# Distiller


class GID(Distiller):
    """General Instance Distillation: feature, relation and response losses on general instances, weighted by
    l1, l2, l3 of the paper's overall loss (module docstring)."""

    name = "gid"

    Options = GIDOptions

    def __init__(self, opts: GIDOptions, teacher_channels: list[int], student_channels: list[int], arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        if arch not in self.archs:
            raise ConfigError(f"gid: unsupported arch {arch!r} (supported: {', '.join(self.archs)})")
        if opts.pre_nms_top_n < opts.top_k:
            raise range_error("gid.options.pre_nms_top_n", f">= top_k ({opts.top_k})", opts.pre_nms_top_n)
        if len(set(teacher_channels)) != 1 or len(set(student_channels)) != 1:
            raise ConfigError(f"gid: instances of all pyramid levels share one adapter, so every level needs "
                              f"the same width (teacher {teacher_channels}, student {student_channels})")
        # one 1x1 adapter after RoIAlign, shared by the levels (pooled instances of all levels are one batch)
        self.adapter = nn.Conv2d(student_channels[0], teacher_channels[0], kernel_size=1)

    def request(self) -> TapRequest:
        if self.arch == "faster_rcnn":
            return TapRequest(features=True, roi_outputs=True)
        return TapRequest(features=True, dense_outputs=True)

    def _check(self, teacher: Taps, student: Taps) -> None:
        if teacher.arch != student.arch or student.arch != self.arch:
            raise ValueError(f"gid: built for {self.arch}, got teacher {teacher.arch} and student "
                             f"{student.arch} taps; GID compares the two heads output by output, so both "
                             "must be this family")
        if len(teacher.features) != len(student.features):
            raise ValueError(f"gid: teacher has {len(teacher.features)} pyramid levels, student "
                             f"{len(student.features)}")
        if self.arch == "faster_rcnn":
            fields = ["class_logits", "box_deltas"]
            missing = [f for f in fields if getattr(teacher, f) is None] + \
                [f for f in fields + ["rois"] if getattr(student, f) is None]
            if missing:
                raise ValueError(f"gid: taps lack {missing} (request roi_outputs from the teacher)")
            if teacher.class_logits.shape != student.class_logits.shape:
                raise ValueError(f"gid: teacher class_logits {tuple(teacher.class_logits.shape)} and student "
                                 f"{tuple(student.class_logits.shape)} differ: the teacher's box head must "
                                 "run on the student's RoIs")
        else:
            fields = ["cls_logits", "bbox_regression"]
            missing = [f for f in fields if getattr(teacher, f) is None] + \
                [f for f in fields + ["anchors", "num_anchors_per_level"] if getattr(student, f) is None]
            if missing:
                raise ValueError(f"gid: taps lack {missing} (request dense_outputs from the teacher)")
            for f in fields:
                if getattr(teacher, f).shape != getattr(student, f).shape:
                    raise ValueError(f"gid: teacher {f} {tuple(getattr(teacher, f).shape)} and student "
                                     f"{tuple(getattr(student, f).shape)} differ: the heads must share "
                                     "anchors and classes")

    def select(self, teacher: Taps, student: Taps) -> list[Tensor]:
        """The general instances of every image, (K_i, 4) in the transformed frame (no gradient)."""
        if self.arch == "faster_rcnn":
            return select_roi(teacher, student, self.opts)
        return select_dense(teacher, student, self.opts)

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """gid_feat, gid_relation, gid_resp_cls, gid_resp_reg (weighted). ``targets`` are not used."""
        self._check(teacher, student)
        opts = self.opts
        batch = len(student.image_sizes)
        gi = self.select(teacher, student)
        counts = [int(b.shape[0]) for b in gi]

        # each GI on its FPN level (the FPN paper's level rule; Faster R-CNN's 'pool' level left out, as in
        # torchvision's MultiScaleRoIAlign), the same level in both pyramids
        t_pool = pool_boxes(teacher, gi, opts.pool_size).detach().float()
        s_pool = pool_boxes(student, gi, opts.pool_size)
        s_adapted = self.adapter(s_pool)
        feat = feature_loss(t_pool, s_adapted, counts, batch)
        relation = relation_loss(t_pool.flatten(1), s_pool.flatten(1), counts, batch)

        if self.arch == "faster_rcnn":
            masks = []
            for rois, boxes in zip(student.rois, gi):
                if boxes.shape[0] == 0 or rois.shape[0] == 0:
                    masks.append(torch.zeros(rois.shape[0], dtype=torch.bool, device=rois.device))
                else:
                    masks.append(box_iou(rois.float(), boxes).amax(dim=1) >= opts.resp_iou)
            resp_cls, resp_reg = roi_response_loss(teacher.class_logits, student.class_logits,
                                                   teacher.box_deltas, student.box_deltas, torch.cat(masks),
                                                   opts.temperature)
        else:
            if self.arch == "retinanet":
                masks = [retinanet_assign(a, b, opts.resp_iou) for a, b in zip(student.anchors, gi)]
            else:
                per_level = list(student.num_anchors_per_level)
                masks = [fcos_assign(a, per_level, b) for a, b in zip(student.anchors, gi)]
            resp_cls, resp_reg = dense_response_loss(teacher.cls_logits, student.cls_logits,
                                                     teacher.bbox_regression, student.bbox_regression,
                                                     torch.stack(masks), opts.temperature)

        # the adapter sees no instance on a batch without GIs; keep it in the graph (DDP expects every
        # parameter to take part in every step)
        feat = feat + 0.0 * sum(p.sum() for p in self.adapter.parameters())
        return {
            "gid_feat": opts.feature_weight * feat,
            "gid_relation": opts.relation_weight * relation,
            "gid_resp_cls": opts.response_weight * resp_cls,
            "gid_resp_reg": opts.response_weight * resp_reg,
        }
