"""The skeleton shared by the feature methods whose loss is one map-to-map term per pyramid level, summed
(CWD, PKD): the levels they use, one adapter per used level, the input checks and the weighted sum."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from detkd.distill.adapters import level_adapters
from detkd.distill.base import Distiller
from detkd.distill.checks import check_levels
from detkd.taps import Taps


class LevelwiseDistiller(Distiller):
    """``{loss_name: weight * sum_l level_loss(adapter_l(S_l), T_l)}`` over the used levels l.

    A subclass sets ``name``, ``Options`` (with ``weight``, ``adapter`` and ``levels`` fields), ``loss_name``,
    and :meth:`level_loss`."""

    loss_name: ClassVar[str]

    def __init__(self, opts: Any, teacher_channels: list[int], student_channels: list[int], arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        self.levels, self.adapters = level_adapters(opts.levels, opts.adapter, teacher_channels, student_channels,
                                                    arch, self.name)

    def level_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The term of one level: the adapted student map and the teacher map, (N, C, H, W) each."""
        raise NotImplementedError

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        check_levels(self.levels, teacher, student, self.name)
        losses = [self.level_loss(adapter(student.features[i]), teacher.features[i])
                  for adapter, i in zip(self.adapters, self.levels)]
        return {self.loss_name: self.opts.weight * torch.stack(losses).sum()}
