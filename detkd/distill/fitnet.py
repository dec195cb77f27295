"""FitNet hints on every pyramid level (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, https://arxiv.org/abs/1412.6550).

The paper's hint loss L_HT (Eq. 3, Sec. 2.2) is 1/2 ||u_h(x) - r(v_g(x))||^2 between the teacher's hint
layer u_h and a regressor r on the student's guided layer v_g. Here the hint and guided layers are the FPN
outputs of each level, the regressor is a per-level convolution, and the squared error is averaged over
elements (mean squared error) so that the loss does not grow with the map size; the levels are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.distill.adapters import build_adapters
from detkd.distill.base import Distiller, opt
from detkd.distill.checks import check_adapters, check_pyramids
from detkd.taps import Taps


@dataclass
class FitNetOptions:
    weight: float = opt(1.0, ge=0)  # multiplies the mean over levels of the MSE
    adapter: Literal["conv1x1", "conv3x3", "identity"] = "conv1x1"  # the regressor from student to teacher width


class FitNet(Distiller):
    """``fitnet_feat = weight * mean_l MSE(adapter_l(S_l), T_l)`` over the pyramid levels l: Eq. 3 of the paper
    (L_HT) on each level, the adapter as the regressor r, the 1/2 sum replaced by a mean over elements."""

    name = "fitnet"

    Options = FitNetOptions

    def __init__(self, opts: FitNetOptions, teacher_channels: list[int], student_channels: list[int],
                 arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        self.adapters = build_adapters(student_channels, teacher_channels, opts.adapter,
                                       where="fitnet.options.adapter")

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        check_pyramids(teacher, student, "fitnet")
        check_adapters(self.adapters, student, "fitnet")
        losses = []
        for adapter, fs, ft in zip(self.adapters, student.features, teacher.features):
            losses.append(F.mse_loss(adapter(fs).float(), ft.detach().float()))
        return {"fitnet_feat": self.opts.weight * torch.stack(losses).mean()}
