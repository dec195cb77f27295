"""FGD: Focal and Global Knowledge Distillation for Detectors (Yang et al., CVPR 2022,
https://arxiv.org/abs/2111.11837).

Feature distillation on every FPN level, in four terms (equation numbers are the paper's; its Sec. 4.2
names Eq. 9, 10 and 12 as the terms weighted by alpha / beta, gamma and lambda):

- focal feature loss (Eq. 9, Sec. 3.1): the squared difference of aligned student and teacher maps,
  weighted by the TEACHER's spatial and channel attention and split by a foreground mask (ground-truth
  boxes, each cell weighted by 1 / box area in cells) and a background mask (the rest, normalised to
  sum 1 per image): ``fgd_fg`` (alpha) and ``fgd_bg`` (beta). The binary, scale and attention masks are
  the equations of Sec. 3.1 that precede Eq. 9 (:func:`foreground_mask`, :func:`background_mask`,
  :func:`attention`);
- attention loss (Eq. 10, Sec. 3.1): L1 between student and teacher spatial and channel attentions:
  ``fgd_attn`` (gamma);
- global loss (Eq. 12, Sec. 3.2): squared difference of GCNet context blocks applied to student and
  teacher maps (one block each, both trained): ``fgd_global`` (lambda).

Every term is summed over positions and channels and divided by the batch size, then summed over levels;
the detector adds them to its own loss (Sec. 3.3, overall loss).
Where detkd departs from the authors' code, the choice is written in ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.config import ConfigError
from detkd.distill.adapters import used_levels
from detkd.distill.base import Distiller, opt
from detkd.taps import Taps

# The authors' configs per detector family; every value can be overridden by an option.
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "retinanet": {"temp": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lam": 5e-6},
    "faster_rcnn": {"temp": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5, "lam": 5e-7},
    "fcos": {"temp": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lam": 8e-6},
}


@dataclass
class FGDOptions:
    """Options of ``fgd``. ``None`` means the default of the student's detector family (FAMILY_DEFAULTS)."""

    temp: float | None = opt(None, gt=0)  # attention temperature T
    alpha: float | None = opt(None, ge=0)  # foreground feature loss weight
    beta: float | None = opt(None, ge=0)  # background feature loss weight
    gamma: float | None = opt(None, ge=0)  # attention loss weight
    lam: float | None = opt(None, ge=0)  # global (relation) loss weight, the paper's lambda
    box_scale: Literal["unpadded", "padded"] = "unpadded"  # image size that maps boxes onto the grid
    levels: list[int] = opt(factory=list, ge=0)  # pyramid indices; empty = all but Faster R-CNN 'pool'
    gc_ratio: float = opt(0.5, gt=0, le=4)  # GC block bottleneck: planes = int(channels * gc_ratio), as the
    # authors (C / 2)


# ----------------------------------------------------------------------------------------------------------
# Masks and attention (plain functions, so tests can check them cell by cell)


def foreground_mask(boxes: list[Tensor], frame_sizes: list[tuple[int, int]], height: int,
                    width: int) -> Tensor:
    """foreground part of Sec. 3.1's masks (the binary mask M times the scale mask S, before Eq. 9): per
    image, each ground-truth box sets its cells to 1 / (its cell rows * its cell columns).

    A box (x1, y1, x2, y2) in an image frame of size ``frame_sizes[i] = (img_h, img_w)`` is mapped to the
    ``height x width`` grid as x * width / img_w, y * height / img_h; rows floor(y1')..ceil(y2') and columns
    floor(x1')..ceil(x2') are covered, end index INCLUSIVE (the authors' rule). The area counts that whole
    index range, also where it passes the last row / column (a box touching the border); only cells inside
    the grid are set. Where boxes overlap the larger value wins. Returns (N, height, width) float32.
    """
    masks = torch.zeros((len(boxes), height, width), dtype=torch.float32,
                        device=boxes[0].device if boxes else None)
    rows = torch.arange(height, device=masks.device)
    cols = torch.arange(width, device=masks.device)
    for i, (b, (img_h, img_w)) in enumerate(zip(boxes, frame_sizes)):
        if b.numel() == 0:
            continue
        b = b.to(torch.float32)
        x1 = torch.floor(b[:, 0] / img_w * width)
        x2 = torch.ceil(b[:, 2] / img_w * width)
        y1 = torch.floor(b[:, 1] / img_h * height)
        y2 = torch.ceil(b[:, 3] / img_h * height)
        value = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1))  # (M,)
        in_rows = (rows[None, :] >= y1[:, None]) & (rows[None, :] <= y2[:, None])  # (M, H)
        in_cols = (cols[None, :] >= x1[:, None]) & (cols[None, :] <= x2[:, None])  # (M, W)
        inside = in_rows[:, :, None] & in_cols[:, None, :]  # (M, H, W)
        masks[i] = torch.where(inside, value[:, None, None], torch.zeros_like(value)[:, None, None]).amax(0)
    return masks


