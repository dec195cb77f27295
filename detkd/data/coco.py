"""COCO instances json + image folder (the COCO 2017 layout, or any file in that format).

Layout: ``<root>/annotations/instances_train2017.json`` with images under ``<root>/train2017/``; the
paths are ``data.train_ann`` / ``data.train_images`` (``val_*`` for the val split) relative to
``data.root``. Category ids of the file (any integers) map to contiguous labels 1..C in sorted id
order, names kept. ``iscrowd: 1`` annotations become ignore regions. Images without annotations are
kept (they contribute background only).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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


def _list_of_dicts(data: dict[str, Any], key: str, path: Path, skip: Counter[str] | None = None
                   ) -> list[dict[str, Any]]:
    """The list under ``key``; an entry that is not an object is an error, or (``skip`` given) counted and
    left out."""
    value = data.get(key)
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list under {key!r}, got {type(value).__name__}")
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, dict):
            out.append(entry)
        elif skip is not None:
            skip[f"{key[:-1]} entries that are not objects"] += 1  # "image entries ..."
        else:
            raise DataError(f"{path}: {key}[{i}] is not an object: {entry!r}")
    return out


def _reused_ids(anns: list[dict[str, Any]]) -> set[Any]:
    """The annotation ids that occur more than once (integer ids counted with numpy: COCO has ~860k)."""
    ints = np.fromiter((a["id"] for a in anns if _is_int(a.get("id")) and -(2**63) <= a["id"] < 2**63),
                       dtype=np.int64)
    values, counts = np.unique(ints, return_counts=True)
    reused: set[Any] = set(values[counts > 1].tolist())
    others = Counter(a["id"] for a in anns if isinstance(a.get("id"), str))
    return reused | {k for k, n in others.items() if n > 1}


def _categories(data: dict[str, Any], path: Path) -> tuple[list[int], dict[int, int], list[dict[str, Any]]]:
    """Sorted file category ids, file id -> label 1..C, and the contiguous categories."""
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
    return file_ids, label_of, categories


def _images(data: dict[str, Any], path: Path, image_dir: Path, skip: Counter[str] | None,
            bad: Callable[[str, str], None]) -> tuple[dict[int, ImageRecord], set[int]]:
    """The records of the file's images by id, and the ids used twice (``bad``: :func:`parse_coco`'s policy)."""
    records: dict[int, ImageRecord] = {}
    duplicated: set[int] = set()
    for i, img in enumerate(_list_of_dicts(data, "images", path, skip)):
        image_id, file_name = img.get("id"), img.get("file_name")
        if not _is_int(image_id) or not isinstance(file_name, str) or not file_name:
            bad("images without an integer id or a file_name",
                f"images[{i}] needs an integer 'id' and a 'file_name', got {img!r}")
            continue
        if image_id in records or image_id in duplicated:
            first = records[image_id].file.name if image_id in records else "another entry"
            bad("images with a duplicate id", f"duplicate image id {image_id} ({first} and {file_name})")
            if image_id in records:
                del records[image_id]
                skip["images with a duplicate id"] += 1  # the first one goes too
            duplicated.add(image_id)
            continue
        width, height = img.get("width", 0), img.get("height", 0)
        if not _is_int(width) or not _is_int(height) or width < 0 or height < 0:
            bad("images with a bad width/height",
                f"image {file_name} (id {image_id}) has a bad width/height: {width}, {height}")
            continue
        records[image_id] = ImageRecord(image_id, image_dir / file_name, width, height, str(path))
    return records, duplicated


def parse_coco(
    ann_file: str | Path, image_dir: str | Path, bad_annotations: str = "error",
    skipped: Counter[str] | None = None,
) -> tuple[list[ImageRecord], list[dict[str, Any]], list[int]]:
    """Read a COCO instances file into records, contiguous categories and the file's category ids.

    Returns ``(records, categories, file_category_ids)`` where ``file_category_ids[label - 1]`` is the
    category id used in the file for ``label``. Broken entries (an image without integer id or file
    name, a bad width/height, duplicate image ids, an annotation of an unknown image or category id, a
    missing or malformed bbox, a duplicate annotation id) raise :class:`DataError` naming the file and
    entry under ``bad_annotations="error"``; under ``"skip"`` they are left out and counted in
    ``skipped`` (what went wrong -> how often). Under ``skip``, an image id used twice drops every image
    with that id and their annotations (the boxes cannot be attributed), an exact copy of an annotation
    is dropped, and a different annotation reusing an id is kept (detkd does not use annotation ids).
    The categories themselves must be sound under either policy: they define the labels.

    Why one function: the annotation loop runs once per box (about 860k for COCO train), so its checks stay
    inline, without a call per entry.
    """
    if bad_annotations not in ("error", "skip"):
        raise ValueError(f"bad_annotations must be error or skip, got {bad_annotations!r}")
    path = Path(ann_file)
    image_dir = Path(image_dir)
    data = read_json(path)
    if not image_dir.is_dir():
        raise DataFileNotFoundError(f"image folder not found: {image_dir} (images of {path})")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    skip: Counter[str] | None = None
    if bad_annotations == "skip":
        skip = skipped if skipped is not None else Counter()

    file_ids, label_of, categories = _categories(data, path)

    def bad(what: str, message: str) -> None:
        """An error under ``error``; counted under ``skip`` (the caller then leaves the entry out)."""
        if skip is None:
            raise DataError(f"{path}: {message}")
        skip[what] += 1

    records, duplicated = _images(data, path, image_dir, skip, bad)

    # Annotations (a loop over ~860k entries for COCO train: keep the per-entry work small).
    anns = _list_of_dicts(data, "annotations", path, skip)
    reused = _reused_ids(anns)
    seen: dict[Any, tuple[Any, Any, Any]] = {}  # only the reused ids
    for i, ann in enumerate(anns):
        ref = f"annotation id {ann['id']}" if "id" in ann else f"annotations[{i}]"
        image_id = ann.get("image_id")
        rec = records.get(image_id) if _is_int(image_id) else None
        if rec is None:
            if image_id in duplicated:
                skip["annotations of images with a duplicate id"] += 1  # only reachable under skip
            else:
                bad("annotations of an unknown image id",
                    f"{ref} refers to image id {image_id!r}, which is not in 'images'")
            continue
        category_id = ann.get("category_id")
        label = label_of.get(category_id) if _is_int(category_id) else None
        bbox = ann.get("bbox")
        if label is None or type(bbox) is not list or len(bbox) != 4 or any(type(v) not in _NUMBER for v in bbox):
            where = f"{ref} (image {rec.file.name}, id {rec.image_id})"
            if label is None:
                bad("annotations with an unknown category id",
                    f"{where}: unknown category id {ann.get('category_id')!r} (categories: {file_ids})")
            else:
                bad("annotations whose bbox is not 4 numbers",
                    f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
            continue
        key = ann.get("id")
        if (_is_int(key) or isinstance(key, str)) and key in reused:
            content = (image_id, category_id, bbox)
            if key in seen:
                if skip is None:
                    raise DataError(f"{path}: duplicate annotation id {ann['id']!r} (image ids {seen[key][0]} and "
                                    f"{image_id}); set data.bad_annotations: skip to drop copies")
                if seen[key] == content:
                    skip["duplicate annotations (same id and box)"] += 1
                    continue
                skip["annotation ids used twice (kept: different boxes)"] += 1
            else:
                seen[key] = content
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
    bad_annotations: str = "error",
) -> DetectionDataset:
    """A :class:`DetectionDataset` over a COCO instances file and its image folder.

    ``dataset.file_category_ids[label - 1]`` gives back the category id of the file (to write results
    in the original ids). What ``bad_annotations="skip"`` left out is part of the data set's summary line.
    """
    skipped: Counter[str] = Counter()
    records, categories, file_ids = parse_coco(ann_file, image_dir, bad_annotations, skipped)
    notes = []
    if skipped:
        detail = ", ".join(f"{n} {what}" for what, n in sorted(skipped.items()))
        notes.append(f"bad annotations (skip): {detail}")
    dataset = DetectionDataset(
        records, categories, transforms, bad_boxes=bad_boxes, bad_images=bad_images, train=train, name=name,
        notes=notes,
    )
    dataset.file_category_ids = file_ids
    return dataset
