"""MGD: masked generative distillation of the FPN maps (Yang et al., "Masked Generative Distillation",
ECCV 2022, https://arxiv.org/abs/2205.01529).

Sec. 3 of the paper. Instead of imitating the teacher's map T directly (Eq. 1), the student's map S
(C_s, H, W), aligned to the teacher's width by a 1x1 conv when the widths differ, is masked at random
positions and a small generator must regenerate the teacher's FULL map from what is left:

    M_ij = 0 if R_ij < lambda else 1,   R_ij ~ U(0, 1)                     (Eq. 2)
    G(F) = W_l2(ReLU(W_l1(F))),   W_l1, W_l2: 3x3 convs at the teacher's width    (Eq. 3)
    L_dis = sum_l sum_{k,i,j} (T^l_kij - G(f_align(S^l) * M^l)_kij)^2           (Eq. 4)
    L_all = L_det + alpha * L_dis                                                  (Eq. 5)

So a position is masked (zeroed on every channel) with probability lambda = ``mask_ratio`` and kept with
probability 1 - lambda; the mask is drawn per image and per position, afresh at every step and on every
level. As in the authors' code the squared error is summed over channels and positions and divided by the
batch size N (their ``MSELoss(reduction='sum') / N``), per level; the levels are summed.

Defaults: ``alpha`` 2e-5 and ``mask_ratio`` 0.65 for detection (the paper's detection experiments and the
authors' detection configs, yzd-v/MGD ``det/configs/distillers/mgd``: ``alpha_mgd=0.00002,
lambda_mgd=0.65``; classification uses 7e-5 / 0.5, segmentation 2e-5 / 0.75). The generator's convs use
PyTorch's default initialisation; the align conv is the adapter every feature method builds
(:func:`detkd.distill.adapters.build_adapters`): PyTorch's default initialisation of its weight, and a zero
bias.

Randomness: the masks do not use the global RNG. The masks of the k-th call of the distiller (k counted
from the start of the run in the buffer ``calls``, which checkpoints save, so a resumed run continues the
sequence) on DDP rank r come from a ``torch.Generator`` seeded with a mix of (``seed``, k, r), drawn on
the CPU and moved to the maps' device. Two runs with the same ``seed`` therefore draw the same masks,
ranks draw different ones, and MGD does not shift the random stream of the rest of training (the
authors' ``torch.rand`` does).

Where detkd differs: the levels are every level except Faster R-CNN's ``pool`` unless ``levels`` says
otherwise (the authors hook the FPN output convs); padded cells of the batch are positions like any
other (as in the authors' code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from detkd.distill.adapters import level_adapters
from detkd.distill.base import Distiller, opt
from detkd.distill.checks import check_levels
from detkd.runtime import dist
from detkd.taps import Taps


@dataclass
class MGDOptions:
    alpha: float = opt(2e-5, ge=0)  # alpha_mgd: weight of each level's loss (summed over levels); 2e-5 for detection
    mask_ratio: float = opt(0.65, ge=0, lt=1)  # lambda_mgd: probability that a position of the student map
    # is masked
    seed: int = opt(0, unbounded=True)  # seeds the masks (with the call count and the DDP rank): same seed, same masks
    adapter: Literal["auto", "conv1x1", "conv3x3", "identity"] = "auto"  # the align conv: student to teacher
    # width; auto: a 1x1 conv when the widths differ
    levels: list[int] = opt(factory=list, ge=0)  # pyramid indices; empty = all but Faster R-CNN 'pool'


def keep_mask(n: int, height: int, width: int, ratio: float, generator: torch.Generator) -> Tensor:
    """Eq. 2: (n, 1, height, width) float 0/1 on the CPU, 0 where R < ratio (masked), R ~ U(0, 1) drawn from
    ``generator`` per image and position (shared by the channels)."""
    r = torch.rand((n, 1, height, width), generator=generator)
    return (r >= ratio).float()


def mgd_loss(generated: Tensor, teacher: Tensor) -> Tensor:
    """Eq. 4 for one level: the squared error summed over channels and positions, divided by the batch size
    N. (N, C, H, W) maps; the teacher is detached."""
    return ((generated.float() - teacher.detach().float()) ** 2).sum() / generated.shape[0]


def mask_seed(seed: int, call: int, rank: int) -> int:
    """A generator seed for call ``call`` on rank ``rank``: distinct small inputs give distinct seeds."""
    return ((seed * 1_000_003 + call) * 65_537 + rank) % (2**63)


class MGDLevel(nn.Module):
    """The align conv (or identity) and the generator G of one level (Eq. 3)."""

    def __init__(self, align: nn.Module, teacher_channels: int):
        super().__init__()
        self.align = align
        self.generator = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )

    def forward(self, student: Tensor, keep: Tensor) -> Tensor:
        """G(f_align(S) * M): the teacher-width map generated from the masked student map."""
        return self.generator(self.align(student) * keep)


class MGD(Distiller):
    """``mgd_feat = alpha * sum_l sum (T_l - G_l(align_l(S_l) * M_l))^2 / N``: regenerate the teacher's map
    from a randomly masked student map."""

    name = "mgd"

    Options = MGDOptions

    def __init__(self, opts: MGDOptions, teacher_channels: list[int], student_channels: list[int], arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        self.levels, aligns = level_adapters(opts.levels, opts.adapter, teacher_channels, student_channels, arch, "mgd")
        tc = [teacher_channels[i] for i in self.levels]
        self.level_modules = nn.ModuleList(MGDLevel(a, c) for a, c in zip(aligns, tc))
        # forward calls so far: seeds the masks; a buffer so that checkpoints (and resume) keep it
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        check_levels(self.levels, teacher, student, "mgd")
        gen = torch.Generator().manual_seed(mask_seed(self.opts.seed, int(self.calls), dist.rank()))
        self.calls += 1
        losses = []
        for mod, i in zip(self.level_modules, self.levels):
            fs, ft = student.features[i], teacher.features[i]
            n, _, h, w = fs.shape
            keep = keep_mask(n, h, w, self.opts.mask_ratio, gen).to(device=fs.device, dtype=fs.dtype)
            losses.append(mgd_loss(mod(fs, keep), ft))
        return {"mgd_feat": self.opts.alpha * torch.stack(losses).sum()}
