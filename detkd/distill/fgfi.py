"""FGFI: fine-grained feature imitation near objects (Wang et al., "Distilling Object Detectors with
Fine-grained Feature Imitation", CVPR 2019, https://arxiv.org/abs/1906.03609).

Imitation mask I (Sec. 3.1): for every ground-truth box, the IoU with every anchor, its maximum m and the
threshold psi * m (psi = 0.5); a feature location is in I when any of its anchors reaches the threshold of
any box (:func:`detkd.distill.masks.imitation_masks`; on a pyramid the maximum runs over the anchors of
all levels).

Imitation loss (Sec. 3.2):

    L_imitation = 1 / (2 N_p) * sum_l sum_ij I_lij * sum_c (f_adap(s)_lijc - t_lijc)^2,   N_p = sum I

N_p counts mask locations (not location x channel), over all levels and images of the batch, as in the
paper's equation and the authors' code (``norms = mask.sum() * 2``). The paper adds it to the detection
loss with a weight lambda; the authors' code defaults to 0.01, our ``weight``. Their adaptation layer is a
3x3 convolution (followed by a ReLU on VGG features; off here by default because FPN outputs are signed).

Equation numbers are not cited (they could not be checked against the paper's text): the mask and the
loss are cited by their sections (3.1 and 3.2) and written out above instead.

Anchors: RetinaNet / FCOS taps carry the head's anchors; for Faster R-CNN the RPN anchor layout is used
(``taps.anchors`` when the taps record them, else generated per level from ``anchor_sizes`` and
``aspect_ratios``, by default torchvision's 8 x stride and 0.5, 1, 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from detkd.distill.adapters import build_adapters
from detkd.distill.base import Distiller, opt, range_error
from detkd.distill.checks import check_adapters, check_pyramids
from detkd.distill.masks import imitation_mask_batch
from detkd.taps import Taps


@dataclass
class FGFIOptions:
    weight: float = opt(0.01, ge=0)  # lambda; the FGFI authors' code default
    factor: float = opt(0.5, gt=0, le=1)  # psi: threshold = factor * max IoU of each box
    adapter: Literal["conv1x1", "conv3x3", "identity"] = "conv3x3"  # student to teacher width (authors: 3x3)
    adapter_relu: bool = False  # a ReLU after the adapter (authors, on VGG); FPN outputs are signed
    anchor_sizes: list[float] = opt(factory=list, ge=0)  # Faster R-CNN without taps anchors; [] = 8 x stride
    aspect_ratios: list[float] = opt(factory=lambda: [0.5, 1.0, 2.0], ge=0)  # generated anchors (h / w)


class FGFI(Distiller):
    """``fgfi_feat = weight * L_imitation``: the imitation loss of the paper's Sec. 3.2 on the imitation mask
    of Sec. 3.1, with N_p counted over all levels (module docstring; equation number not confirmed)."""

    name = "fgfi"

    Options = FGFIOptions

    def __init__(self, opts: FGFIOptions, teacher_channels: list[int], student_channels: list[int],
                 arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        if opts.anchor_sizes and len(opts.anchor_sizes) != len(teacher_channels):
            raise range_error("fgfi.options.anchor_sizes",
                              f"{len(teacher_channels)} sizes (one per pyramid level) or empty", opts.anchor_sizes)
        self.adapters = build_adapters(student_channels, teacher_channels, opts.adapter, opts.adapter_relu,
                                       where="fgfi.options.adapter")

    def masks(self, student: Taps) -> list[Tensor]:
        """Per level (N, 1, H, W) imitation masks of the batch."""
        masks = imitation_mask_batch(student, self.opts.factor, self.opts.anchor_sizes or None, self.opts.aspect_ratios)
        return [m[:, None] for m in masks]

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        check_pyramids(teacher, student, "fgfi")
        check_adapters(self.adapters, student, "fgfi")
        masks = self.masks(student)
        total = student.features[0].new_zeros((), dtype=torch.float32)
        points = torch.zeros((), dtype=torch.float32, device=total.device)
        for adapter, fs, ft, mask in zip(self.adapters, student.features, teacher.features, masks):
            sq = (adapter(fs).float() - ft.detach().float()) ** 2
            total = total + (sq * mask).sum()
            points = points + mask.sum()
        # no box near any anchor: the sum is an exact (graph-connected) zero, and 0 / 1 stays 0
        loss = total / (2.0 * points).clamp(min=1.0)
        return {"fgfi_feat": self.opts.weight * loss}