def background_mask(fg: Tensor) -> Tensor:
    """background part of Sec. 3.1's scale mask ((1 - M) / N_bg, before Eq. 9): cells outside every box
    (fg == 0) set to 1, normalised to sum 1 per image (all-foreground images stay all zero)."""
    bg = (fg == 0).to(fg.dtype)
    total = bg.flatten(1).sum(1).clamp(min=1.0)
    return bg / total[:, None, None]


def attention(feature: Tensor, temp: float) -> tuple[Tensor, Tensor]:
    """Sec. 3.1's attention masks (before Eq. 9): spatial attention H*W*softmax_hw(mean_c|F| / T) (N, H, W)
    and channel attention C*softmax_c(mean_hw|F| / T) (N, C)."""
    n, c, h, w = feature.shape
    value = feature.abs()
    spatial = h * w * F.softmax(value.mean(1).reshape(n, h * w) / temp, dim=1)
    channel = c * F.softmax(value.mean((2, 3)) / temp, dim=1)
    return spatial.reshape(n, h, w), channel


class GlobalContextBlock(nn.Module):
    """GCNet context block as FGD uses it in Eq. 12 (Sec. 3.2): F + W2 ReLU(LN(W1 ctx)),
    ctx = sum_j softmax_j(Wk F_j) F_j.

    The context conv Wk is Kaiming-initialised (fan_in) and the last conv W2 is zero-initialised, so a
    fresh block is the identity.
    """

    def __init__(self, channels: int, ratio: float = 0.5):
        super().__init__()
        planes = max(1, int(channels * ratio))
        self.context = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, planes, kernel_size=1),
            nn.LayerNorm([planes, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.context.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weights = F.softmax(self.context(x).reshape(n, 1, h * w), dim=2)  # (N, 1, HW)
        ctx = torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2)).reshape(n, c, 1, 1)
        return x + self.transform(ctx)


class FGDLevel(nn.Module):
    """The trained parts of one pyramid level: student align conv and the two GC blocks."""

    def __init__(self, student_channels: int, teacher_channels: int, gc_ratio: float):
        super().__init__()
        if student_channels != teacher_channels:
            self.align: nn.Module = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        else:
            self.align = nn.Identity()
        self.gc_student = GlobalContextBlock(teacher_channels, gc_ratio)
        self.gc_teacher = GlobalContextBlock(teacher_channels, gc_ratio)


def fgd_level_losses(s: Tensor, t: Tensor, fg: Tensor, bg: Tensor, temp: float, gc_student: nn.Module,
                     gc_teacher: nn.Module) -> dict[str, Tensor]:
    """Unweighted FGD terms of one level: ``fg`` and ``bg`` the two halves of Eq. 9, ``attn`` Eq. 10, ``global``
    Eq. 12. Aligned student ``s`` and teacher ``t`` (N, C, H, W), masks (N, H, W). Each term is a sum over
    the map divided by the batch size N."""
    n = s.shape[0]
    spatial_t, channel_t = attention(t, temp)
    spatial_s, channel_s = attention(s, temp)
    # Eq. 9 weighs (s - t)^2 by the teacher's attentions A^S_hw A^C_c and a mask M_hw; summing over the
    # channels first (A^C as a batched product) leaves one (N, H, W) map for both masks, instead of four
    # (N, C, H, W) products: the same sum, half the passes over a P2-sized map
    per_cell = torch.einsum("nchw,nc->nhw", (s - t) ** 2, channel_t) * spatial_t
    fg_loss = (per_cell * fg).sum() / n
    bg_loss = (per_cell * bg).sum() / n
    attn_loss = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n
    global_loss = ((gc_student(s) - gc_teacher(t)) ** 2).sum() / n
    return {"fg": fg_loss, "bg": bg_loss, "attn": attn_loss, "global": global_loss}


