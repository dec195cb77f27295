"""Build a plain torchvision detector from a :class:`~detkd.config.ModelConfig`.

The result is an unmodified torchvision ``FasterRCNN``, ``RetinaNet`` or ``FCOS``: the same modules and
state-dict keys as torchvision's own ``*_resnet50_fpn`` builders, with the backbone, FPN width, anchors
and sampler settings taken from the config. Every head has ``num_classes + 1`` outputs (index 0 is
background, as in torchvision's COCO models). The construction and the pyramid layout are in
:mod:`detkd.models.torchvision_build`; this module validates the config, loads weights and describes
pyramids for the distillers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detkd.config import ConfigError, ModelConfig, check_model_values
from detkd.models.torchvision_build import IMAGE_MEAN, IMAGE_STD, NUM_LEVELS, build
from detkd.models.weights import load_backbone_weights, load_detector_weights
from detkd.runtime.console import info

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "MIN_PAIRED_LEVELS", "build_detector", "check_pair", "check_transforms",
           "describe_levels", "detector_arch", "feature_channels", "pair_levels", "paired_channels", "pyramid_levels",
           "pyramid_strides"]

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def detector_arch(model: nn.Module) -> str:
    """``"faster_rcnn"``, ``"retinanet"`` or ``"fcos"`` for a torchvision detector."""
    if isinstance(model, FasterRCNN):
        return "faster_rcnn"
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    raise TypeError(f"not a torchvision FasterRCNN / RetinaNet / FCOS: {type(model).__name__}")


def _check(cfg: ModelConfig) -> None:
    check_model_values(cfg)
    if cfg.torchvision:
        if cfg.anchor_sizes:
            raise ConfigError(f"model.anchor_sizes: {cfg.anchor_sizes} cannot apply to model.torchvision "
                              f"{cfg.torchvision!r}, whose anchors are torchvision's (leave anchor_sizes empty)")
        return
    if cfg.anchor_sizes and (len(cfg.anchor_sizes) != NUM_LEVELS or min(cfg.anchor_sizes) <= 0):
        raise ConfigError(
            f"model.anchor_sizes: expected {NUM_LEVELS} positive sizes (one per pyramid level), "
            f"got {cfg.anchor_sizes}"
        )
    if cfg.arch not in ("faster_rcnn", "retinanet", "fcos"):
        raise ConfigError(f"model.arch: unknown detector {cfg.arch!r}")
    if cfg.backbone not in RESNETS and cfg.backbone != "mobilenet_v3_large":
        raise ConfigError(f"model.backbone: unknown backbone {cfg.backbone!r}")
    if not cfg.aspect_ratios or min(cfg.aspect_ratios) <= 0:
        raise ConfigError(f"model.aspect_ratios: expected positive ratios, got {cfg.aspect_ratios}")
    if cfg.arch == "fcos" and cfg.fpn_channels % 32 != 0:
        raise ConfigError(
            f"model.fpn_channels: FCOS's head uses GroupNorm with 32 groups, so the width must be a "
            f"multiple of 32, got {cfg.fpn_channels}"
        )


def build_detector(cfg: ModelConfig) -> nn.Module:
    """A torchvision detector as described by ``cfg`` (weights loaded, frozen stages set), in train mode.

    ``cfg.backbone_weights`` initialises the backbone trunk; ``cfg.weights`` the whole detector (then the
    backbone weights are not loaded, the detector weights cover them). The construction itself lives in
    :mod:`detkd.models.torchvision_build`, which exports ship as a standalone file.
    """
    _check(cfg)
    load_trunk = None
    if cfg.weights == "none" and cfg.backbone_weights != "none":
        def load_trunk(trunk: nn.Module) -> None:
            load_backbone_weights(trunk, cfg.backbone_weights, cfg.backbone)

    model = build(cfg, load_trunk)
    if cfg.weights != "none":
        load_detector_weights(model, cfg.weights, cfg.torchvision or f"{cfg.arch}/{cfg.backbone}")
    return model


# ----------------------------------------------------------------------------------------------------------
# Pyramid description and pair checks


def pyramid_levels(model: nn.Module) -> list[str]:
    """FPN output names of ``model``, finest first (``["0", "1", "2", "3", "pool"]`` for Faster R-CNN)."""
    backbone = model.backbone
    names = list(backbone.body.return_layers.values())
    extra = backbone.fpn.extra_blocks
    if isinstance(extra, LastLevelMaxPool):
        names.append("pool")
    elif isinstance(extra, LastLevelP6P7):
        names.extend(["p6", "p7"])
    elif extra is not None:
        raise TypeError(f"unknown FPN extra block {type(extra).__name__}")
    return names


def feature_channels(model: nn.Module) -> list[int]:
    """Channels of each pyramid level (the FPN width, repeated per level)."""
    return [int(model.backbone.out_channels)] * len(pyramid_levels(model))


def check_pair(teacher_cfg: ModelConfig, student_cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` when a teacher and a student cannot share one transformed batch or one
    label set. (Both are normalised with :data:`IMAGE_MEAN` / :data:`IMAGE_STD` by construction.) Their
    pyramids are paired by stride once both are built (:func:`pair_levels`)."""
    pairs = [
        ("num_classes", "they must share one class set"),
        ("min_size", "both must see the same resized batch"),
        ("max_size", "both must see the same resized batch"),
    ]
    for key, why in pairs:
        t, s = getattr(teacher_cfg, key), getattr(student_cfg, key)
        if t != s:
            raise ConfigError(f"distill.teacher.{key} ({t}) differs from model.{key} ({s}): {why}")


