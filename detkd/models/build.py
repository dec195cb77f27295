"""Build a plain torchvision detector from a :class:`~detkd.config.ModelConfig`.

The result is an unmodified torchvision ``FasterRCNN``, ``RetinaNet`` or ``FCOS``: the same modules and
state-dict keys as torchvision's own ``*_resnet50_fpn`` builders, with the backbone, FPN width, anchors
and sampler settings taken from the config. Every head has ``num_classes + 1`` outputs (index 0 is
background, as in torchvision's COCO models).

Pyramids are the same for every backbone of one family, so any teacher / student pair of a family has
the same levels:

- Faster R-CNN: P2-P5 from the backbone's stride 4, 8, 16, 32 stages plus a max-pooled P6 (``"pool"``);
  level names ``"0" "1" "2" "3" "pool"``.
- RetinaNet, FCOS: P3-P5 from the stride 8, 16, 32 stages plus P6, P7 computed from P5
  (``LastLevelP6P7(C, C)``, torchvision's ``retinanet_resnet50_fpn`` and ``fcos_resnet50_fpn`` layout);
  level names ``"0" "1" "2" "p6" "p7"``.
"""

from __future__ import annotations

from functools import partial

import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detkd.config import ConfigError, ModelConfig
from detkd.models.weights import load_backbone_weights, load_detector_weights

# torchvision's ImageNet normalisation, used by every detector built here (so teacher and student of a
# run always normalise alike; see check_transforms for models built elsewhere)
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]

NUM_LEVELS = 5
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


# ----------------------------------------------------------------------------------------------------------
# Backbones


def _norm_layer(cfg: ModelConfig, eps: float) -> type[nn.Module] | partial:
    if cfg.norm == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=eps)
    return partial(nn.BatchNorm2d, eps=eps)


def _resnet_fpn(cfg: ModelConfig, two_stage: bool) -> BackboneWithFPN:
    """ResNet + FPN, like torchvision's ``_resnet_fpn_extractor`` but with ``cfg.fpn_channels`` wide FPN
    (torchvision's helper fixes the width at 256)."""
    trunk = torchvision.models.get_model(cfg.backbone, weights=None, norm_layer=_norm_layer(cfg, 1e-5))
    if cfg.weights == "none" and cfg.backbone_weights != "none":
        load_backbone_weights(trunk, cfg.backbone_weights, cfg.backbone)

    # freeze all but the top ``trainable_layers`` stages (same rule as torchvision)
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_layers]
    if cfg.trainable_layers == 5:
        train.append("bn1")
    for name, p in trunk.named_parameters():
        if not any(name.startswith(t) for t in train):
            p.requires_grad_(False)

    returned = [1, 2, 3, 4] if two_stage else [2, 3, 4]
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned)}
    c2 = trunk.inplanes // 8  # channels of layer1's output (64 for basic blocks, 256 for bottlenecks)
    in_channels = [c2 * 2 ** (k - 1) for k in returned]
    extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels)
    return BackboneWithFPN(trunk, return_layers, in_channels, cfg.fpn_channels, extra_blocks=extra)


def _mobilenet_fpn(cfg: ModelConfig, two_stage: bool) -> BackboneWithFPN:
    """MobileNetV3-Large + FPN, following torchvision's ``_mobilenet_extractor`` (stages are the blocks
    that reduce resolution) but returning the stride 4/8/16/32 stages, so the pyramid has the same
    levels as a ResNet one, and with a ``cfg.fpn_channels`` wide FPN."""
    trunk = torchvision.models.get_model(cfg.backbone, weights=None, norm_layer=_norm_layer(cfg, 1e-3))
    if cfg.weights == "none" and cfg.backbone_weights != "none":
        load_backbone_weights(trunk, cfg.backbone_weights, cfg.backbone)
    features = trunk.features

    # stage i has stride 2, 4, 8, 16, 32, 32 (the last is the final 1x1 conv, 960 channels)
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    # trainable_layers counts stages from the top like for a ResNet (1 = the stride 32 stage, 5 = all);
    # torchvision's mobilenet count has one more stage (the final conv on its own)
    t = cfg.trainable_layers + 1 if cfg.trainable_layers > 0 else 0
    freeze_before = len(features) if t == 0 else stages[len(stages) - t]
    for block in features[:freeze_before]:
        for p in block.parameters():
            p.requires_grad_(False)

    returned = [1, 2, 3, 5] if two_stage else [2, 3, 5]
    return_layers = {str(stages[k]): str(i) for i, k in enumerate(returned)}
    in_channels = [features[stages[k]].out_channels for k in returned]
    extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels)
    return BackboneWithFPN(features, return_layers, in_channels, cfg.fpn_channels, extra_blocks=extra)


