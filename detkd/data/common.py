"""What every detection data set shares: the dataset class, input checks, image decoding.

A format loader (:mod:`detkd.data.coco`, :mod:`detkd.data.voc`) only parses its annotation files into
:class:`ImageRecord` entries in ORIGINAL pixel coordinates. :class:`DetectionDataset` then applies one
policy to all formats, at construction, so bad input surfaces before training starts:

- image files: every referenced file must exist and not be empty (``bad_images="error"`` raises,
  ``"skip"`` drops it); under ``"skip"`` every header is also read, so files that are no image at all are
  dropped and counted here; files that fail to decode further in are found lazily, when loaded (see
  :meth:`DetectionDataset.__getitem__`);
- boxes: non-finite, non-positive width/height or reaching outside the image by more than
  :data:`BOX_TOLERANCE` px are handled by ``bad_boxes``: ``repair`` clips to the image and drops what is
  still degenerate, ``drop`` drops every bad box, ``error`` raises naming the file and the entry.

The counts are reported once per data set in one summary line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from detkd.errors import DataError, DataFileNotFoundError  # noqa: F401 - re-exported
from detkd.runtime.console import info

# Boxes that reach at most this far (px) outside the image are clipped silently: annotation tools and
# COCO itself round coordinates, so a box ending at x = width + 0.3 is not an error.
BOX_TOLERANCE = 1.0


@dataclass
class ImageRecord:
    """One image as parsed from the annotation files, before any check. Boxes are XYXY, original pixels."""

    image_id: int
    file: Path
    width: int  # 0 = unknown: read from the file header at construction
    height: int
    source: str  # the annotation file this entry comes from, for error messages
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ignore: list[bool] = field(default_factory=list)
    areas: list[float] = field(default_factory=list)  # area for COCO evaluation; 0 = use the box area
    refs: list[str] = field(default_factory=list)  # how an error names each box ("annotation id 12")


def decode_rgb(path: str | Path) -> Tensor:
    """Decode an image file to uint8 (3, H, W) RGB; grayscale, palette, CMYK and RGBA files are converted.

    PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29. Raises
    ``OSError`` (or ``ValueError``) when the file cannot be decoded.
    """
    with Image.open(path) as im:
        array = np.array(im.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header only (cheap)."""
    with Image.open(path) as im:
        width, height = im.size
    return height, width


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


