"""Construction of detkd's detectors from torchvision parts, with no import of detkd.

This file is the single implementation of how a ``ModelConfig`` becomes a torchvision ``FasterRCNN``,
``RetinaNet`` or ``FCOS`` (:func:`detkd.models.build_detector` calls it and adds validation and weights).
``detkd export`` copies it verbatim next to an exported state dict as ``build_model.py``, so that an
exported student loads with torch and torchvision alone::

    from build_model import load_exported
    model = load_exported("exported/")        # model.json + student.pt in that folder

Pyramids are the same for every backbone of one family, so any teacher / student pair of a family has
the same levels:

- Faster R-CNN: P2-P5 from the backbone's stride 4, 8, 16, 32 stages plus a max-pooled P6 (``"pool"``);
  level names ``"0" "1" "2" "3" "pool"``.
- RetinaNet, FCOS: P3-P5 from the stride 8, 16, 32 stages plus P6, P7 computed from P5
  (``LastLevelP6P7(C, C)``, torchvision's ``retinanet_resnet50_fpn`` and ``fcos_resnet50_fpn`` layout);
  level names ``"0" "1" "2" "p6" "p7"``.

``model.torchvision`` instead builds one of torchvision's COCO detectors exactly as torchvision does
(:func:`build_torchvision`), whose pyramids differ: RetinaNet v2 computes P6 from C5, and the MobileNetV3
Faster R-CNNs have three levels (strides 16, 32 and a max-pooled 64). Teacher and student levels are then
paired by stride (``detkd.models.pair_levels``).
"""

from __future__ import annotations

import json
import math
import types
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, RPNHead
from torchvision.models.detection.faster_rcnn import _default_anchorgen as rpn_anchorgen
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.retinanet import _default_anchorgen as retina_anchorgen
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

# torchvision's ImageNet normalisation, used by every detector built here (so teacher and student of a
# run always normalise alike)
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]

NUM_LEVELS = 5


# ----------------------------------------------------------------------------------------------------------
# Backbones


def _norm_layer(cfg, eps: float) -> type[nn.Module] | partial:
    if cfg.norm == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=eps)
    return partial(nn.BatchNorm2d, eps=eps)


def _resnet_fpn(cfg, two_stage: bool, load_trunk=None) -> BackboneWithFPN:
    """ResNet + FPN, like torchvision's ``_resnet_fpn_extractor`` but with ``cfg.fpn_channels`` wide FPN
    (torchvision's helper fixes the width at 256)."""
    trunk = torchvision.models.get_model(cfg.backbone, weights=None, norm_layer=_norm_layer(cfg, 1e-5))
    if load_trunk is not None:
        load_trunk(trunk)

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


def _mobilenet_fpn(cfg, two_stage: bool, load_trunk=None) -> BackboneWithFPN:
    """MobileNetV3-Large + FPN, following torchvision's ``_mobilenet_extractor`` (stages are the blocks
    that reduce resolution) but returning the stride 4/8/16/32 stages, so the pyramid has the same
    levels as a ResNet one, and with a ``cfg.fpn_channels`` wide FPN."""
    trunk = torchvision.models.get_model(cfg.backbone, weights=None, norm_layer=_norm_layer(cfg, 1e-3))
    if load_trunk is not None:
        load_trunk(trunk)
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


