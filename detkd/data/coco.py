"""COCO instances json + image folder (the COCO 2017 layout, or any file in that format).

Layout: ``<root>/annotations/instances_train2017.json`` with images under ``<root>/train2017/``; the
paths are ``data.train_ann`` / ``data.train_images`` (``val_*`` for the val split) relative to
``data.root``. Category ids of the file (any integers) map to contiguous labels 1..C in sorted id
order, names kept. ``iscrowd: 1`` annotations become ignore regions. Images without annotations are
kept (they contribute background only).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detkd.data.common import DataError, DataFileNotFoundError, DetectionDataset, ImageRecord


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_NUMBER = (int, float)  # exact types: a JSON true/false is not a coordinate


def read_json(path: Path) -> Any:
    """Parse a json file; a missing file or bad json is a DataError naming the file."""
    if not path.is_file():
        raise DataFileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e


def _list_of_dicts(data: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    value = data.get(key)
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list under {key!r}, got {type(value).__name__}")
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: {key}[{i}] is not an object: {entry!r}")
    return value


def parse_coco(
    ann_file: str | Path, image_dir: str | Path
) -> tuple[list[ImageRecord], list[dict[str, Any]], list[int]]:
    """Read a COCO instances file into records, contiguous categories and the file's category ids.

    Returns ``(records, categories, file_category_ids)`` where ``file_category_ids[label - 1]`` is the
    category id used in the file for ``label``. Structural errors (missing keys, duplicate image ids,
    unknown image or category ids, malformed boxes) raise :class:`DataError` naming the file and entry.
    """
    path = Path(ann_file)
    image_dir = Path(image_dir)
    data = read_json(path)
    if not image_dir.is_dir():
        raise DataFileNotFoundError(f"image folder not found: {image_dir} (images of {path})")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")

    # Categories: sorted file ids -> labels 1..C.
    by_cat_id: dict[int, str] = {}
    for i, cat in enumerate(_list_of_dicts(data, "categories", path)):
        cat_id, name = cat.get("id"), cat.get("name")
        if not _is_int(cat_id) or not isinstance(name, str):
            raise DataError(f"{path}: categories[{i}] needs an integer 'id' and a string 'name', got {cat!r}")
        if cat_id in by_cat_id:
            raise DataError(f"{path}: duplicate category id {cat_id} ({by_cat_id[cat_id]!r} and {name!r})")
        by_cat_id[cat_id] = name
    file_ids = sorted(by_cat_id)
    label_of = {cat_id: k + 1 for k, cat_id in enumerate(file_ids)}
    categories = [{"id": k + 1, "name": by_cat_id[cat_id]} for k, cat_id in enumerate(file_ids)]

    # Images.
    records: dict[int, ImageRecord] = {}
    for i, img in enumerate(_list_of_dicts(data, "images", path)):
        image_id, file_name = img.get("id"), img.get("file_name")
        if not _is_int(image_id) or not isinstance(file_name, str) or not file_name:
            raise DataError(f"{path}: images[{i}] needs an integer 'id' and a 'file_name', got {img!r}")
        if image_id in records:
            raise DataError(f"{path}: duplicate image id {image_id} ({records[image_id].file.name} and {file_name})")
        width, height = img.get("width", 0), img.get("height", 0)
        if not _is_int(width) or not _is_int(height) or width < 0 or height < 0:
            raise DataError(f"{path}: image {file_name} (id {image_id}) has a bad width/height: {width}, {height}")
        records[image_id] = ImageRecord(image_id, image_dir / file_name, width, height, str(path))

    # Annotations (a loop over ~860k entries for COCO train: keep the per-entry work small).
    for i, ann in enumerate(_list_of_dicts(data, "annotations", path)):
        ref = f"annotation id {ann['id']}" if "id" in ann else f"annotations[{i}]"
        rec = records.get(ann.get("image_id"))
        if rec is None:
            raise DataError(f"{path}: {ref} refers to image id {ann.get('image_id')!r}, which is not in 'images'")
        label = label_of.get(ann.get("category_id"))
        bbox = ann.get("bbox")
        if label is None or type(bbox) is not list or len(bbox) != 4 or any(type(v) not in _NUMBER for v in bbox):
            where = f"{path}: {ref} (image {rec.file.name}, id {rec.image_id})"
            if label is None:
                raise DataError(f"{where}: unknown category id {ann.get('category_id')!r} (categories: {file_ids})")
            raise DataError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
        x, y, w, h = bbox
        area = ann.get("area", 0.0)
        rec.boxes.append([x, y, x + w, y + h])
        rec.labels.append(label)
        rec.ignore.append(bool(ann.get("iscrowd", 0)))
        rec.areas.append(area if type(area) in _NUMBER else 0.0)
        rec.refs.append(ref)
    return list(records.values()), categories, file_ids


def coco_dataset(
    ann_file: str | Path,
    image_dir: str | Path,
    transforms: Callable | None = None,
    bad_boxes: str = "repair",
    bad_images: str = "error",
    train: bool = False,
    name: str = "coco",
) -> DetectionDataset:
    """A :class:`DetectionDataset` over a COCO instances file and its image folder.

    ``dataset.file_category_ids[label - 1]`` gives back the category id of the file (to write results
    in the original ids).
    """
    records, categories, file_ids = parse_coco(ann_file, image_dir)
    dataset = DetectionDataset(
        records, categories, transforms, bad_boxes=bad_boxes, bad_images=bad_images, train=train, name=name
    )
    dataset.file_category_ids = file_ids
    return dataset