# ----------------------------------------------------------------------------------------------------------
# Distiller


class FGD(Distiller):
    """Focal and Global Distillation on the FPN outputs (all levels; Faster R-CNN: P2-P5, not 'pool'): Eq. 9,
    10 and 12 of the paper, weighted by alpha / beta, gamma and lambda (module docstring)."""

    name = "fgd"

    Options = FGDOptions

    def __init__(self, opts: FGDOptions, teacher_channels: list[int], student_channels: list[int], arch: str):
        super().__init__(opts, teacher_channels, student_channels, arch)
        if arch not in FAMILY_DEFAULTS:
            raise ConfigError(f"fgd: unsupported arch {arch!r} (supported: {', '.join(FAMILY_DEFAULTS)})")
        if len(teacher_channels) != len(student_channels):
            raise ConfigError(f"fgd: teacher has {len(teacher_channels)} pyramid levels, student "
                             f"{len(student_channels)}: the pyramids must match level by level")
        defaults = FAMILY_DEFAULTS[arch]
        self.temp = opts.temp if opts.temp is not None else defaults["temp"]
        self.alpha = opts.alpha if opts.alpha is not None else defaults["alpha"]
        self.beta = opts.beta if opts.beta is not None else defaults["beta"]
        self.gamma = opts.gamma if opts.gamma is not None else defaults["gamma"]
        self.lam = opts.lam if opts.lam is not None else defaults["lam"]
        # Faster R-CNN: the levels before the max-pooled 'pool' (the authors distil the FPN output convs P2-P5)
        self.levels = used_levels(opts.levels, len(student_channels), arch, "fgd.options.levels")
        self.level_modules = nn.ModuleList(
            FGDLevel(student_channels[i], teacher_channels[i], opts.gc_ratio) for i in self.levels
        )

    def _check(self, teacher: Taps, student: Taps) -> None:
        if len(teacher.features) != len(student.features):
            raise ValueError(f"fgd: teacher has {len(teacher.features)} feature levels, student "
                             f"{len(student.features)}")
        for i in self.levels:
            if i >= len(student.features):
                raise ValueError(f"fgd: level {i} requested, the student has {len(student.features)} levels")
            if self.arch == "faster_rcnn" and not self.opts.levels and student.level_names[i] == "pool":
                raise ValueError(f"fgd: the distiller was built for the levels before 'pool', but level {i} "
                                 "is 'pool': the channel lists given at construction must include 'pool'")
            if teacher.features[i].shape[-2:] != student.features[i].shape[-2:]:
                raise ValueError(f"fgd: level {student.level_names[i]}: teacher map "
                                 f"{tuple(teacher.features[i].shape)} and student map "
                                 f"{tuple(student.features[i].shape)} differ in size")

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Weighted terms summed over levels: fgd_fg, fgd_bg, fgd_attn, fgd_global.

        ``targets`` are the transformed targets (the frame of both Taps); only their "boxes" are used.
        """
        self._check(teacher, student)
        if self.opts.box_scale == "padded":
            frames = [tuple(student.batch_shape)] * len(targets)
        else:
            frames = [tuple(s) for s in student.image_sizes]
        boxes = [t["boxes"] for t in targets]
        totals = {"fg": 0.0, "bg": 0.0, "attn": 0.0, "global": 0.0}
        for level, mod in zip(self.levels, self.level_modules):
            s = mod.align(student.features[level]).float()
            t = teacher.features[level].detach().float()
            h, w = s.shape[-2:]
            fg = foreground_mask(boxes, frames, h, w).to(s.device)
            bg = background_mask(fg)
            terms = fgd_level_losses(s, t, fg, bg, self.temp, mod.gc_student, mod.gc_teacher)
            for k in totals:
                totals[k] = totals[k] + terms[k]
        return {
            "fgd_fg": self.alpha * totals["fg"],
            "fgd_bg": self.beta * totals["bg"],
            "fgd_attn": self.gamma * totals["attn"],
            "fgd_global": self.lam * totals["global"],
        }
