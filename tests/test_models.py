"""detkd.models: torchvision detectors from a ModelConfig, weights, pair checks."""

from __future__ import annotations

import math
import os
import time
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.ops import FrozenBatchNorm2d

from detkd.config import ConfigError, ModelConfig
from detkd.models import (
    build_detector,
    check_pair,
    check_transforms,
    feature_channels,
    pyramid_levels,
)
from detkd.models.weights import CLASS_LAYERS, load_checked

# one intra-op thread: on a small shared CPU, two OpenMP threads make these tiny models ~10x slower
torch.set_num_threads(1)

ARCHS = ["faster_rcnn", "retinanet", "fcos"]


def tiny(arch: str = "faster_rcnn", **kw) -> ModelConfig:
    base = dict(
        arch=arch, backbone="resnet18", num_classes=3, fpn_channels=32, min_size=64, max_size=96,
        box_batch_size_per_image=64, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
    )
    base.update(kw)
    return ModelConfig(**base)


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 64, 96, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 34.0], [50.0, 10.0, 90.0, 60.0]]),
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects
    ]
    return images, targets


# ----------------------------------------------------------------------------------------------------------
# Construction


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "mobilenet_v3_large"])
@pytest.mark.parametrize("arch", ARCHS)
def test_builds_each_family_and_backbone(arch, backbone):
    model = build_detector(tiny(arch, backbone=backbone, fpn_channels=64))
    assert isinstance(model, {"faster_rcnn": FasterRCNN, "retinanet": RetinaNet, "fcos": FCOS}[arch])
    two_stage = arch == "faster_rcnn"
    levels = ["0", "1", "2", "3", "pool"] if two_stage else ["0", "1", "2", "p6", "p7"]
    assert pyramid_levels(model) == levels
    assert feature_channels(model) == [64] * 5
    # num_classes + 1 outputs everywhere (label 0 = background)
    if two_stage:
        assert model.roi_heads.box_predictor.cls_score.out_features == 4
        assert model.roi_heads.box_predictor.bbox_pred.out_features == 16
    else:
        assert model.head.classification_head.num_classes == 4
    # the pyramid has the same strides whatever the backbone
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, 64, 64))
    sides = [f.shape[-1] for f in feats.values()]
    assert sides == ([16, 8, 4, 2, 1] if two_stage else [8, 4, 2, 1, 1])


def test_other_resnets_construct():
    for name, c5 in [("resnet34", 512), ("resnet101", 2048)]:
        model = build_detector(tiny("retinanet", backbone=name))
        assert model.backbone.fpn.inner_blocks[-1][0].in_channels == c5


def test_default_anchors_follow_torchvision():
    fr = build_detector(tiny("faster_rcnn"))
    assert fr.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert fr.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    rn = build_detector(tiny("retinanet"))
    assert rn.anchor_generator.sizes[0] == (32, 40, 50)  # 3 scales per octave: 32 * 2^(0, 1/3, 2/3)
    assert rn.anchor_generator.sizes[-1] == (512, 645, 812)
    fc = build_detector(tiny("fcos"))
    assert fc.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert fc.anchor_generator.num_anchors_per_location() == [1] * 5
    custom = build_detector(tiny("faster_rcnn", anchor_sizes=[16, 32, 64, 128, 256], aspect_ratios=[1.0]))
    assert custom.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert custom.rpn.anchor_generator.num_anchors_per_location() == [1] * 5


def test_settings_reach_the_torchvision_modules():
    cfg = tiny("faster_rcnn", rpn_batch_size_per_image=128, box_positive_fraction=0.5, score_thresh=0.3,
               detections_per_img=7)
    m = build_detector(cfg)
    assert m.rpn.fg_bg_sampler.batch_size_per_image == 128
    assert m.rpn._pre_nms_top_n == {"training": 200, "testing": 200}
    assert m.rpn._post_nms_top_n == {"training": 100, "testing": 100}
    assert m.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert m.roi_heads.fg_bg_sampler.positive_fraction == 0.5
    assert m.roi_heads.score_thresh == 0.3 and m.roi_heads.detections_per_img == 7
    assert m.transform.min_size == (64,) and m.transform.max_size == 96
    r = build_detector(tiny("retinanet", score_thresh=0.2, detections_per_img=9))
    assert r.score_thresh == 0.2 and r.detections_per_img == 9


