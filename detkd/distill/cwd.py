"""CWD: channel-wise distillation of the FPN maps (Shu et al., "Channel-wise Knowledge Distillation for
Dense Prediction", ICCV 2021, https://arxiv.org/abs/2011.13256).

The paper's method section (equation numbers not cited: they could not be checked against the paper's
text, so the formulas are written out): each channel c of a map y (C, H, W) becomes a distribution over its
H W positions by a softmax with temperature tau,

    phi(y_c)_i = exp(y_{c,i} / tau) / sum_j exp(y_{c,j} / tau)

and the student imitates the teacher channel by channel with the KL divergence, scaled by tau^2 (as in
Hinton et al., so that gradients keep their size across temperatures) and averaged over the channels:

    L_cwd = tau^2 / C * sum_c sum_i phi(y^T_c)_i * log(phi(y^T_c)_i / phi(y^S_c)_i)

Over a batch of N images the sum runs over images and channels and is divided by N C, as the authors' code
does (``loss / (C * N)``). The KL pays most attention to the positions where the teacher's channel is
largest (the salient regions) and ignores each channel's overall level, since the softmax is
shift-invariant.

Widths: a 1x1 conv maps the student to the teacher's width when they differ (``adapter: auto``; the
authors' ``align`` conv).

Defaults: ``tau`` 1 and ``weight`` 5 per level, summed over levels: the authors' released detection config
(pppppM/mmdetection-distiller ``cwd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py``: tau=1.0,
weight=5.0 on each FPN output, RetinaNet R50 37.4 -> 40.5 mAP). mmrazor's CWD configs for GFL / RetinaNet
use tau=1 and loss_weight=10. detkd computes the KL divergence of the paper, ``sum p_T (log p_T - log p_S)``,
as mmrazor's ``ChannelWiseDivergence`` does (it is 0 when the two maps agree). Where detkd differs: the
levels are every level except Faster R-CNN's ``pool`` unless ``levels`` says otherwise. Padded cells of
the batch are positions like any other, as in the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from detkd.distill.base import opt
from detkd.distill.levelwise import LevelwiseDistiller


@dataclass
class CWDOptions:
    weight: float = opt(5.0, ge=0)  # loss weight of each level (summed over levels); 5 in the authors' RetinaNet config
    tau: float = opt(1.0, gt=0)  # softmax temperature over the positions of a channel; the loss is scaled by tau^2
    adapter: Literal["auto", "conv1x1", "conv3x3", "identity"] = "auto"  # maps student to teacher width;
    # auto: a 1x1 conv when the widths differ
    levels: list[int] = opt(factory=list, ge=0)  # pyramid indices; empty = all but Faster R-CNN 'pool'


def channel_kl(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """L_cwd of the module docstring (the paper's channel-wise loss): tau^2 / (N C) * sum over images n and
    channels c of KL(phi(T_nc) || phi(S_nc)), phi = softmax over the H W positions of ``map / tau``.
    (N, C, H, W) maps; the teacher is detached. float32 scalar."""
    n, c = student.shape[:2]
    log_ps = F.log_softmax(student.float().flatten(2) / tau, dim=2)
    log_pt = F.log_softmax(teacher.detach().float().flatten(2) / tau, dim=2)
    # log_softmax on both sides (not log of a softmax): finite for any finite map, whatever tau
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    return kl * tau**2 / (n * c)


class CWD(LevelwiseDistiller):
    """``cwd_feat = weight * sum_l L_cwd(adapter_l(S_l), T_l)``: per-channel spatial distributions (KL)."""

    name = "cwd"
    loss_name = "cwd_feat"

    Options = CWDOptions

    def level_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return channel_kl(student, teacher, self.opts.tau)
