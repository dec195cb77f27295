"""``detkd predict``: a checkpoint, a run folder or an export, on a folder with a broken image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.cli import main
from detkd.commands.export import export_student
from detkd.config import Config, to_dict
from detkd.models import build_detector
from detkd.runtime.checkpoint import save_checkpoint
from tests.engine_helpers import tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder whose best.pt holds a random tiny Faster R-CNN and its config."""
    run = tmp_path_factory.mktemp("run")
    cfg = Config(model=tiny_model("faster_rcnn"))
    torch.manual_seed(0)
    save_checkpoint(run / "best.pt", {"model": build_detector(cfg.model).state_dict(), "config": to_dict(cfg),
                                      "epoch": 1})
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (96, 72, 3), dtype=np.uint8)).save(folder / "b.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")  # ignored: no image suffix
    return folder


def test_predict_on_a_folder_with_a_broken_image(run_dir, images, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", str(run_dir), str(images), "--out", str(out), "--score", "0.0"]) == 0
    err = capsys.readouterr().err
    assert "skipped unreadable image" in err and "broken.jpg" in err
    assert "predict: 2 images" in err and "1 unreadable image(s) skipped" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.jpg", "detections.json"]
    assert Image.open(out / "a.png").size == (80, 64) and Image.open(out / "b.jpg").size == (72, 96)

    dets = json.loads((out / "detections.json").read_text())
    assert dets and {d["file_name"] for d in dets} == {"a.png", "b.jpg"}
    for d in dets:
        assert set(d) == {"image_id", "file_name", "category_id", "bbox", "score"}
        x, y, w, h = d["bbox"]
        width, height = (80, 64) if d["file_name"] == "a.png" else (72, 96)
        assert 0 <= x and 0 <= y and x + w <= width + 0.01 and y + h <= height + 0.01  # original pixels
        assert 1 <= d["category_id"] <= 10 and 0.0 <= d["score"] <= 1.0
    assert len([d for d in dets if d["image_id"] == 1]) <= 10  # model.detections_per_img

    # a score threshold keeps a subset; the export and the checkpoint file give the same detections
    high = tmp_path / "high"
    assert main(["predict", str(run_dir / "best.pt"), str(images / "a.png"), str(images / "b.jpg"), "--out",
                 str(high), "--score", "0.3", "--quiet"]) == 0
    kept = json.loads((high / "detections.json").read_text())
    assert len(kept) == len([d for d in dets if d["score"] >= 0.3])
    export_student(run_dir, tmp_path / "exp")
    assert main(["predict", str(tmp_path / "exp"), str(images), "--out", str(tmp_path / "pe"), "--score", "0.0",
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "pe" / "detections.json").read_text()) == dets


def test_predict_errors_are_named(run_dir, images, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing"), str(images), "--out", str(tmp_path / "o")]) == 2
    assert "nothing" in capsys.readouterr().err
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    assert main(["predict", str(plain), str(images), "--out", str(tmp_path / "o")]) == 2
    assert "not a detkd training checkpoint" in capsys.readouterr().err
    assert main(["predict", str(run_dir), str(images / "broken.jpg"), "--out", str(tmp_path / "o")]) == 1


def test_coco_names_for_a_model_with_its_coco_weights():
    from detkd.commands.predict import class_names_for
    from detkd.config import ModelConfig

    cfg = ModelConfig(torchvision="fasterrcnn_mobilenet_v3_large_fpn", num_classes=90,
                      weights="FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1")
    names = class_names_for(cfg)
    assert names[1] == "person" and names[3] == "car"
    cfg.num_classes = 5  # fine-tuned on other classes: numbers, unless --names says
    assert class_names_for(cfg) == {}
