"""``detkd analyze detections``: Fig. 3 of "Distilling Object Detectors with Global Knowledge" (ECCV 2022).

**Fig. 3: detections side by side** (``detkd analyze detections``): the same validation images, one row
per image, one column per model (ground truth optional in the first column, the teacher of the distill
config next unless left out, then every ``LABEL=CHECKPOINT`` in the given order). Detections with score >=
``score`` are drawn in original image coordinates with class name and score; as in the paper's figure,
a detection that matches no ground-truth box (same class, IoU >= 0.5, each box matched once, highest
scores first) is red, a matching one green; ground truth is blue. A JSON file next to the PNG lists the
drawn detections.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torchvision.ops import box_iou

from detkd.config import Config, ConfigError
from detkd.data import build_dataset, build_loader
from detkd.engine.assemble import load_student, load_teacher, resolve_device
from detkd.engine.evaluate import detect
from detkd.runtime.checkpoint import CheckpointError
from detkd.runtime.console import info
from detkd.runtime.files import atomic_write_text
from detkd.viz.draw import FP_COLOR, GT_COLOR, TP_COLOR, draw_detections, label_font

CELL = 256  # px of a grid cell (the image's longer side is scaled to it)
GAP = 6  # px between cells
HEADER_H = 24  # px of the column-label band
GRID_BACKGROUND = (255, 255, 255)
CELL_BACKGROUND = (235, 235, 235)
IOU_MATCH = 0.5


def grid_size(rows: int, cols: int, cell: int = CELL) -> tuple[int, int]:
    """(width, height) in pixels of a detections grid of ``rows`` images and ``cols`` columns."""
    return GAP + cols * (cell + GAP), HEADER_H + rows * (cell + GAP) + GAP


def parse_model_specs(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["LABEL=CHECKPOINT", ...]`` -> [(label, path), ...]; a clear ConfigError for a malformed item or a
    repeated label (the path is split at the first ``=``), a CheckpointError for a missing file."""
    out: list[tuple[str, str]] = []
    for item in items:
        label, sep, path = item.partition("=")
        label, path = label.strip(), path.strip()
        if not sep or not label or not path:
            raise ConfigError(f"--model {item!r}: expected LABEL=CHECKPOINT, e.g. --model global=runs/x/best.pt")
        if label in {lab for lab, _ in out}:
            raise ConfigError(f"--model {item!r}: the label {label!r} is used twice")
        if not Path(path).is_file():
            raise CheckpointError(f"--model {label}: checkpoint not found: {path}")
        out.append((label, path))
    return out


def load_model(cfg: Config, checkpoint: str, label: str) -> nn.Module:
    """The detector of ``checkpoint`` in eval mode: the student model of ``cfg`` (``model``), or, when the
    weights do not fit it, the teacher model (``distill.teacher``)."""
    try:
        return load_student(cfg, checkpoint).eval()
    except CheckpointError as student_error:
        if cfg.distill is None:
            raise CheckpointError(f"--model {label}: {student_error}") from None
        as_teacher = copy.copy(cfg)
        as_teacher.model = cfg.distill.teacher
        try:
            return load_student(as_teacher, checkpoint).eval()
        except CheckpointError:
            raise CheckpointError(f"--model {label}: fits neither the student model nor the teacher model of "
                                  f"the config; as the student: {student_error}") from None


def match_detections(boxes: Tensor, labels: Tensor, scores: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                     iou: float = IOU_MATCH) -> Tensor:
    """(M,) bool: detection j matches a ground-truth box of its class with IoU >= ``iou`` not matched by a
    higher-scoring detection (greedy, highest score first, as in COCO / VOC evaluation)."""
    hit = torch.zeros(boxes.shape[0], dtype=torch.bool)
    if boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return hit
    ious = box_iou(boxes.float(), gt_boxes.float())
    ious[labels[:, None] != gt_labels[None, :]] = -1.0
    taken = torch.zeros(gt_boxes.shape[0], dtype=torch.bool)
    for j in torch.argsort(scores, descending=True, stable=True).tolist():
        row = ious[j].masked_fill(taken, -1.0)
        best = int(row.argmax())
        if float(row[best]) >= iou:
            taken[best] = True
            hit[j] = True
    return hit


def fit_to_cell(image: Image.Image, cell: int = CELL) -> tuple[Image.Image, float]:
    """``image`` scaled so that its longer side is ``cell`` px (nearest neighbour when enlarging: the
    pixels of small images stay visible), and the scale factor."""
    scale = cell / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale >= 1 else Image.BILINEAR), scale


