"""``detkd prototypes``: files written, the selection equals training's, keys map to the right boxes, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from detkd.cli import main
from detkd.commands.prototypes import BACKGROUND, CELL, GAP, HEADER_H, LABEL_W, gallery_size, instance_table
from detkd.config import to_dict
from detkd.data import build_dataset
from detkd.distill import build_distiller
from detkd.distill.base import DistillContext
from detkd.engine.assemble import feature_loader
from detkd.models import build_detector, feature_channels
from tests.engine_helpers import random_global_pair, tiny_config, tiny_model

RESIZED = 80  # the 64 px digits scenes are resized to 80 px: original and transformed frames differ


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("proto_export")
    cfg, cfg_path, _ = random_global_pair(root, teacher_fpn=48, student_fpn=32, k=3, size=RESIZED)

    out = root / "out"
    rc = main(["prototypes", str(cfg_path), "--checkpoint", str(root / "student.pt"), "--out", str(out)])
    assert rc == 0
    return {"cfg": cfg, "cfg_path": cfg_path, "root": root, "out": out}


def test_files_load_and_indices_are_valid(setup):
    out = setup["out"]
    assert {"prototypes.pt", "prototypes.json"} <= {p.name for p in out.iterdir()}
    data = torch.load(out / "prototypes.pt", weights_only=True)
    summary = json.loads((out / "prototypes.json").read_text())
    assert data["method"] == "global" and data["k"] == 3 and data["generator"] == "pgm"
    assert len(data["levels"]) == 5  # RetinaNet P3-P7
    n = data["num_instances"]
    assert n > 0 and summary["time"]["total_s"] > 0
    for level in data["levels"]:
        assert level["classes"], "every level has prototypes"
        for c, e in level["classes"].items():
            assert 1 <= c <= 10
            k = e["indices"].shape[0]
            assert k == 3  # PGM with repeats allowed always makes k picks
            assert e["indices"].dtype == torch.int64 and int(e["indices"].min()) >= 0 and int(e["indices"].max()) < n
            assert e["image_ids"].shape == (k,) and e["boxes"].shape == (k, 4)
            assert e["teacher"].shape == (k, 48) and e["student"].shape == (k, 32)
            assert (e["boxes"][:, 2:] > e["boxes"][:, :2]).all()
            costs = e["costs"]
            assert costs.shape == (k,) and (costs[1:] <= costs[:-1] + 1e-6).all()  # Eq. 4 never increases
            js = summary["levels"][level["level"]]["classes"][str(c)]
            assert [i["image_id"] for i in js["instances"]] == e["image_ids"].tolist()
            assert all(Path(i["file"]).is_file() for i in js["instances"])


def test_selection_equals_training_refresh(setup):
    """The same pair and loader through the distiller's own epoch hook picks the same prototypes."""
    cfg = setup["cfg"]
    torch.manual_seed(0)
    teacher = build_detector(dataclasses.replace(cfg.distill.teacher, weights=cfg.distill.teacher_checkpoint))
    student = build_detector(cfg.model)
    student.load_state_dict(torch.load(setup["root"] / "student.pt", weights_only=True))
    d = build_distiller("global", {"k": 3}, feature_channels(teacher), feature_channels(student), "retinanet")
    d.on_epoch_start(DistillContext(teacher=teacher.eval(), student=student, loader=feature_loader(cfg),
                                    device=torch.device("cpu"), epoch=0, epochs=1))
    data = torch.load(setup["out"] / "prototypes.pt", weights_only=True)
    for lv, level in enumerate(data["levels"]):
        assert sorted(level["classes"]) == sorted(d.bank.protos[lv])
        for c, e in level["classes"].items():
            assert torch.equal(e["indices"], d.bank.protos[lv][c].indices)
            torch.testing.assert_close(e["student"], d.bank.protos[lv][c].student)


