"""Adapters of the feature distillers: per-level convolutions mapping student channels to teacher channels,
the ``auto`` kind, and the pyramid levels a feature method uses (default: all but Faster R-CNN's max-pooled
``pool`` level)."""

from __future__ import annotations

from torch import nn

from detkd.config import ConfigError
from detkd.distill.base import range_error

ADAPTER_KINDS = ("conv1x1", "conv3x3", "identity")


def build_adapters(student_channels: list[int], teacher_channels: list[int], kind: str = "conv1x1",
                   relu: bool = False, where: str = "adapter") -> nn.ModuleList:
    """One adapter per pyramid level mapping student channels to teacher channels.

    ``kind``: ``conv1x1`` / ``conv3x3`` (a convolution with PyTorch's default initialisation of its weight,
    a zero bias, and padding that keeps the map size) or ``identity`` (only when the widths agree). ``relu``
    appends a ReLU (the FGFI authors used conv3x3 + ReLU on post-ReLU VGG features; FPN outputs are signed, so
    it is off by default).
    """
    if len(student_channels) != len(teacher_channels):
        raise ConfigError(
            f"{where}: student has {len(student_channels)} pyramid levels, teacher {len(teacher_channels)}; "
            "feature distillation needs the same levels in both detectors"
        )
    if kind not in ADAPTER_KINDS:
        raise ConfigError(f"{where}: adapter {kind!r} is not one of {', '.join(ADAPTER_KINDS)}")
    adapters = []
    for level, (cs, ct) in enumerate(zip(student_channels, teacher_channels)):
        if kind == "identity":
            if cs != ct:
                raise ConfigError(
                    f"{where}: adapter 'identity' needs equal widths, level {level} has student {cs} and "
                    f"teacher {ct} channels (use conv1x1 or conv3x3)"
                )
            layers: list[nn.Module] = [nn.Identity()]
        else:
            k = 1 if kind == "conv1x1" else 3
            conv = nn.Conv2d(cs, ct, kernel_size=k, padding=k // 2)
            nn.init.zeros_(conv.bias)
            layers = [conv]
        if relu:
            layers.append(nn.ReLU())
        adapters.append(nn.Sequential(*layers))
    return nn.ModuleList(adapters)


def resolve_adapter(kind: str, student_channels: list[int], teacher_channels: list[int]) -> str:
    """``auto`` -> ``identity`` when every level has the same width in both detectors, else ``conv1x1``
    (the PKD / CWD / MGD authors align only when the widths differ); other kinds are returned as given."""
    if kind != "auto":
        return kind
    return "identity" if list(student_channels) == list(teacher_channels) else "conv1x1"


def level_adapters(levels: list[int], kind: str, teacher_channels: list[int], student_channels: list[int],
                   arch: str, method: str) -> tuple[list[int], nn.ModuleList]:
    """The levels a feature method uses (:func:`used_levels`) and one adapter per used level
    (:func:`resolve_adapter` + :func:`build_adapters`); errors name ``{method}.options.levels`` / ``.adapter``."""
    used = used_levels(levels, len(student_channels), arch, f"{method}.options.levels")
    sc = [student_channels[i] for i in used]
    tc = [teacher_channels[i] for i in used]
    return used, build_adapters(sc, tc, resolve_adapter(kind, sc, tc), where=f"{method}.options.adapter")


def used_levels(levels: list[int], num_levels: int, arch: str, where: str) -> list[int]:
    """The pyramid indices a feature distiller uses: ``levels`` when given (distinct, in range), else every
    level except Faster R-CNN's last one: torchvision's ``pool`` is P5 max-pooled for the RPN, with no conv
    of its own, and the authors of FGD, PKD, CWD and MGD distil the four FPN output convs P2-P5."""
    if levels:
        if any(not 0 <= i < num_levels for i in levels) or len(set(levels)) != len(levels):
            raise range_error(where, f"distinct indices in [0, {num_levels - 1}]", list(levels))
        return list(levels)
    if arch == "faster_rcnn" and num_levels > 1:
        return list(range(num_levels - 1))
    return list(range(num_levels))
