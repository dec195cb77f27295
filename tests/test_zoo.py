"""torchvision's COCO detectors as detkd models (``model.torchvision``): the same state dict as torchvision's
builder, the same detections with the same weights, published-weights loading with another class count,
and pyramid pairing by stride."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
import yaml

from detkd.config import TORCHVISION_MODELS, ConfigError, ModelConfig, load_config
from detkd.models import build_detector, pair_levels, pyramid_levels, pyramid_strides

torch.set_num_threads(1)

NAMES = list(TORCHVISION_MODELS)
WEIGHTS = {
    "fasterrcnn_resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
    "fasterrcnn_resnet50_fpn_v2": "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
    "fasterrcnn_mobilenet_v3_large_fpn": "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1",
    "retinanet_resnet50_fpn": "RetinaNet_ResNet50_FPN_Weights.COCO_V1",
    "retinanet_resnet50_fpn_v2": "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1",
    "fcos_resnet50_fpn": "FCOS_ResNet50_FPN_Weights.COCO_V1",
}
SIZE = dict(min_size=96, max_size=128)


def torchvision_model(name: str, num_outputs: int, **kw) -> torch.nn.Module:
    """torchvision's own builder, weights=None (so its trunk has plain BatchNorm: detkd's ``norm: bn``)."""
    if name.startswith("fasterrcnn"):
        kw = {"box_score_thresh": kw.pop("score_thresh"), "box_detections_per_img": kw.pop("detections_per_img"),
              **kw}
    builder = getattr(torchvision.models.detection, name)
    return builder(weights=None, weights_backbone=None, num_classes=num_outputs, **SIZE, **kw)


def detkd_model(name: str, num_classes: int, norm: str = "bn", **kw) -> torch.nn.Module:
    return build_detector(ModelConfig(torchvision=name, num_classes=num_classes, norm=norm, **SIZE, **kw))


@pytest.mark.parametrize("name", NAMES)
def test_same_state_dict_and_same_detections_as_torchvision(name):
    torch.manual_seed(0)
    ours = detkd_model(name, num_classes=4, score_thresh=0.0, detections_per_img=20)
    theirs = torchvision_model(name, 5, score_thresh=0.0, detections_per_img=20)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)  # same keys, same order
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    # same trainable parameters (weights=None: torchvision trains every stage, like trainable_layers 5)
    assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in theirs.parameters()]

    ours.load_state_dict(b)  # the same random weights in both
    ours.eval()
    theirs.eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 112, generator=g)]
    with torch.no_grad():
        out_a, out_b = ours(images), theirs(images)
    assert sum(len(o["boxes"]) for o in out_b) > 0  # something to compare
    for da, db in zip(out_a, out_b):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(da[key], db[key]), key


@pytest.mark.parametrize("name", NAMES)
def test_published_weights_name_with_another_class_count(name, tmp_path, monkeypatch):
    # a stand-in for the published file (91 COCO outputs) in an offline hub cache
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(2)
    coco = torchvision_model(name, 91, score_thresh=0.05, detections_per_img=100)
    url = torchvision.models.get_weight(WEIGHTS[name]).url
    os.makedirs(tmp_path / "checkpoints")
    torch.save(coco.state_dict(), tmp_path / "checkpoints" / os.path.basename(url))

    model = detkd_model(name, num_classes=3, norm="frozen_bn", weights=WEIGHTS[name])
    state, published = model.state_dict(), coco.state_dict()
    reinit = [k for k in published if k in state and state[k].shape != published[k].shape]
    assert reinit and all(("box_predictor" in k or "cls_logits" in k) for k in reinit)
    for k, v in state.items():  # everything else is the published tensor (frozen BN: no num_batches_tracked)
        if k not in reinit:
            assert torch.equal(v, published[k]), k
    if name in ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"):  # trained with eps 0, as torchvision sets
        assert model.backbone.body.bn1.eps == 0.0


def test_pyramid_strides_measured_on_a_forward():
    mobile = detkd_model("fasterrcnn_mobilenet_v3_large_fpn", 3)
    # torchvision's MobileNetV3 FPN: two levels at stride 32 (C5 and the final 1x1 conv) and a pooled 64
    assert pyramid_levels(mobile) == ["0", "1", "pool"]
    assert pyramid_strides(mobile) == [32, 32, 64]
    assert pyramid_strides(detkd_model("retinanet_resnet50_fpn_v2", 3)) == [8, 16, 32, 64, 128]


def test_pair_levels_by_stride():
    frcnn, retina, mobile = [4, 8, 16, 32, 64], [8, 16, 32, 64, 128], [32, 32, 64]
    assert pair_levels(frcnn, frcnn) == [(i, i) for i in range(5)]
    assert pair_levels(frcnn, mobile) == [(3, 0), (3, 1), (4, 2)]
    assert pair_levels(retina, frcnn) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ConfigError, match=r"share 1 stride\(s\) \[64\].*at least 2"):
        pair_levels([4, 8, 16, 64], [32, 64, 128])
    with pytest.raises(ConfigError, match=r"P2-P4 \(strides 4..16\).*P5-P7"):
        pair_levels([4, 8, 16], [32, 64, 128])


def test_config_names_a_torchvision_model(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"torchvision": "fasterrcnn_mobilenet_v3_large_fpn", "num_classes": 20}}))
    cfg = load_config(path)
    assert (cfg.model.arch, cfg.model.backbone, cfg.model.fpn_channels) == ("faster_rcnn", "mobilenet_v3_large", 256)
    path.write_text(yaml.safe_dump({"model": {"torchvision": "fasterrcnn_mobilenet_v3_large_320_fpn"}}))
    small = load_config(path).model  # the builder's 320 px transform and test proposals, unless set
    assert (small.min_size, small.max_size, small.rpn_pre_nms_top_n_test, small.rpn_post_nms_top_n_test) == (
        320, 640, 150, 150)
    path.write_text(yaml.safe_dump({"model": {"torchvision": "fasterrcnn_mobilenet_v3_large_320_fpn",
                                              "min_size": 256}}))
    assert load_config(path).model.min_size == 256
    path.write_text(yaml.safe_dump({"model": {"torchvision": "retinanet_resnet50_fpn_v2", "arch": "fcos"}}))
    with pytest.raises(ConfigError, match=r"model.arch: 'fcos' contradicts model.torchvision"):
        load_config(path)
    path.write_text(yaml.safe_dump({"model": {"torchvision": "yolo"}}))
    with pytest.raises(ConfigError, match="model.torchvision: 'yolo' is not one of"):
        load_config(path)


def test_exported_torchvision_student_loads_without_detkd(tmp_path):
    import importlib.util

    from detkd.commands.export import export_student
    from detkd.config import Config, to_dict
    from detkd.runtime.checkpoint import save_checkpoint

    cfg = Config(model=ModelConfig(torchvision="fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, norm="bn",
                                   **SIZE))
    torch.manual_seed(3)
    model = build_detector(cfg.model).eval()
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "last.pt", {"model": model.state_dict(), "config": to_dict(cfg)})
    export_student(tmp_path / "run", tmp_path / "exp")
    spec = importlib.util.spec_from_file_location("build_model", tmp_path / "exp" / "build_model.py")
    build_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_model)  # torch + torchvision only
    loaded = build_model.load_exported(tmp_path / "exp")
    image = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        a, b = model(image)[0], loaded(image)[0]
    assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