def detections_grid(
    cells: Sequence[Sequence[Image.Image]], column_labels: Sequence[str], cell: int = CELL,
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Paste ``cells[row][col]`` (each at most ``cell`` px on a side, centred) under a band of column labels;
    size :func:`grid_size`."""
    rows, cols = len(cells), len(column_labels)
    canvas = Image.new("RGB", grid_size(rows, cols, cell), GRID_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = label_font(13)
    for c, name in enumerate(column_labels):
        draw.text((GAP + c * (cell + GAP) + 2, 5), _fit_text(draw, name, font, cell - 4), fill=(0, 0, 0), font=font)
    for r, row in enumerate(cells):
        if len(row) != cols:
            raise ValueError(f"detections_grid: row {r} has {len(row)} cells for {cols} columns")
        top = HEADER_H + r * (cell + GAP)
        for c, im in enumerate(row):
            left = GAP + c * (cell + GAP)
            draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=CELL_BACKGROUND)
            canvas.paste(im, (left + (cell - im.width) // 2, top + (cell - im.height) // 2))
        if row_labels is not None:
            small = label_font(10)
            text = _fit_text(draw, row_labels[r], small, cell - 4)
            left, t, right, bottom = draw.textbbox((0, 0), text, font=small)
            x, y = GAP + 1, top + cell - (bottom - t) - 4
            draw.rectangle((x, y, x + right - left + 3, top + cell - 1), fill=GRID_BACKGROUND)
            draw.text((x + 2 - left, y + 2 - t), text, fill=(0, 0, 0), font=small)
    return canvas


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, cut and ended with ".." when wider than ``width`` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def _ground_truth(coco_gt: dict[str, Any]) -> dict[int, tuple[Tensor, Tensor]]:
    """image id -> (xyxy boxes, labels) of the non-ignore ground truth, original image coordinates."""
    boxes: dict[int, list[list[float]]] = {}
    labels: dict[int, list[int]] = {}
    for a in coco_gt["annotations"]:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        boxes.setdefault(int(a["image_id"]), []).append([x, y, x + w, y + h])
        labels.setdefault(int(a["image_id"]), []).append(int(a["category_id"]))
    return {img: (torch.tensor(b).reshape(-1, 4), torch.tensor(labels[img], dtype=torch.int64))
            for img, b in boxes.items()}


def _kept_detections(dets: list[dict], image_ids: list[int], truth: dict[int, tuple[Tensor, Tensor]],
                     score: float) -> dict[int, dict[str, Tensor]]:
    """Per image, the detections of one model with at least ``score``, best first, xyxy in original image
    coordinates, and which of them match a ground-truth box (:func:`match_detections`)."""
    empty = (torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64))
    found: dict[int, dict[str, Tensor]] = {}
    for img in image_ids:
        mine = sorted((d for d in dets if int(d["image_id"]) == img and d["score"] >= score),
                      key=lambda d: -d["score"])
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]).reshape(-1, 4)
        labels = torch.tensor([int(d["category_id"]) for d in mine], dtype=torch.int64)
        scores = torch.tensor([float(d["score"]) for d in mine])
        g_boxes, g_labels = truth.get(img, empty)
        found[img] = {"boxes": boxes, "labels": labels, "scores": scores,
                      "correct": match_detections(boxes, labels, scores, g_boxes, g_labels)}
    return found


def _draw_row(file: str, img: int, per_column: list[dict[int, dict[str, Tensor]]], class_names: dict[int, str],
              cell: int) -> list[Image.Image]:
    """One row of the grid: image ``img`` drawn with each column's boxes (ground truth, or detections coloured
    by whether they match)."""
    with Image.open(file) as im:
        base, scale = fit_to_cell(im.convert("RGB"), cell)
    row = []
    for dets_of in per_column:
        d = dets_of[img]
        if "scores" not in d:  # ground truth
            colors = [GT_COLOR] * d["boxes"].shape[0]
            row.append(draw_detections(base, d["boxes"], d["labels"], None, class_names=class_names,
                                       colors=colors, scale=scale))
        else:
            colors = [TP_COLOR if ok else FP_COLOR for ok in d["correct"].tolist()]
            row.append(draw_detections(base, d["boxes"], d["labels"], d["scores"], class_names=class_names,
                                       colors=colors, scale=scale))
    return row


def _listing(columns: list[tuple[str, nn.Module | None]], per_column: list[dict[int, dict[str, Tensor]]],
             files: dict[int, str], image_ids: list[int], class_names: dict[int, str], score: float,
             checkpoints: dict[str, str]) -> dict[str, Any]:
    """The ``.json`` next to the grid: what each column drew on each image."""
    listing: dict[str, Any] = {
        "score_threshold": score, "iou_match": IOU_MATCH, "columns": [label for label, _ in columns],
        "checkpoints": checkpoints,
        "images": [{"image_id": img, "file": files[img]} for img in image_ids],
        "detections": {},
    }
    for (label, _), dets_of in zip(columns, per_column):
        listing["detections"][label] = {
            str(img): [
                {"box_xyxy": [round(v, 2) for v in b], "label": int(lab), "name": class_names.get(int(lab), ""),
                 **({"score": round(float(d["scores"][j]), 4), "correct": bool(d["correct"][j])}
                    if "scores" in d else {})}
                for j, (b, lab) in enumerate(zip(d["boxes"].tolist(), d["labels"].tolist()))
            ]
            for img, d in dets_of.items()
        }
    return listing


def compare_detections(
    cfg: Config,
    models: Sequence[tuple[str, str]],
    out: str | Path,
    *,
    images: int = 4,
    score: float = 0.3,
    ground_truth: bool = False,
    teacher: bool = True,
    cell: int = CELL,
) -> Path:
    """``detkd analyze detections``: Fig. 3. The first ``images`` validation images of ``cfg``'s data, one row
    each; columns: ground truth (when ``ground_truth``), the teacher of ``cfg.distill`` (when ``teacher`` and
    the config has a distill section), then ``models`` [(label, checkpoint), ...] in order (each loaded as
    the student model, or as the teacher model when it does not fit: :func:`load_model`). Writes the PNG
    ``out`` and ``out`` with suffix ``.json`` (the drawn detections, xyxy in original image coordinates).
    Returns ``out``."""
    if images < 1:
        raise ConfigError(f"--images: must be >= 1, got {images}")
    if not 0.0 <= score <= 1.0:
        raise ConfigError(f"--score: must be in [0, 1], got {score}")
    if cell < 32:
        raise ConfigError(f"--cell: must be >= 32 px, got {cell}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: expected a .png file name")
    columns: list[tuple[str, nn.Module | None]] = []
    if ground_truth:
        columns.append(("ground truth", None))
    if teacher and cfg.distill is not None:
        columns.append(("teacher", load_teacher(cfg)))
    for label, path in models:
        columns.append((label, load_model(cfg, path, label)))
    if not any(m is not None for _, m in columns):
        raise ConfigError("analyze detections: no model to show (give --model LABEL=CHECKPOINT, or a distill "
                          "config without --no-teacher)")

    device = resolve_device(cfg.train.device)
    val = build_dataset(cfg.data, "val", cfg.model)
    if len(val) == 0:
        raise ConfigError(f"data: the validation split under {cfg.data.root} has no images")
    chosen = list(range(min(images, len(val))))
    gt = val.coco_gt()
    files = {int(im["id"]): str(im["file_name"]) for im in gt["images"]}
    image_ids = [int(gt["images"][i]["id"]) for i in chosen]
    truth = _ground_truth(gt)
    empty = (torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64))
    class_names = {int(c["id"]): str(c["name"]) for c in val.categories}

    per_column: list[dict[int, dict[str, Tensor]]] = []
    for label, model in columns:
        if model is None:
            per_column.append({img: {"boxes": truth.get(img, empty)[0], "labels": truth.get(img, empty)[1]}
                               for img in image_ids})
            continue
        info(f"detections: {label} on {len(chosen)} validation images")
        loader = build_loader(val, cfg.data.batch_size, 0, shuffle=False, sampler=chosen)
        dets = detect(model.to(device), loader, device, progress=False)
        model.cpu()
        per_column.append(_kept_detections(dets, image_ids, truth, score))

    cells = [_draw_row(files[img], img, per_column, class_names, cell) for img in image_ids]
    grid = detections_grid(cells, [label for label, _ in columns], cell, [f"image {img}" for img in image_ids])
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)

    checkpoints = {"teacher": cfg.distill.teacher_checkpoint} if teacher and cfg.distill is not None else {}
    listing = _listing(columns, per_column, files, image_ids, class_names, score, {**checkpoints, **dict(models)})
    atomic_write_text(out.with_suffix(".json"), json.dumps(listing, indent=2))
    info(f"detections: {len(image_ids)} images x {len(columns)} columns -> {out}")
    return out
