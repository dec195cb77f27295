"""Pascal VOC: the VOCdevkit tree, and loose images + VOC XML files as labelling tools write them.

VOCdevkit (``format: voc``): ``data.root`` is the ``VOCdevkit`` folder; a set ``VOC2007/trainval`` reads
the ids in ``VOC2007/ImageSets/Main/trainval.txt``, the boxes in ``VOC2007/Annotations/<id>.xml`` and the
image ``VOC2007/JPEGImages/<id>.jpg``. Several sets are concatenated (07+12 trainval).

Loose folder (``format: voc_folder``): every ``*.xml`` file of the annotation folder is one image; its
image is the file of the image folder with the same stem (``.jpg .jpeg .png .bmp .webp``, any case), or
else the XML's ``<filename>``. Images without an XML file are not used (counted in the summary line).

Class names are the 20 VOC classes unless ``data.class_names`` is given; label = index + 1. An object
whose name is not in the list is an error naming the file. ``difficult`` objects become ignore
regions. VOC pixel coordinates are 1-based: ``(xmin, ymin, xmax, ymax)`` becomes
``(xmin - 1, ymin - 1, xmax, ymax)`` in the 0-based, pixel-edge frame used everywhere else.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from detkd.data.common import DataError, DataFileNotFoundError, DetectionDataset, ImageRecord

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text is not None else None


def _int_or_zero(text: str | None) -> int:
    try:
        return int(float(text)) if text else 0
    except ValueError:
        return 0


def parse_voc_xml(path: Path, label_of: dict[str, int]) -> tuple[str | None, ImageRecord]:
    """Read one VOC XML file into ``(filename element, record)``; the record's file and id are left unset.

    A missing size (or 0, as some tools write) is read from the image header later.
    """
    if not path.is_file():
        raise DataFileNotFoundError(f"annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: not valid XML: {e}") from e
    if root.tag != "annotation":
        raise DataError(f"{path}: expected an <annotation> root element, got <{root.tag}>")
    size = root.find("size")
    rec = ImageRecord(
        image_id=0,
        file=Path(),
        width=_int_or_zero(_text(size, "width")),
        height=_int_or_zero(_text(size, "height")),
        source=str(path),
    )
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        ref = f"object {k} ({name})"
        if name not in label_of:
            raise DataError(
                f"{path}: object {k} has class name {name!r}, which is not in the class list "
                f"({', '.join(label_of)}); set data.class_names to the classes of this data set"
            )
        bndbox = obj.find("bndbox")
        coords = [_text(bndbox, tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
        try:
            x1, y1, x2, y2 = (float(v) for v in coords)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DataError(f"{path}: {ref} needs numeric bndbox xmin/ymin/xmax/ymax, got {coords}") from None
        rec.boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
        rec.labels.append(label_of[name])
        rec.ignore.append(_int_or_zero(_text(obj, "difficult")) == 1)
        rec.areas.append(0.0)
        rec.refs.append(ref)
    return _text(root, "filename"), rec


def _label_map(class_names: list[str] | None) -> tuple[dict[str, int], list[dict]]:
    names = list(class_names) if class_names else list(VOC_CLASSES)
    if len(set(names)) != len(names):
        raise DataError(f"data.class_names has duplicates: {names}")
    return {n: k + 1 for k, n in enumerate(names)}, [{"id": k + 1, "name": n} for k, n in enumerate(names)]


def voc_dataset(
    root: str | Path,
    sets: list[str],
    class_names: list[str] | None = None,
    transforms: Callable | None = None,
    bad_boxes: str = "repair",
    bad_images: str = "error",
    train: bool = False,
    name: str = "voc",
) -> DetectionDataset:
    """The union of VOCdevkit image sets like ``["VOC2007/trainval", "VOC2012/trainval"]`` under ``root``."""
    root = Path(root)
    label_of, categories = _label_map(class_names)
    records = []
    for entry in sets:
        year, _, set_name = entry.partition("/")
        if not year or not set_name or "/" in set_name:
            raise DataError(f"VOC set {entry!r} is not of the form 'VOC2007/trainval'")
        list_file = root / year / "ImageSets" / "Main" / f"{set_name}.txt"
        if not list_file.is_file():
            raise DataFileNotFoundError(f"VOC image set list not found: {list_file} (set {entry!r})")
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{list_file}: image id {dup} is listed twice")
        for image_name in ids:
            _, rec = parse_voc_xml(root / year / "Annotations" / f"{image_name}.xml", label_of)
            rec.file = root / year / "JPEGImages" / f"{image_name}.jpg"
            rec.image_id = len(records) + 1
            records.append(rec)
    return DetectionDataset(
        records, categories, transforms, bad_boxes=bad_boxes, bad_images=bad_images, train=train, name=name
    )


def resolve_xml_dir(root: str | Path, ann: str, images: str) -> Path:
    """Folder holding the XML files of a ``voc_folder`` split.

    ``ann`` (``data.train_ann`` / ``data.val_ann``) names it relative to ``root``; a ``.json`` value (the
    COCO-style default) or an empty one means "next to the images".
    """
    root = Path(root)
    if not ann or ann.endswith(".json"):
        return root / images
    xml_dir = root / ann
    if not xml_dir.is_dir():
        raise DataFileNotFoundError(f"annotation folder not found: {xml_dir}")
    return xml_dir


def voc_folder_dataset(
    image_dir: str | Path,
    xml_dir: str | Path,
    class_names: list[str] | None = None,
    transforms: Callable | None = None,
    bad_boxes: str = "repair",
    bad_images: str = "error",
    train: bool = False,
    name: str = "voc_folder",
) -> DetectionDataset:
    """Images in ``image_dir`` with one VOC XML file per image in ``xml_dir`` (may be the same folder)."""
    image_dir, xml_dir = Path(image_dir), Path(xml_dir)
    if not image_dir.is_dir():
        raise DataFileNotFoundError(f"image folder not found: {image_dir}")
    if not xml_dir.is_dir():
        raise DataFileNotFoundError(f"annotation folder not found: {xml_dir}")
    xml_files = sorted(xml_dir.glob("*.xml"))
    if not xml_files:
        raise DataError(f"{xml_dir}: no .xml annotation files found")
    by_stem = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    label_of, categories = _label_map(class_names)
    records = []
    for xml_file in xml_files:
        filename, rec = parse_voc_xml(xml_file, label_of)
        if xml_file.stem in by_stem:
            rec.file = by_stem[xml_file.stem]
        else:  # missing: the existence check reports (or skips) it under the name the XML gives
            rec.file = image_dir / (filename or f"{xml_file.stem}.jpg")
        rec.image_id = len(records) + 1
        records.append(rec)
    used = {rec.file.resolve() for rec in records}
    unused = sum(1 for p in by_stem.values() if p.resolve() not in used)
    notes = [f"not used: {unused} image file(s) without an XML file"] if unused else []
    return DetectionDataset(records, categories, transforms, bad_boxes, bad_images, train=train, name=name, notes=notes)