class DetectionDataset(torch.utils.data.Dataset):
    """Images + boxes in the detkd item format (docs/architecture.md, "Data set items").

    ``dataset[i] -> (image, target)``: ``image`` a uint8 ``tv_tensors.Image`` (3, H, W) after
    ``transforms``; ``target`` with ``boxes`` (XYXY float32 ``BoundingBoxes``), ``labels`` int64 in 1..C,
    ``ignore`` bool, ``image_id`` int64 scalar and ``orig_size`` int64 (h, w) of the file.

    Args:
        records: parsed images (see :class:`ImageRecord`); labels already in 1..len(categories).
        categories: ``[{"id": 1, "name": ...}, ...]`` with contiguous ids.
        transforms: a torchvision.transforms.v2 callable on ``(image, target)``, or None.
        bad_boxes: ``repair`` | ``drop`` | ``error`` (see the module docstring).
        bad_images: ``error`` | ``skip``.
        train: training data set; decides what a corrupt file found while loading becomes under
            ``skip`` (see :meth:`__getitem__`).
        name: shown in the summary line and in messages.
        notes: extra facts for the summary line (e.g. images without annotation file).
    """

    def __init__(
        self,
        records: list[ImageRecord],
        categories: list[dict[str, Any]],
        transforms: Callable | None = None,
        bad_boxes: str = "repair",
        bad_images: str = "error",
        train: bool = False,
        name: str = "data",
        notes: list[str] | None = None,
    ) -> None:
        if bad_boxes not in ("repair", "drop", "error"):
            raise ValueError(f"bad_boxes must be repair, drop or error, got {bad_boxes!r}")
        if bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images must be error or skip, got {bad_images!r}")
        self.categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]
        self.file_category_ids = [c["id"] for c in self.categories]  # loaders with other ids override it
        self.transforms = transforms
        self.bad_images = bad_images
        self.train = train
        self.name = name
        self._warned: set[str] = set()

        image_counts: Counter[str] = Counter()
        kept = [rec for rec in records if self._check_image(rec, image_counts)]
        if not kept:
            raise DataError(f"{name}: no images left (of {len(records)}) after checking the input files")
        self._pack(kept)
        box_counts = self._apply_box_policy(kept, bad_boxes)
        self.summary = self._summary_line(len(records), box_counts, image_counts, bad_boxes, notes or [])
        info(self.summary)

    # ------------------------------------------------------------------------------------------------------
    # Construction-time checks

    def _check_image(self, rec: ImageRecord, counts: Counter[str]) -> bool:
        """True when the file exists and is not empty, and its header reads when the size is not annotated
        or when ``bad_images="skip"`` (so that files that are no image at all are counted here, in the
        summary line, rather than met one by one while training)."""
        where = f"{rec.source}: image {rec.file.name} (id {rec.image_id})"
        if not rec.file.is_file():
            if self.bad_images == "skip":
                counts["missing"] += 1
                return False
            raise DataFileNotFoundError(f"{where}: image file not found: {rec.file}")
        if rec.file.stat().st_size == 0:
            if self.bad_images == "skip":
                counts["empty file"] += 1
                return False
            raise DataError(f"{where}: image file is empty (0 bytes): {rec.file}")
        if self.bad_images == "skip" and rec.width > 0 and rec.height > 0:
            try:
                read_image_size(rec.file)
            except (OSError, ValueError, SyntaxError):
                counts["unreadable"] += 1
                return False
        if rec.width <= 0 or rec.height <= 0:
            try:
                rec.height, rec.width = read_image_size(rec.file)
            except (OSError, ValueError, SyntaxError) as e:
                if self.bad_images == "skip":
                    counts["unreadable"] += 1
                    return False
                raise DataError(f"{where}: cannot read image {rec.file}: {e}") from e
        return True

    def _pack(self, records: list[ImageRecord]) -> None:
        """Flat arrays instead of one Python object per box: cheap to share with loader workers."""
        self.files = [str(r.file) for r in records]
        self.image_ids = np.array([r.image_id for r in records], dtype=np.int64)
        self._sizes = np.array([[r.height, r.width] for r in records], dtype=np.int64).reshape(-1, 2)
        counts = np.array([len(r.boxes) for r in records], dtype=np.int64)
        self._start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self._start[-1])
        flat = chain.from_iterable
        self._boxes = np.fromiter(flat(flat(r.boxes for r in records)), np.float64, 4 * total).reshape(-1, 4)
        self._labels = np.fromiter(flat(r.labels for r in records), np.int64, total)
        self._ignore = np.fromiter(flat(r.ignore for r in records), bool, total)
        self._areas = np.fromiter(flat(r.areas for r in records), np.float64, total)
        num_classes = len(self.categories)
        if total and (self._labels.min() < 1 or self._labels.max() > num_classes):
            raise DataError(f"{self.name}: labels must lie in 1..{num_classes}")

    def _apply_box_policy(self, records: list[ImageRecord], policy: str) -> Counter[str]:
        """Find bad boxes (vectorised: COCO has ~860k) and repair, drop or report them; count what was done.

        Boxes within :data:`BOX_TOLERANCE` of the border are clipped silently.
        """
        image_of_box = np.repeat(np.arange(len(self.files)), np.diff(self._start))
        h = self._sizes[image_of_box, 0].astype(np.float64)
        w = self._sizes[image_of_box, 1].astype(np.float64)
        x1, y1, x2, y2 = self._boxes.T
        t = BOX_TOLERANCE
        nonfinite = ~np.isfinite(self._boxes).all(axis=1)
        nonpositive = ~nonfinite & ((x2 <= x1) | (y2 <= y1))
        outside = ~nonfinite & ~nonpositive & ((x1 < -t) | (y1 < -t) | (x2 > w + t) | (y2 > h + t))
        bad = nonfinite | nonpositive | outside

        if policy == "error" and bad.any():
            k = int(np.flatnonzero(bad)[0])
            i = int(image_of_box[k])
            rec, j = records[i], k - int(self._start[i])
            if nonfinite[k]:
                problem = "has non-finite coordinates"
            elif nonpositive[k]:
                problem = "has non-positive width or height"
            else:
                problem = "reaches outside the image"
            raise DataError(
                f"{rec.source}: image {rec.file.name} (id {rec.image_id}), {rec.refs[j]}: box "
                f"{[round(float(v), 2) for v in rec.boxes[j]]} (x1, y1, x2, y2) {problem} "
                f"(image is {rec.width}x{rec.height}); set data.bad_boxes to repair or drop to handle it"
            )

        clipped = np.stack([np.clip(x1, 0, w), np.clip(y1, 0, h), np.clip(x2, 0, w), np.clip(y2, 0, h)], axis=1)
        empty_after_clip = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
        counts: Counter[str] = Counter()
        if policy == "repair":
            keep = ~nonfinite & ~nonpositive & ~(outside & empty_after_clip)
            counts["clipped"] = int((outside & ~empty_after_clip).sum())
            counts["dropped (outside the image)"] = int((outside & empty_after_clip).sum())
        else:
            keep = ~bad
            counts["dropped (outside the image)"] = int(outside.sum())
        counts["dropped (non-finite coordinates)"] = int(nonfinite.sum())
        counts["dropped (non-positive width or height)"] = int(nonpositive.sum())

        self._boxes = clipped[keep]
        self._labels = self._labels[keep]
        self._ignore = self._ignore[keep]
        self._areas = self._areas[keep]
        per_image = np.bincount(image_of_box[keep], minlength=len(self.files))
        self._start = np.concatenate([[0], np.cumsum(per_image)]).astype(np.int64)
        return +counts  # drops the zero counts

    def _summary_line(
        self, n_records: int, boxes: Counter[str], images: Counter[str], box_policy: str, notes: list[str]
    ) -> str:
        parts = [
            f"{self.name}: {_count(len(self), 'image', 'images')}, {_count(len(self._labels), 'box', 'boxes')}"
            f" ({int(self._ignore.sum())} ignore), {_count(len(self.categories), 'class', 'classes')}"
        ]
        if boxes:
            parts.append(f"bad boxes ({box_policy}): " + ", ".join(f"{n} {what}" for what, n in sorted(boxes.items())))
        if images:
            skipped = sum(images.values())
            detail = ", ".join(f"{n} {what}" for what, n in sorted(images.items()))
            parts.append(f"bad images (skip): {skipped} of {n_records} skipped ({detail})")
        parts.extend(notes)
        return "; ".join(parts)

    # ------------------------------------------------------------------------------------------------------
    # Items

    def __len__(self) -> int:
        return len(self.files)

    def _raw_target(self, i: int) -> dict[str, Tensor]:
        s, e = self._start[i], self._start[i + 1]
        h, w = (int(v) for v in self._sizes[i])
        boxes = torch.from_numpy(self._boxes[s:e]).to(torch.float32).reshape(-1, 4)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(self._labels[s:e].copy()),
            "ignore": torch.from_numpy(self._ignore[s:e].copy()),
            "image_id": torch.tensor(int(self.image_ids[i]), dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }

    def _decode(self, i: int) -> Tensor:
        """Decode file ``i``; a decode failure or a size that differs from the annotation is a DataError."""
        path = self.files[i]
        where = f"{self.name}: image {path} (id {int(self.image_ids[i])})"
        try:
            image = decode_rgb(path)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
            raise DataError(f"{where}: cannot decode image: {e}") from e
        h, w = (int(v) for v in self._sizes[i])
        if tuple(image.shape[1:]) != (h, w):
            raise DataError(
                f"{where}: file is {image.shape[2]}x{image.shape[1]} but the annotation says {w}x{h} (w x h)"
            )
        return image

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict[str, Tensor]]:
        """Load item ``i``.

        A file that cannot be decoded raises :class:`DataError` naming it under ``bad_images="error"``.
        Under ``"skip"`` it is reported once and, in a training set, replaced by the next decodable item;
        in an evaluation set the image keeps its id and ground truth but reads as black, so every image
        id appears exactly once in the evaluation (its objects count as missed).
        """
        j = i
        for _ in range(len(self)):
            try:
                image = self._decode(j)
                break
            except DataError as e:
                if self.bad_images == "error":
                    raise
                if self.files[j] not in self._warned:
                    self._warned.add(self.files[j])
                    info(f"warning: {e} (data.bad_images=skip: {'replaced' if self.train else 'read as black'})")
                if not self.train:
                    h, w = (int(v) for v in self._sizes[j])
                    image = torch.zeros(3, h, w, dtype=torch.uint8)
                    break
                j = (j + 1) % len(self)
        else:
            raise DataError(f"{self.name}: no image of the data set could be decoded")
        image = tv_tensors.Image(image)
        target = self._raw_target(j)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    # ------------------------------------------------------------------------------------------------------
    # Ground truth for evaluation

    def coco_gt(self) -> dict[str, Any]:
        """Ground truth as a COCO json dict in original image coordinates, contiguous category ids.

        Ignore regions (VOC ``difficult``, COCO ``iscrowd``) have ``iscrowd: 1``. ``area`` is the annotated
        area where the source has one (COCO segment area), otherwise the box area.
        """
        images = []
        annotations = []
        for i in range(len(self)):
            h, w = (int(v) for v in self._sizes[i])
            image_id = int(self.image_ids[i])
            images.append({"id": image_id, "file_name": self.files[i], "width": w, "height": h})
            for k in range(self._start[i], self._start[i + 1]):
                x1, y1, x2, y2 = (float(v) for v in self._boxes[k])
                area = float(self._areas[k]) if self._areas[k] > 0 else (x2 - x1) * (y2 - y1)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(self._labels[k]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": area,
                        "iscrowd": int(self._ignore[k]),
                    }
                )
        return {
            "info": {"description": self.name},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [dict(c) for c in self.categories],
        }

    def __repr__(self) -> str:
        return f"DetectionDataset({self.summary})"