def test_boxes_are_in_original_coordinates_and_match_labels(setup):
    """Each exported (image id, box index) is that box of the non-augmented training item, scaled back."""
    cfg = setup["cfg"]
    ds = build_dataset(cfg.data, "train", cfg.model, train=False)
    items = {}
    for i in range(len(ds)):
        img, t = ds[i]
        items[int(t["image_id"])] = (img, t)
    data = torch.load(setup["out"] / "prototypes.pt", weights_only=True)
    for level in data["levels"]:
        for c, e in level["classes"].items():
            for img_id, j, box in zip(e["image_ids"].tolist(), e["box_index"].tolist(), e["boxes"]):
                img, t = items[img_id]
                keep = ~t["ignore"]
                h0, w0 = t["orig_size"].tolist()
                scale = torch.tensor([w0 / img.shape[2], h0 / img.shape[1]] * 2)
                assert img.shape[1] == RESIZED and h0 == 64
                torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor)[keep][j] * scale, box,
                                           atol=0.05, rtol=0)
                assert int(t["labels"][keep][j]) == c


def test_gallery_has_one_row_per_class(setup):
    data = torch.load(setup["out"] / "prototypes.pt", weights_only=True)
    for level in data["levels"]:
        path = setup["out"] / f"gallery_level{level['level']}.png"
        with Image.open(path) as im:
            im = im.convert("RGB")
            rows = len(level["classes"])
            assert im.size == gallery_size(rows, 3)
            for r in range(rows):  # every cell of every row holds a crop (not the blank background)
                for col in range(3):
                    left, top = LABEL_W + col * (CELL + GAP), HEADER_H + r * (CELL + GAP)
                    cell = im.crop((left, top, left + CELL, top + CELL))
                    assert cell.getcolors(CELL * CELL) != [(CELL * CELL, BACKGROUND)]


def test_config_without_distill_is_a_clear_error(setup, tmp_path, capsys):
    cfg = tiny_config(setup["root"] / "data", tmp_path / "run")
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    rc = main(["prototypes", str(path), "--checkpoint", str(setup["root"] / "student.pt"), "--out", str(tmp_path)])
    assert rc == 2
    assert "no distill section" in capsys.readouterr().err
    assert not (tmp_path / "prototypes.pt").exists()


def test_student_checkpoint_of_another_model_is_a_clear_error(setup, tmp_path, capsys):
    wrong = tmp_path / "wrong.pt"
    torch.save(build_detector(tiny_model("retinanet", fpn=16)).state_dict(), wrong)
    rc = main(["prototypes", str(setup["cfg_path"]), "--checkpoint", str(wrong), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and str(wrong) in err and "shape" in err
    rc = main(["prototypes", str(setup["cfg_path"]), "--checkpoint", str(tmp_path / "missing.pt"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_instance_table_skips_ignore_boxes_in_the_box_index():
    """The bank numbers an image's boxes after dropping ignore (crowd / difficult) boxes."""
    gt = {
        "images": [{"id": 7, "file_name": "a.png"}, {"id": 9, "file_name": "b.png"}],
        "annotations": [
            {"image_id": 7, "bbox": [0, 0, 5, 5], "category_id": 1, "iscrowd": 1},
            {"image_id": 7, "bbox": [10, 20, 4, 6], "category_id": 2, "iscrowd": 0},
            {"image_id": 9, "bbox": [1, 2, 3, 4], "category_id": 3, "iscrowd": 0},
            {"image_id": 7, "bbox": [30, 30, 2, 2], "category_id": 1, "iscrowd": 0},
        ],
    }
    files, table = instance_table(gt)
    assert files == {7: "a.png", 9: "b.png"}
    assert table == {(7, 0): ([10.0, 20.0, 14.0, 26.0], 2), (7, 1): ([30.0, 30.0, 32.0, 32.0], 1),
                     (9, 0): ([1.0, 2.0, 4.0, 6.0], 3)}