# ----------------------------------------------------------------------------------------------------------
# Detectors


def _anchor_sizes(cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per level. ``cfg.anchor_sizes`` gives one base size per level; RetinaNet expands each
    to 3 scales per octave (x, x 2^(1/3), x 2^(2/3)) as torchvision does for its default 32..512."""
    if cfg.anchor_sizes:
        if len(cfg.anchor_sizes) != NUM_LEVELS or min(cfg.anchor_sizes) <= 0:
            raise ConfigError(
                f"model.anchor_sizes: expected {NUM_LEVELS} positive sizes (one per pyramid level), "
                f"got {cfg.anchor_sizes}"
            )
        base = list(cfg.anchor_sizes)
    elif cfg.arch == "fcos":
        base = [8, 16, 32, 64, 128]
    else:
        base = [32, 64, 128, 256, 512]
    if cfg.arch == "retinanet":
        return tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in base)
    return tuple((x,) for x in base)


def _check(cfg: ModelConfig) -> None:
    if cfg.arch not in ("faster_rcnn", "retinanet", "fcos"):
        raise ConfigError(f"model.arch: unknown detector {cfg.arch!r}")
    if cfg.backbone not in RESNETS and cfg.backbone != "mobilenet_v3_large":
        raise ConfigError(f"model.backbone: unknown backbone {cfg.backbone!r}")
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
    if not 0 <= cfg.trainable_layers <= 5:
        raise ConfigError(f"model.trainable_layers must be in 0..5, got {cfg.trainable_layers}")
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
    backbone weights are not loaded, the detector weights cover them).
    """
    _check(cfg)
    two_stage = cfg.arch == "faster_rcnn"
    if cfg.backbone == "mobilenet_v3_large":
        backbone = _mobilenet_fpn(cfg, two_stage)
    else:
        backbone = _resnet_fpn(cfg, two_stage)

    sizes = _anchor_sizes(cfg)
    common = dict(min_size=cfg.min_size, max_size=cfg.max_size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    num_outputs = cfg.num_classes + 1  # index 0 = background (never positive for the one-stage heads)
    if cfg.arch == "faster_rcnn":
        anchors = AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * len(sizes))
        model = FasterRCNN(
            backbone,
            num_classes=num_outputs,
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_batch_size_per_image=cfg.box_batch_size_per_image,
            box_positive_fraction=cfg.box_positive_fraction,
            box_score_thresh=cfg.score_thresh,
            box_detections_per_img=cfg.detections_per_img,
            **common,
        )
    elif cfg.arch == "retinanet":
        anchors = AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * len(sizes))
        model = RetinaNet(
            backbone,
            num_classes=num_outputs,
            anchor_generator=anchors,
            score_thresh=cfg.score_thresh,
            detections_per_img=cfg.detections_per_img,
            **common,
        )
    else:
        # FCOS predicts one box per location: a single square "anchor" per level (its size sets the
        # scale range of the level), so cfg.aspect_ratios does not apply
        anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
        model = FCOS(
            backbone,
            num_classes=num_outputs,
            anchor_generator=anchors,
            score_thresh=cfg.score_thresh,
            detections_per_img=cfg.detections_per_img,
            **common,
        )

    if cfg.weights != "none":
        load_detector_weights(model, cfg.weights, f"{cfg.arch}/{cfg.backbone}")
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
    label set. (Both are normalised with :data:`IMAGE_MEAN` / :data:`IMAGE_STD` by construction.)"""
    pairs = [
        ("num_classes", "they must share one class set"),
        ("min_size", "both must see the same resized batch"),
        ("max_size", "both must see the same resized batch"),
    ]
    for key, why in pairs:
        t, s = getattr(teacher_cfg, key), getattr(student_cfg, key)
        if t != s:
            raise ConfigError(f"distill.teacher.{key} ({t}) differs from model.{key} ({s}): {why}")
    if (teacher_cfg.arch == "faster_rcnn") != (student_cfg.arch == "faster_rcnn"):
        # features are paired level by level; a two-stage pyramid is P2-P6, a one-stage one P3-P7
        raise ConfigError(
            f"distill.teacher.arch {teacher_cfg.arch} and model.arch {student_cfg.arch} have different "
            f"pyramids (Faster R-CNN: P2-P6, RetinaNet / FCOS: P3-P7), so their features cannot be paired "
            f"level by level; pair Faster R-CNN with Faster R-CNN, or RetinaNet / FCOS with either of them"
        )


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