# ----------------------------------------------------------------------------------------------------------
# Level pairing by stride

# fewer paired levels than this leave too little to distil (a Faster R-CNN distiller also drops "pool")
MIN_PAIRED_LEVELS = 2


def pyramid_strides(model: nn.Module, size: int = 256) -> list[int]:
    """Stride of each pyramid level of ``model``, finest first, measured on a forward of its backbone on a
    ``size`` x ``size`` zero image (layouts differ: ResNet FPNs start at stride 4 or 8, torchvision's
    MobileNetV3 FPN at 16). The modules' train / eval modes are restored after."""
    backbone = model.backbone
    modes = [(m, m.training) for m in backbone.modules()]
    p = next(backbone.parameters())
    backbone.eval()
    try:
        with torch.no_grad():
            feats = backbone(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    finally:
        for m, training in modes:
            m.training = training
    return [int(2 ** round(math.log2(size / max(1, f.shape[-1])))) for f in feats.values()]


def describe_levels(strides: list[int]) -> str:
    """``P2-P6 (strides 4..64)`` for a pyramid of strides 4, 8, 16, 32, 64."""
    ks = [int(round(math.log2(s))) for s in strides]
    names = f"P{ks[0]}-P{ks[-1]}" if ks == list(range(ks[0], ks[0] + len(ks))) else ",".join(f"P{k}" for k in ks)
    return f"{names} (strides {strides[0]}..{strides[-1]})" if len(ks) > 1 else f"P{ks[0]} (stride {strides[0]})"


def pair_levels(teacher_strides: list[int], student_strides: list[int],
                where: str = "distill") -> list[tuple[int, int]]:
    """(teacher index, student index) of every pyramid level whose stride both detectors have, finest
    first: the levels feature distillers compare. A level only one of them has is left out. Raises
    :class:`ConfigError` when fewer than :data:`MIN_PAIRED_LEVELS` pair."""
    index_t = {s: i for i, s in enumerate(teacher_strides)}
    pairs = [(index_t[s], j) for j, s in enumerate(student_strides) if s in index_t]
    if len(pairs) < MIN_PAIRED_LEVELS:
        common = [student_strides[j] for _, j in pairs]
        raise ConfigError(
            f"{where}: the teacher's pyramid {describe_levels(teacher_strides)} and the student's "
            f"{describe_levels(student_strides)} share {len(pairs)} stride(s) {common}; feature distillation "
            f"pairs levels of equal stride and needs at least {MIN_PAIRED_LEVELS} (pick a student whose FPN "
            f"covers the teacher's strides)"
        )
    return pairs


def paired_channels(teacher: nn.Module, student: nn.Module, where: str = "distill"
                    ) -> tuple[list[tuple[int, int]] | None, list[int], list[int]]:
    """Pair two built detectors' levels by stride (:func:`pair_levels`) and log the pairing. Returns the
    pairs (``None`` when both pyramids are the same levels, passed whole), and the teacher's and the
    student's channels of the paired levels, in pair order: what distillers are built for."""
    t_strides, s_strides = pyramid_strides(teacher), pyramid_strides(student)
    pairs = pair_levels(t_strides, s_strides, where)
    info(f"paired levels: teacher {describe_levels(t_strides)} with student {describe_levels(s_strides)}: "
         f"strides {','.join(str(s_strides[j]) for _, j in pairs)}")
    t_ch = [feature_channels(teacher)[i] for i, _ in pairs]
    s_ch = [feature_channels(student)[j] for _, j in pairs]
    whole = len(t_strides) == len(s_strides) and pairs == [(i, i) for i in range(len(s_strides))]
    return (None if whole else pairs), t_ch, s_ch


def check_transforms(teacher: nn.Module, student: nn.Module) -> None:
    """Raise :class:`ConfigError` when two built detectors would transform a batch differently
    (normalisation, resize policy, padding): the engine runs the student's transform for both."""
    t, s = teacher.transform, student.transform
    for key in ("image_mean", "image_std", "min_size", "max_size", "size_divisible", "fixed_size"):
        a, b = getattr(t, key), getattr(s, key)
        a = list(a) if isinstance(a, (list, tuple)) else a  # min_size is a tuple, mean / std lists
        b = list(b) if isinstance(b, (list, tuple)) else b
        if a != b:
            raise ConfigError(f"teacher and student transforms differ in {key}: {a} vs {b}")