def test_transform_resize_is_identity_for_presized_images():
    model = build_detector(tiny("retinanet"))
    images, targets = batch()
    image_list, out = model.transform(images, targets)
    assert image_list.image_sizes == [(64, 96), (64, 96)]
    assert torch.equal(out[0]["boxes"], targets[0]["boxes"])


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="model.anchor_sizes"):
        build_detector(tiny("retinanet", anchor_sizes=[32, 64, 128]))
    with pytest.raises(ConfigError, match="model.fpn_channels"):
        build_detector(tiny("fcos", fpn_channels=48))
    with pytest.raises(ConfigError, match="model.aspect_ratios"):
        build_detector(tiny("faster_rcnn", aspect_ratios=[]))


# ----------------------------------------------------------------------------------------------------------
# Training step


@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_step_including_an_empty_image(arch):
    torch.manual_seed(0)
    # norm bn: BatchNorm in training mode; frozen early stages keep the backward cheap
    model = build_detector(tiny(arch, norm="bn", trainable_layers=2))
    model.train()
    images, targets = batch()
    expected = {
        "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
        "retinanet": {"classification", "bbox_regression"},
        "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    }[arch]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = model.backbone.fpn.layer_blocks[0][0].weight.detach().clone()

    losses = model(images, targets)
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    assert not torch.equal(before, model.backbone.fpn.layer_blocks[0][0].weight)

    # a batch without any object: finite losses, no NaN
    opt.zero_grad()
    losses = model(images, [targets[1], targets[1]])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------------------
# Frozen stages and normalisation


def test_frozen_stages_resnet():
    model = build_detector(tiny("faster_rcnn", trainable_layers=2))
    body = model.backbone.body
    for name in ("conv1", "layer1", "layer2"):
        assert all(not p.requires_grad for p in getattr(body, name).parameters()), name
    for name in ("layer3", "layer4"):
        assert all(p.requires_grad for p in getattr(body, name).parameters()), name
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert all(p.requires_grad for p in model.roi_heads.parameters())

    frozen = build_detector(tiny("faster_rcnn", trainable_layers=0))
    assert all(not p.requires_grad for p in frozen.backbone.body.parameters())
    full = build_detector(tiny("faster_rcnn", trainable_layers=5, norm="bn"))
    assert all(p.requires_grad for p in full.backbone.body.parameters())


def test_frozen_stages_mobilenet_count_like_resnet():
    # trainable_layers=1: only the stride-32 stage (blocks 13..16) trains, like ResNet's layer4
    model = build_detector(tiny("retinanet", backbone="mobilenet_v3_large", trainable_layers=1))
    body = model.backbone.body
    trainable = sorted({int(n.split(".")[0]) for n, p in body.named_parameters() if p.requires_grad})
    assert trainable == [13, 14, 15, 16]
    model5 = build_detector(tiny("retinanet", backbone="mobilenet_v3_large", trainable_layers=5, norm="bn"))
    assert all(p.requires_grad for p in model5.backbone.body.parameters())


def test_norm_choice():
    frozen = build_detector(tiny("retinanet", norm="frozen_bn"))
    mods = list(frozen.backbone.body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in mods)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in mods)
    bn = build_detector(tiny("retinanet", norm="bn"))
    mods = list(bn.backbone.body.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in mods)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in mods)
    mb = build_detector(tiny("fcos", backbone="mobilenet_v3_large", norm="frozen_bn"))
    fbn = [m for m in mb.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert fbn and all(m.eps == 1e-3 for m in fbn)  # MobileNetV3's own eps


# ----------------------------------------------------------------------------------------------------------
# Weights


def test_local_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    src = build_detector(tiny("faster_rcnn"))
    plain = tmp_path / "plain.pth"
    torch.save(src.state_dict(), plain)
    wrapped = tmp_path / "detkd.pt"  # a detkd checkpoint, saved from a DDP-wrapped model
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        torch.manual_seed(2)
        dst = build_detector(tiny("faster_rcnn", weights=str(path)))
        for k, v in src.state_dict().items():
            assert torch.equal(v, dst.state_dict()[k]), k


def test_mismatched_checkpoint_names_file_keys_and_shapes(tmp_path):
    path = tmp_path / "three_classes.pth"
    torch.save(build_detector(tiny("faster_rcnn", num_classes=3)).state_dict(), path)
    with pytest.raises(RuntimeError) as e:
        build_detector(tiny("faster_rcnn", num_classes=5, weights=str(path)))
    msg = str(e.value)
    assert str(path) in msg
    assert "roi_heads.box_predictor.cls_score.weight" in msg
    assert "(4, 1024)" in msg and "(6, 1024)" in msg

    # another architecture: keys missing / unexpected are reported too
    with pytest.raises(RuntimeError, match="three_classes.pth"):
        build_detector(tiny("retinanet", num_classes=3, weights=str(path)))


def test_class_layers_skipped_only_when_asked(tmp_path):
    src = build_detector(tiny("retinanet", num_classes=3))
    dst = build_detector(tiny("retinanet", num_classes=5))
    with pytest.raises(RuntimeError, match="cls_logits"):
        load_checked(dst, src.state_dict(), "x.pth")
    skipped = load_checked(dst, src.state_dict(), "COCO", skip_mismatched=CLASS_LAYERS)
    head = "head.classification_head.cls_logits"
    assert skipped == [f"{head}.weight", f"{head}.bias"]
    assert torch.equal(dst.head.regression_head.bbox_reg.weight, src.head.regression_head.bbox_reg.weight)


def test_backbone_weights_from_a_detector_checkpoint(tmp_path):
    torch.manual_seed(3)
    teacher = build_detector(tiny("faster_rcnn"))
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    student = build_detector(tiny("retinanet", backbone_weights=str(path)))
    s, t = student.backbone.body, teacher.backbone.body
    assert torch.equal(s.layer3[0].conv1.weight, t.layer3[0].conv1.weight)


def test_weights_name_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(4)
    imagenet = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    os.makedirs(tmp_path / "checkpoints")
    torch.save(imagenet.state_dict(), tmp_path / "checkpoints" / os.path.basename(url))
    model = build_detector(tiny("fcos", backbone_weights="ResNet18_Weights.IMAGENET1K_V1"))
    assert torch.equal(model.backbone.body.conv1.weight, imagenet.conv1.weight)


def test_weights_name_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty cache

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="could not download weights ResNet18_Weights.IMAGENET1K_V1") as e:
        build_detector(tiny("retinanet", backbone_weights="ResNet18_Weights.IMAGENET1K_V1"))
    assert time.monotonic() - start < 10
    assert "local checkpoint path" in str(e.value)
    with pytest.raises(RuntimeError, match="could not download weights FCOS_ResNet50_FPN_Weights.COCO_V1"):
        build_detector(tiny("fcos", weights="FCOS_ResNet50_FPN_Weights.COCO_V1"))


