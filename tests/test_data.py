"""COCO / VOC / loose-XML data sets, transforms, collate, loaders and the bad-input policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from detkd.config import DataConfig, ModelConfig
from detkd.data import (
    DataError,
    build_dataset,
    build_loader,
    coco_dataset,
    collate,
    model_targets,
    voc_dataset,
    voc_folder_dataset,
)
from detkd.data.transforms import eval_transforms, train_transforms

# ----------------------------------------------------------------------------------------------------------
# Fixtures written into tmp_path


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)


def coco_files(root: Path, images=None, annotations=None, categories=None) -> tuple[Path, Path]:
    """A tiny COCO set: a.png 40x30 with two boxes (one crowd), b.png 20x20 without annotations."""
    if images is None:
        images = [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 11, "file_name": "b.png", "width": 20, "height": 20},
        ]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [4, 6, 10, 8], "area": 70.0, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20, 0, 20, 30], "area": 600.0, "iscrowd": 1},
        ]
    if categories is None:
        categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    image_dir = root / "images"
    for img in images:
        if not (image_dir / img["file_name"]).exists():
            write_image(image_dir / img["file_name"], img.get("width", 20), img.get("height", 20))
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann, image_dir


def voc_xml(path: Path, filename: str, width: int, height: int, objects: list[tuple]) -> None:
    """objects: (name, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based pixel coordinates."""
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, x1, y1, x2, y2, d in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objs}</annotation>"
    )


def voc_devkit(root: Path) -> Path:
    """VOC2007/trainval (2 images, one difficult box) and VOC2012/trainval (1 image)."""
    devkit = root / "VOCdevkit"
    sets = {
        "VOC2007": {
            "000005": (50, 40, [("dog", 1, 1, 10, 20, 0), ("person", 11, 5, 30, 40, 1)]),
            "000007": (30, 30, [("cat", 5, 5, 25, 25, 0)]),
        },
        "VOC2012": {"2008_000001": (40, 50, [("aeroplane", 2, 3, 40, 50, 0)])},
    }
    for year, entries in sets.items():
        main = devkit / year / "ImageSets" / "Main"
        main.mkdir(parents=True)
        (main / "trainval.txt").write_text("".join(f"{k}\n" for k in entries))
        for k, (w, h, objects) in entries.items():
            voc_xml(devkit / year / "Annotations" / f"{k}.xml", f"{k}.jpg", w, h, objects)
            write_image(devkit / year / "JPEGImages" / f"{k}.jpg", w, h)
    return devkit


def small_model(min_size: int = 60, max_size: int = 200, num_classes: int = 2) -> ModelConfig:
    return ModelConfig(min_size=min_size, max_size=max_size, num_classes=num_classes)


# ----------------------------------------------------------------------------------------------------------
# COCO


def test_coco_items_labels_ignore_and_resize(tmp_path):
    ann, image_dir = coco_files(tmp_path)
    ds = coco_dataset(ann, image_dir, transforms=eval_transforms(small_model()), name="tiny")
    assert ds.summary == "tiny: 2 images, 2 boxes (1 ignore), 2 classes"
    # file ids 3 and 7 -> contiguous labels in sorted id order, names kept
    assert ds.categories == [{"id": 1, "name": "three"}, {"id": 2, "name": "seven"}]
    assert ds.file_category_ids == [3, 7]
    assert len(ds) == 2

    image, target = ds[0]
    # 40x30 -> shorter side 30 to 60: scale 2, image 80x60
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert tuple(image.shape) == (3, 60, 80)
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].dtype == torch.float32
    assert torch.allclose(target["boxes"], torch.tensor([[8.0, 12, 28, 28], [40, 0, 80, 60]]))
    assert target["labels"].tolist() == [2, 1] and target["labels"].dtype == torch.int64
    assert target["ignore"].tolist() == [False, True]
    assert target["image_id"].item() == 10 and target["image_id"].dtype == torch.int64
    assert target["orig_size"].tolist() == [30, 40]

    # the image without annotations is kept, with correctly shaped empty targets
    image, target = ds[1]
    assert tuple(image.shape) == (3, 60, 60)
    assert tuple(target["boxes"].shape) == (0, 4) and target["labels"].shape == (0,)
    assert target["ignore"].shape == (0,)


def test_coco_gt_original_coordinates(tmp_path):
    ann, image_dir = coco_files(tmp_path)
    gt = coco_dataset(ann, image_dir, transforms=eval_transforms(small_model())).coco_gt()
    assert gt["categories"] == [{"id": 1, "name": "three"}, {"id": 2, "name": "seven"}]
    assert [(i["id"], i["width"], i["height"]) for i in gt["images"]] == [(10, 40, 30), (11, 20, 20)]
    anns = gt["annotations"]
    assert [a["bbox"] for a in anns] == [[4.0, 6.0, 10.0, 8.0], [20.0, 0.0, 20.0, 30.0]]
    assert [a["category_id"] for a in anns] == [2, 1]
    assert [a["iscrowd"] for a in anns] == [0, 1]
    assert [a["area"] for a in anns] == [70.0, 600.0]
    assert len({a["id"] for a in anns}) == 2


def test_grayscale_and_rgba_become_three_channels(tmp_path):
    images = [
        {"id": 1, "file_name": "gray.png", "width": 20, "height": 10},
        {"id": 2, "file_name": "rgba.png", "width": 20, "height": 10},
    ]
    write_image(tmp_path / "images" / "gray.png", 20, 10, "L")
    write_image(tmp_path / "images" / "rgba.png", 20, 10, "RGBA")
    ann, image_dir = coco_files(tmp_path, images=images, annotations=[])
    ds = coco_dataset(ann, image_dir)
    for i in range(2):
        image, _ = ds[i]
        assert tuple(image.shape) == (3, 10, 20) and image.dtype == torch.uint8
    gray = np.array(Image.open(tmp_path / "images" / "gray.png"))
    assert torch.equal(ds[0][0][1], torch.from_numpy(gray))  # grey value copied to every channel


def test_hflip_moves_boxes(tmp_path):
    ann, image_dir = coco_files(tmp_path)
    data = DataConfig(hflip=1.0)
    plain = coco_dataset(ann, image_dir, transforms=eval_transforms(small_model()))
    flipped = coco_dataset(ann, image_dir, transforms=train_transforms(data, small_model()), train=True)
    image, target = flipped[0]
    # resized image is 80 wide: (x1, y1, x2, y2) -> (80 - x2, y1, 80 - x1, y2)
    assert torch.allclose(target["boxes"], torch.tensor([[52.0, 12, 72, 28], [0, 0, 40, 60]]))
    assert target["labels"].tolist() == [2, 1] and target["ignore"].tolist() == [False, True]
    assert torch.equal(image, plain[0][0].flip(-1))


def test_sanitize_keeps_labels_and_ignore_aligned(tmp_path):
    images = [{"id": 1, "file_name": "wide.png", "width": 200, "height": 100}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 50], "iscrowd": 1},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [60, 10, 2, 40], "iscrowd": 0},  # 0.4 px after resize
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [100, 20, 50, 50], "iscrowd": 0},
    ]
    ann, image_dir = coco_files(tmp_path, images=images, annotations=annotations)
    data = DataConfig(hflip=0.0)
    ds = coco_dataset(ann, image_dir, transforms=train_transforms(data, small_model(min_size=20)), train=True)
    image, target = ds[0]
    assert tuple(image.shape) == (3, 20, 40)  # scale 0.2
    assert torch.allclose(target["boxes"], torch.tensor([[0.0, 0, 10, 10], [20, 4, 30, 14]]))
    assert target["labels"].tolist() == [1, 2]
    assert target["ignore"].tolist() == [True, False]


def test_resize_caps_longer_side_and_equal_min_max(tmp_path):
    images = [{"id": 1, "file_name": "wide.png", "width": 200, "height": 50}]
    ann, image_dir = coco_files(tmp_path, images=images, annotations=[])
    ds = coco_dataset(ann, image_dir, transforms=eval_transforms(small_model(min_size=40, max_size=100)))
    assert tuple(ds[0][0].shape) == (3, 25, 100)  # 160 would exceed max_size: longer side -> 100
    ds = coco_dataset(ann, image_dir, transforms=eval_transforms(small_model(min_size=64, max_size=64)))
    assert tuple(ds[0][0].shape) == (3, 16, 64)


# ----------------------------------------------------------------------------------------------------------
# VOC


def test_voc_devkit_union_difficult_and_one_based_boxes(tmp_path):
    devkit = voc_devkit(tmp_path)
    ds = voc_dataset(devkit, ["VOC2007/trainval", "VOC2012/trainval"])
    assert len(ds) == 3 and len(ds.categories) == 20
    assert ds.categories[11] == {"id": 12, "name": "dog"}
    image, target = ds[0]
    assert tuple(image.shape) == (3, 40, 50)
    # (xmin - 1, ymin - 1, xmax, ymax)
    assert torch.allclose(target["boxes"], torch.tensor([[0.0, 0, 10, 20], [10, 4, 30, 40]]))
    assert target["labels"].tolist() == [12, 15]  # dog, person
    assert target["ignore"].tolist() == [False, True]  # difficult
    _, target = ds[2]
    assert target["labels"].tolist() == [1] and target["orig_size"].tolist() == [50, 40]
    assert sorted(int(i) for i in ds.image_ids) == [1, 2, 3]
    assert [a["iscrowd"] for a in ds.coco_gt()["annotations"]] == [0, 1, 0, 0]

    only_07 = voc_dataset(devkit, ["VOC2007/trainval"])
    assert len(only_07) == 2


def test_voc_errors_name_the_file(tmp_path):
    devkit = voc_devkit(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"VOC2007.*ImageSets.*test\.txt"):
        voc_dataset(devkit, ["VOC2007/test"])
    with pytest.raises(DataError, match="not of the form"):
        voc_dataset(devkit, ["trainval"])
    with pytest.raises(DataError, match=r"000005\.xml.*'dog'.*not in the class list"):
        voc_dataset(devkit, ["VOC2007/trainval"], class_names=["cat", "person"])
    (devkit / "VOC2007" / "Annotations" / "000007.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"000007\.xml: not valid XML"):
        voc_dataset(devkit, ["VOC2007/trainval"])


def test_voc_folder_next_to_images_and_in_own_folder(tmp_path):
    names = ["apple", "pear"]
    folder = tmp_path / "shots"
    write_image(folder / "one.png", 30, 20)
    voc_xml(folder / "one.xml", "stale_name.png", 30, 20, [("pear", 3, 3, 12, 10, 0)])
    write_image(folder / "two.jpg", 25, 25)
    voc_xml(folder / "two.xml", "two.jpg", 0, 0, [("apple", 1, 1, 25, 25, 1)])  # size 0: read from the file
    write_image(folder / "unlabelled.png", 10, 10)
    ds = voc_folder_dataset(folder, folder, class_names=names)
    assert ds.categories == [{"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}]
    assert len(ds) == 2 and "not used: 1 image file(s) without an XML file" in ds.summary
    _, target = ds[0]
    assert target["boxes"].tolist() == [[2.0, 2.0, 12.0, 10.0]] and target["labels"].tolist() == [2]
    _, target = ds[1]
    assert target["orig_size"].tolist() == [25, 25] and target["ignore"].tolist() == [True]

    # XMLs in their own folder, chosen through data.train_ann
    root = tmp_path / "proj"
    write_image(root / "img" / "x.png", 16, 16)
    voc_xml(root / "xml" / "x.xml", "x.png", 16, 16, [("apple", 2, 2, 9, 9, 0)])
    data = DataConfig(format="voc_folder", root=str(root), train_images="img", train_ann="xml", class_names=names)
    ds = build_dataset(data, "train", small_model(min_size=16, max_size=16), train=False)
    assert len(ds) == 1 and ds[0][1]["boxes"].tolist() == [[1.0, 1.0, 9.0, 9.0]]
    data.train_ann = "missing"
    with pytest.raises(FileNotFoundError, match="annotation folder not found"):
        build_dataset(data, "train", small_model(min_size=16, max_size=16))


def test_voc_folder_unknown_class_names_file_and_name(tmp_path):
    write_image(tmp_path / "a.png", 10, 10)
    voc_xml(tmp_path / "a.xml", "a.png", 10, 10, [("banana", 1, 1, 5, 5, 0)])
    with pytest.raises(DataError, match=r"a\.xml: object 0 has class name 'banana'"):
        voc_folder_dataset(tmp_path, tmp_path, class_names=["apple"])


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_and_malformed_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*nope\.json"):
        coco_dataset(tmp_path / "nope.json", tmp_path)
    ann, _ = coco_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*elsewhere"):
        coco_dataset(ann, tmp_path / "elsewhere")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        coco_dataset(bad, tmp_path)
    bad.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DataError, match=r"bad\.json: expected a list under 'categories'"):
        coco_dataset(bad, tmp_path)


def test_unknown_category_unknown_image_and_duplicate_ids(tmp_path):
    anns = [{"id": 5, "image_id": 10, "category_id": 99, "bbox": [1, 1, 2, 2]}]
    ann, image_dir = coco_files(tmp_path, annotations=anns)
    with pytest.raises(DataError, match=r"annotation id 5 \(image a\.png, id 10\): unknown category id 99"):
        coco_dataset(ann, image_dir)

    anns = [{"id": 6, "image_id": 12, "category_id": 3, "bbox": [1, 1, 2, 2]}]
    ann, image_dir = coco_files(tmp_path, annotations=anns)
    with pytest.raises(DataError, match=r"annotation id 6 refers to image id 12"):
        coco_dataset(ann, image_dir)

    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}, {"id": 1, "file_name": "b.png"}]
    ann, image_dir = coco_files(tmp_path, images=images, annotations=[])
    with pytest.raises(DataError, match=r"duplicate image id 1 \(a\.png and b\.png\)"):
        coco_dataset(ann, image_dir)

    anns = [{"id": 7, "image_id": 10, "category_id": 3, "bbox": [1, 1, 2]}]
    ann, image_dir = coco_files(tmp_path, annotations=anns)
    with pytest.raises(DataError, match=r"annotation id 7 .*'bbox' must be 4 numbers"):
        coco_dataset(ann, image_dir)


def test_missing_image_error_and_skip(tmp_path, capsys):
    ann, image_dir = coco_files(tmp_path)
    (image_dir / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image b\.png \(id 11\): image file not found"):
        coco_dataset(ann, image_dir)
    capsys.readouterr()
    ds = coco_dataset(ann, image_dir, bad_images="skip")
    assert len(ds) == 1 and int(ds.image_ids[0]) == 10
    assert [i["id"] for i in ds.coco_gt()["images"]] == [10]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad images (skip): 1 of 2 skipped (1 missing)" in err


def test_corrupt_image_error_and_skip(tmp_path, capsys):
    ann, image_dir = coco_files(tmp_path)
    (image_dir / "a.png").write_bytes(b"not an image at all")
    ds = coco_dataset(ann, image_dir)  # decodability is checked lazily
    with pytest.raises(DataError, match=r"a\.png \(id 10\): cannot decode image"):
        ds[0]
    # skip: a file that is no image at all is found by its header at construction, counted in the summary
    capsys.readouterr()
    ds = coco_dataset(ann, image_dir, bad_images="skip", train=True)
    assert len(ds) == 1 and "bad images (skip): 1 of 2 skipped (1 unreadable)" in capsys.readouterr().err
    # a truncated file (sound header) is only found when decoded
    write_image(image_dir / "a.png", 40, 30)
    (image_dir / "a.png").write_bytes((image_dir / "a.png").read_bytes()[:1000])
    # skip, training: replaced by the next decodable item; reported once per file
    ds = coco_dataset(ann, image_dir, bad_images="skip", train=True)
    capsys.readouterr()
    for _ in range(2):
        _, target = ds[0]
        assert target["image_id"].item() == 11
    assert capsys.readouterr().err.count("cannot decode image") == 1
    # skip, evaluation: the id and its ground truth stay, the image reads as black
    ds = coco_dataset(ann, image_dir, bad_images="skip", train=False)
    image, target = ds[0]
    assert target["image_id"].item() == 10 and tuple(image.shape) == (3, 30, 40) and image.max() == 0


def test_image_size_differs_from_annotation(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 50, "height": 30}]
    write_image(tmp_path / "images" / "a.png", 40, 30)
    ann, image_dir = coco_files(tmp_path, images=images, annotations=[])
    with pytest.raises(DataError, match=r"a\.png \(id 1\): file is 40x30 but the annotation says 50x30"):
        coco_dataset(ann, image_dir)[0]


BAD_BOXES = [
    {"id": 1, "image_id": 10, "category_id": 3, "bbox": [4, 6, 0, 8]},  # zero width
    {"id": 2, "image_id": 10, "category_id": 3, "bbox": [30, 20, 20, 20]},  # reaches outside: clip to 30,20,40,30
    {"id": 3, "image_id": 10, "category_id": 3, "bbox": [50, 5, 5, 5]},  # entirely outside
    {"id": 4, "image_id": 10, "category_id": 7, "bbox": [1, 1, 5, 5]},  # fine
    {"id": 5, "image_id": 10, "category_id": 7, "bbox": [35, 25, 5.5, 5.5]},  # 0.5 px over: tolerated, clipped
    {"id": 6, "image_id": 10, "category_id": 7, "bbox": [float("nan"), 1, 2, 2]},
]


def test_bad_boxes_repair(tmp_path, capsys):
    ann, image_dir = coco_files(tmp_path, annotations=BAD_BOXES)
    capsys.readouterr()
    ds = coco_dataset(ann, image_dir, bad_boxes="repair")
    _, target = ds[0]
    assert target["boxes"].tolist() == [[30.0, 20.0, 40.0, 30.0], [1.0, 1.0, 6.0, 6.0], [35.0, 25.0, 40.0, 30.0]]
    assert target["labels"].tolist() == [1, 2, 2]
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one summary line for the whole data set
    expected = (
        "1 clipped, 1 dropped (non-finite coordinates), 1 dropped (non-positive width or height), "
        "1 dropped (outside the image)"
    )
    assert f"bad boxes (repair): {expected}" in err


def test_bad_boxes_drop(tmp_path, capsys):
    ann, image_dir = coco_files(tmp_path, annotations=BAD_BOXES)
    capsys.readouterr()
    _, target = coco_dataset(ann, image_dir, bad_boxes="drop")[0]
    assert target["boxes"].tolist() == [[1.0, 1.0, 6.0, 6.0], [35.0, 25.0, 40.0, 30.0]]
    expected = "1 dropped (non-finite coordinates), 1 dropped (non-positive width or height), 2 dropped (outside"
    assert f"bad boxes (drop): {expected}" in capsys.readouterr().err


def test_bad_boxes_error(tmp_path):
    ann, image_dir = coco_files(tmp_path, annotations=BAD_BOXES)
    with pytest.raises(DataError, match=r"image a\.png \(id 10\), annotation id 1: .* non-positive width"):
        coco_dataset(ann, image_dir, bad_boxes="error")
    ann, image_dir = coco_files(tmp_path, annotations=BAD_BOXES[1:])
    with pytest.raises(DataError, match=r"annotation id 2: box \[30.0, 20.0, 50.0, 40.0\].*outside the image"):
        coco_dataset(ann, image_dir, bad_boxes="error")


# ----------------------------------------------------------------------------------------------------------
# build_dataset, collate, model targets, loader


def test_build_dataset_coco_and_class_count_check(tmp_path):
    coco_files(tmp_path)
    data = DataConfig(format="coco", root=str(tmp_path), train_ann="annotations.json", train_images="images")
    ds = build_dataset(data, "train", small_model(), train=False)
    assert len(ds) == 2 and tuple(ds[0][0].shape) == (3, 60, 80)
    with pytest.raises(DataError, match="has 2 classes but model.num_classes is 5"):
        build_dataset(data, "train", small_model(num_classes=5))
    with pytest.raises(ValueError, match="split must be"):
        build_dataset(data, "test", small_model())


def test_collate_and_model_targets(tmp_path):
    ann, image_dir = coco_files(tmp_path)
    ds = coco_dataset(ann, image_dir, transforms=eval_transforms(small_model()))
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
    plain = model_targets(targets)
    assert set(plain[0]) == {"boxes", "labels"}
    assert type(plain[0]["boxes"]) is torch.Tensor and plain[0]["boxes"].dtype == torch.float32
    assert plain[0]["boxes"].tolist() == [[8.0, 12.0, 28.0, 28.0]]  # the crowd box is gone
    assert plain[0]["labels"].tolist() == [2] and plain[0]["labels"].dtype == torch.int64
    assert tuple(plain[1]["boxes"].shape) == (0, 4) and tuple(plain[1]["labels"].shape) == (0,)


def test_build_loader_deterministic_shuffle(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(1, 9)]
    ann, image_dir = coco_files(tmp_path, images=images, annotations=[])
    ds = coco_dataset(ann, image_dir)

    def order(seed: int) -> list[int]:
        loader = build_loader(ds, batch_size=3, workers=0, shuffle=True, seed=seed)
        return [int(t["image_id"]) for _, targets in loader for t in targets]

    assert order(0) == order(0)
    assert sorted(order(0)) == list(range(1, 9))
    assert order(0) != order(1)
    loader = build_loader(ds, batch_size=3, workers=0, shuffle=False, drop_last=True)
    assert [int(t["image_id"]) for _, ts in loader for t in ts] == [1, 2, 3, 4, 5, 6]
    assert loader.pin_memory == torch.cuda.is_available()