def _anchor_sizes(cfg) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per level. ``cfg.anchor_sizes`` gives one base size per level; RetinaNet expands each
    to 3 scales per octave (x, x 2^(1/3), x 2^(2/3)) as torchvision does for its default 32..512."""
    if cfg.anchor_sizes:
        if len(cfg.anchor_sizes) != NUM_LEVELS or min(cfg.anchor_sizes) <= 0:
            raise ValueError(
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


# ----------------------------------------------------------------------------------------------------------
# torchvision's own COCO detectors (``model.torchvision``)


def _faster_rcnn_kwargs(cfg) -> dict:
    return dict(
        min_size=cfg.min_size, max_size=cfg.max_size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test, rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image, box_positive_fraction=cfg.box_positive_fraction,
        box_score_thresh=cfg.score_thresh, box_detections_per_img=cfg.detections_per_img,
    )


def _one_stage_kwargs(cfg) -> dict:
    return dict(min_size=cfg.min_size, max_size=cfg.max_size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
                score_thresh=cfg.score_thresh, detections_per_img=cfg.detections_per_img)


def build_torchvision(cfg, load_trunk=None) -> nn.Module:
    """``cfg.torchvision`` built as torchvision's builder of that name builds it (same modules, state-dict
    keys and shapes, anchors, heads and post-processing), with ``num_classes + 1`` outputs, the sizes,
    sampler and score settings of ``cfg``, and ``cfg.trainable_layers`` / ``cfg.norm`` for the trunk.

    Differences from calling the builder: the trunk's norm is ``cfg.norm`` (torchvision picks frozen BN when
    it loads weights itself, plain BN otherwise: ``norm: bn`` gives its weights=None model exactly), and
    ``trainable_layers`` counts MobileNetV3 stages like ResNet ones (as for detkd's own MobileNet).
    """
    name = cfg.torchvision
    norm = FrozenBatchNorm2d if cfg.norm == "frozen_bn" else nn.BatchNorm2d  # torchvision's eps (1e-5) for both
    num_outputs = cfg.num_classes + 1
    if name.startswith("fasterrcnn_mobilenet_v3_large"):
        trunk = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm)
        if load_trunk is not None:
            load_trunk(trunk)
        trainable = cfg.trainable_layers + 1 if cfg.trainable_layers > 0 else 0  # + the final 1x1 conv stage
        backbone = _mobilenet_extractor(trunk, True, trainable)
        # 5 sizes on each of the 3 levels (15 anchors per location): torchvision's layout for this model
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
        # rpn_score_thresh: the builder's default for both MobileNet models
        return FasterRCNN(backbone, num_outputs, rpn_anchor_generator=anchors, rpn_score_thresh=0.05,
                          **_faster_rcnn_kwargs(cfg))

    trunk = torchvision.models.resnet50(weights=None, norm_layer=norm)
    if load_trunk is not None:
        load_trunk(trunk)
    t = cfg.trainable_layers
    if name == "fasterrcnn_resnet50_fpn":
        return FasterRCNN(_resnet_fpn_extractor(trunk, t), num_outputs, **_faster_rcnn_kwargs(cfg))
    if name == "fasterrcnn_resnet50_fpn_v2":
        # v2 (Li et al., "Benchmarking detection transfer learning with vision transformers"): BN in the FPN,
        # a two-conv RPN head and a 4-conv + 1-fc box head with BN
        backbone = _resnet_fpn_extractor(trunk, t, norm_layer=nn.BatchNorm2d)
        anchors = rpn_anchorgen()
        rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
        box_head = FastRCNNConvFCHead((backbone.out_channels, 7, 7), [256, 256, 256, 256], [1024],
                                      norm_layer=nn.BatchNorm2d)
        return FasterRCNN(backbone, num_outputs, rpn_anchor_generator=anchors, rpn_head=rpn_head,
                          box_head=box_head, **_faster_rcnn_kwargs(cfg))
    if name == "retinanet_resnet50_fpn":
        backbone = _resnet_fpn_extractor(trunk, t, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        return RetinaNet(backbone, num_outputs, **_one_stage_kwargs(cfg))
    if name == "retinanet_resnet50_fpn_v2":
        # v2: P6 from C5 (2048 channels), GroupNorm in the head, GIoU box loss
        backbone = _resnet_fpn_extractor(trunk, t, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(2048, 256))
        anchors = retina_anchorgen()
        head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_outputs,
                             norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = "giou"
        return RetinaNet(backbone, num_outputs, anchor_generator=anchors, head=head, **_one_stage_kwargs(cfg))
    if name == "fcos_resnet50_fpn":
        backbone = _resnet_fpn_extractor(trunk, t, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        return FCOS(backbone, num_outputs, **_one_stage_kwargs(cfg))
    raise ValueError(f"model.torchvision: unknown torchvision detector {name!r}")


# ----------------------------------------------------------------------------------------------------------
# detkd's own layouts


def build(cfg, load_trunk=None) -> nn.Module:
    """The torchvision detector described by ``cfg`` (any object with detkd's ``ModelConfig`` fields: the
    dataclass itself, or ``types.SimpleNamespace(**json.load(open("model.json")))``), randomly initialised,
    frozen stages set. ``load_trunk(trunk)`` may load backbone weights into the bare classification trunk.
    ``cfg.torchvision`` set: torchvision's own model of that name (:func:`build_torchvision`).
    """
    if getattr(cfg, "torchvision", ""):
        return build_torchvision(cfg, load_trunk)
    two_stage = cfg.arch == "faster_rcnn"
    if cfg.backbone == "mobilenet_v3_large":
        backbone = _mobilenet_fpn(cfg, two_stage, load_trunk)
    else:
        backbone = _resnet_fpn(cfg, two_stage, load_trunk)

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
        head = None
        if getattr(cfg, "head_norm", "none") == "gn":
            # GroupNorm in the head (torchvision's retinanet v2 head) is what lets RetinaNet train from
            # scratch at a pace close to FCOS; the group count must divide the FPN width
            groups = math.gcd(32, cfg.fpn_channels)
            head = RetinaNetHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0], num_outputs,
                                 norm_layer=partial(nn.GroupNorm, groups))
        model = RetinaNet(
            backbone,
            num_classes=num_outputs,
            anchor_generator=anchors,
            head=head,
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
    return model




def load_exported(folder: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild an exported detector from ``folder/model.json`` and load ``folder/student.pt`` (eval mode)."""
    folder = Path(folder)
    spec = json.loads((folder / "model.json").read_text())
    model = build(types.SimpleNamespace(**spec["model"]))
    state = torch.load(folder / "student.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