def test_bad_weights_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="model.weights"):
        build_detector(tiny("fcos", weights="imagenet"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_detector(tiny("fcos", backbone_weights=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="unknown torchvision weights name"):
        build_detector(tiny("fcos", weights="Nope_Weights.X"))


# ----------------------------------------------------------------------------------------------------------
# Teacher / student pairs


def test_check_pair():
    check_pair(tiny("retinanet", backbone="resnet50"), tiny("fcos", fpn_channels=64))  # fine
    check_pair(tiny("faster_rcnn", backbone="resnet50"), tiny("faster_rcnn"))
    with pytest.raises(ConfigError, match="num_classes"):
        check_pair(tiny(num_classes=3), tiny(num_classes=4))
    with pytest.raises(ConfigError, match="min_size"):
        check_pair(tiny(min_size=64), tiny(min_size=80))
    with pytest.raises(ConfigError, match="max_size"):
        check_pair(tiny(max_size=96), tiny(max_size=128))
    check_pair(tiny("faster_rcnn"), tiny("retinanet"))  # levels pair by stride once built (pair_levels)


def test_check_transforms():
    a = build_detector(tiny("retinanet"))
    b = build_detector(tiny("fcos"))
    check_transforms(a, b)
    b.transform.image_std = [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match="image_std"):
        check_transforms(a, b)


def test_pyramid_levels_of_torchvision_builders():
    # works on detectors built by torchvision itself (the export / evaluation path)
    detection = torchvision.models.detection
    m = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    assert pyramid_levels(m) == ["0", "1", "2", "p6", "p7"]
    assert feature_channels(m) == [256] * 5
    assert math.isclose(m.transform.image_mean[0], 0.485)
