"""PKD: Pearson-correlation feature imitation on the FPN maps (Cao et al., "PKD: General Distillation
Framework for Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022,
https://arxiv.org/abs/2207.02039).

The paper's method section (equation numbers not cited: they could not be checked against the paper's
text, so the formulas are written out): the teacher's and the student's FPN maps differ in magnitude
(across detector types even more), and the levels and channels of large magnitude dominate a plain MSE.
PKD therefore imitates the Pearson correlation coefficient r of each channel instead of its values: both maps are
standardised to zero mean and unit variance, then compared by half the mean squared error,

    s_hat = (s - mean(s)) / std(s),   t_hat = (t - mean(t)) / std(t)
    L_FPN = 1/2 * mean (s_hat - t_hat)^2

With population statistics over the H x W positions of one channel of one image this is exactly
``1 - r(s, t)`` averaged over channels and images (``stats: instance``, the default: the paper's
per-sample formula). The loss is **scale-free**: multiplying the teacher's or the student's map by a
positive constant (per channel, per image) or adding a constant leaves it unchanged, which is why it
works across detector families.

``stats: batch`` is the authors' released implementation (mmrazor ``PKDLoss``): mean and standard
deviation per channel over the batch and the positions together, the standard deviation with Bessel's
correction, ``(x - mean) / (std + 1e-6)``. Both modes divide by ``sqrt(var + eps^2)`` instead (the
same for any real variance, and a finite gradient at variance 0), so a constant channel or a 1x1 level
standardises to 0 instead of NaN. A 1x1 level then gets a zero gradient; a constant channel over several
positions gets a finite but large one (it scales as 1 / eps, as with the authors' ``std + 1e-6``): the
standardisation of a flat channel is ill-conditioned.

Widths: when teacher and student differ (e.g. 256 vs 64 channels) the student goes through a 1x1
convolution first (``adapter: auto``); equal widths are compared directly, as the authors do.

Levels and weight: the loss of each level is weighted by ``weight`` and the levels are summed. The
default weight 6 is the authors' (mmrazor ``configs/distill/mmdet/pkd``: ``PKDLoss(loss_weight=6)`` on each
of the first four FPN outputs, for Faster R-CNN R101 -> R50 and for the RetinaNet / FCOS students).
detkd's default levels are every level except Faster R-CNN's ``pool`` (the authors' four for Faster
R-CNN; all five P3-P7 for RetinaNet / FCOS, where the authors' configs leave out P7: ``levels: [0, 1, 2,
3]`` reproduces them). Padded cells of the batch count in the statistics, as in the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from detkd.distill.base import opt
from detkd.distill.levelwise import LevelwiseDistiller
from detkd.distill.losses import standardize


@dataclass
class PKDOptions:
    weight: float = opt(6.0, ge=0)  # loss weight of each level (summed over levels); 6 in the authors' configs
    stats: Literal["instance", "batch"] = "instance"  # standardise per image and channel (the paper) or
    # per channel over the whole batch (the authors' code)
    eps: float = opt(1e-6, ge=0)  # added to the standard deviation, so constant channels give 0, not NaN
    adapter: Literal["auto", "conv1x1", "conv3x3", "identity"] = "auto"  # maps student to teacher width;
    # auto: a 1x1 conv only where the widths differ
    levels: list[int] = opt(factory=list, ge=0)  # pyramid indices; empty = all but Faster R-CNN 'pool'


def pkd_loss(student: Tensor, teacher: Tensor, stats: str = "instance", eps: float = 1e-6) -> Tensor:
    """L_FPN of the module docstring: half the mean squared error of the standardised maps (1 - Pearson r per
    channel with ``stats: instance``); the teacher is detached."""
    s = standardize(student, stats, eps)
    t = standardize(teacher.detach(), stats, eps)
    return 0.5 * ((s - t) ** 2).mean()


class PKD(LevelwiseDistiller):
    """``pkd_feat = weight * sum_l 1/2 MSE(standardise(adapter_l(S_l)), standardise(T_l))`` over the levels l."""

    name = "pkd"
    loss_name = "pkd_feat"

    Options = PKDOptions

    def level_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return pkd_loss(student, teacher, self.opts.stats, self.opts.eps)
