"""``detkd prototypes``: select the prototypes of a trained teacher / student pair and save them to look at.

The selection is the training one: the prototype bank of the run's first prototype method (``global``,
``defeat_proto``, ``kd_proto``, ``rkd_proto``; ``global`` with default options when the run has none)
is refreshed exactly as before an epoch (:meth:`detkd.distill.global_kd.pool.PrototypeBank.refresh` on the
non-augmented training loader), with the teacher of ``distill.teacher_checkpoint`` and the student of
``--checkpoint``. Written to ``OUT``:

- ``prototypes.pt``: per level, per class the bank indices, image ids, box indices, boxes (original image
  coordinates, xyxy), and the teacher and student prototype vectors; plain tensors and containers, so it
  loads with ``torch.load(..., weights_only=True)``;
- ``prototypes.json``: the same without the vectors (file names instead), PGM costs (Eq. 4 objective
  after each pick) when the generator is ``pgm``, and the time taken;
- ``gallery_level{L}.png`` per pyramid level: one row per class, the crops of its chosen instances from
  the original images, upscaled, in pick order.

A bank instance is keyed by (image id, box index), the box index counting the image's boxes after the
ignore (crowd / difficult) boxes are dropped, as the training loader does; :func:`instance_table` maps
these keys back to files and original boxes through the data set's ``coco_gt()``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from detkd.config import Config, ConfigError, to_dict
from detkd.distill import build_distiller
from detkd.distill.base import DistillContext
from detkd.engine.assemble import feature_loader, load_student, load_teacher, prototype_method, resolve_device
from detkd.models import paired_channels, pyramid_levels
from detkd.runtime import dist
from detkd.runtime.console import info
from detkd.runtime.files import atomic_write_text
from detkd.viz.draw import label_font

CELL = 96  # px of one gallery crop (its longer side)
GAP = 4  # px between cells
LABEL_W = 84  # px of the class-label column
HEADER_H = 20  # px of the title line
CONTEXT = 0.15  # crop margin around a box, as a fraction of its size
BACKGROUND = (255, 255, 255)


# ----------------------------------------------------------------------------------------------------------
# Models and the bank


# ----------------------------------------------------------------------------------------------------------
# Instance keys -> files and original boxes


def instance_table(coco_gt: dict[str, Any]) -> tuple[dict[int, str], dict[tuple[int, int], tuple[list[float], int]]]:
    """From a data set's ``coco_gt()``: image id -> file, and (image id, box index) -> (original xyxy box,
    label), the box index counting the image's non-ignore boxes in annotation order (the bank's keys)."""
    files = {int(im["id"]): str(im["file_name"]) for im in coco_gt["images"]}
    boxes: dict[tuple[int, int], tuple[list[float], int]] = {}
    count: dict[int, int] = {}
    for a in coco_gt["annotations"]:
        if a.get("iscrowd", 0):
            continue  # ignore boxes are dropped before the bank sees the targets
        img = int(a["image_id"])
        j = count.get(img, 0)
        count[img] = j + 1
        x, y, w, h = (float(v) for v in a["bbox"])
        boxes[(img, j)] = ([x, y, x + w, y + h], int(a["category_id"]))
    return files, boxes


# ----------------------------------------------------------------------------------------------------------
# Gallery


def crop_instance(path: str, box: list[float], cell: int = CELL) -> Image.Image:
    """The box (plus :data:`CONTEXT` margin) cut from the original image, upscaled so its longer side is
    ``cell`` px (nearest neighbour: the pixels stay visible)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        x0, y0, x1, y1 = box
        mx, my = CONTEXT * (x1 - x0), CONTEXT * (y1 - y0)
        left, top = max(0, int(x0 - mx)), max(0, int(y0 - my))
        right, bottom = min(im.width, int(round(x1 + mx)) + 1), min(im.height, int(round(y1 + my)) + 1)
        crop = im.crop((left, top, max(right, left + 1), max(bottom, top + 1)))
    scale = cell / max(crop.width, crop.height)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    return crop.resize(size, Image.NEAREST)


def gallery_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) of a gallery of ``rows`` classes and ``cols`` prototypes."""
    return LABEL_W + cols * (CELL + GAP) + GAP, HEADER_H + rows * (CELL + GAP) + GAP


def draw_gallery(rows: list[tuple[str, list[tuple[str, list[float]]]]], title: str, path: Path) -> None:
    """Write a PNG: one row per (label, [(file, box), ...]), crops left to right in the given order (PGM may
    pick an instance twice: it then appears twice)."""
    cols = max((len(items) for _, items in rows), default=0)
    width, height = gallery_size(len(rows), max(cols, 1))
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 3), title, fill=(0, 0, 0), font=label_font(12))
    for r, (label, items) in enumerate(rows):
        top = HEADER_H + r * (CELL + GAP)
        draw.multiline_text((GAP, top + CELL // 2 - 14), label, fill=(0, 0, 0), font=label_font(12))
        for c, (file, box) in enumerate(items):
            crop = crop_instance(file, box)
            left = LABEL_W + c * (CELL + GAP)
            canvas.paste(crop, (left + (CELL - crop.width) // 2, top + (CELL - crop.height) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ----------------------------------------------------------------------------------------------------------
# The command


def prototype_boxes(keys: Tensor, table: dict[tuple[int, int], tuple[list[float], int]], c: int,
                    lv: int) -> list[list[float]]:
    """The original boxes of the prototypes ``keys`` (K, 2) (image id, box index) of class ``c`` on level
    ``lv``, checked against the ground truth (:func:`instance_table`)."""
    found = []
    for rank, (img, j) in enumerate(keys.tolist()):
        if (img, j) not in table:
            raise RuntimeError(f"prototype {rank} of class {c}, level {lv}: image id {img} box {j} is not "
                               "in the training set's ground truth; the data changed during the export")
        box, label = table[(img, j)]
        if label != c:
            raise RuntimeError(f"prototype {rank} of class {c}, level {lv}: image id {img} box {j} has "
                               f"label {label} in the ground truth; the bank and the data set disagree")
        found.append(box)
    return found


def level_entries(lv: int, per_class: dict[int, Any], pgm_costs: dict, keys: Tensor,
                  table: dict[tuple[int, int], tuple[list[float], int]], files: dict[int, str],
                  class_names: dict[int, str], pool_counts: list[int]) -> tuple[dict, dict, list]:
    """Level ``lv``'s prototypes per class: the ``prototypes.pt`` entries, the ``prototypes.json`` entries and
    the gallery rows."""
    classes_pt: dict[int, dict[str, Any]] = {}
    classes_json: dict[str, Any] = {}
    gallery_rows = []
    for c in sorted(per_class):
        p = per_class[c]
        k = keys[p.indices]
        found = prototype_boxes(k, table, c, lv)
        costs = pgm_costs.get((lv, c))
        classes_pt[c] = {
            "indices": p.indices.clone(), "image_ids": k[:, 0].clone(), "box_index": k[:, 1].clone(),
            "boxes": torch.tensor(found, dtype=torch.float32).reshape(-1, 4), "teacher": p.teacher.clone(),
            "student": p.student.clone(),
            "costs": torch.tensor(costs, dtype=torch.float64) if costs is not None else None,
        }
        instances = [
            {"rank": r, "index": int(i), "image_id": int(img), "box_index": int(j),
             "file": files[int(img)], "box_xyxy": [round(v, 2) for v in box]}
            for r, (i, (img, j), box) in enumerate(zip(p.indices.tolist(), k.tolist(), found))
        ]
        classes_json[str(c)] = {"name": class_names.get(c, str(c)), "pool_instances": pool_counts[c],
                                "instances": instances, "pgm_costs": costs}
        label = f"{class_names.get(c, str(c))}\n({pool_counts[c]} inst.)"
        gallery_rows.append((label, [(files[int(img)], box) for (img, _), box in zip(k.tolist(), found)]))
    return classes_pt, classes_json, gallery_rows


def export_prototypes(cfg: Config, checkpoint: str, out: str | Path) -> Path:
    """Select the prototypes with the teacher of ``cfg.distill`` and the student weights in ``checkpoint``
    exactly as a training epoch would, and write ``prototypes.pt``, ``prototypes.json`` and one
    ``gallery_level{L}.png`` per pyramid level to ``out`` (see the module docstring). Returns ``out``."""
    t_start = time.perf_counter()
    if cfg.distill is None:
        raise ConfigError("the config has no distill section: `detkd prototypes` needs a distillation config "
                          "(distill.teacher / teacher_checkpoint and methods, e.g. configs/digits/*_global.yaml)")
    out = Path(out)
    device = resolve_device(cfg.train.device)

    name, options = prototype_method(cfg)
    info(f"prototypes: method {name!r} options {options or '(defaults)'}; loading teacher and student")
    teacher = load_teacher(cfg)
    student = load_student(cfg, checkpoint)
    pairs, t_ch, s_ch = paired_channels(teacher, student, "distill")
    distiller = build_distiller(name, options, t_ch, s_ch, cfg.model.arch,
                                where="distill.methods (prototype method)")
    bank = distiller.bank
    bank.pgm_costs = {}  # PGM's Eq. 4 costs, for prototypes.json
    teacher.to(device)
    student.to(device)

    loader = feature_loader(cfg)
    info(f"prototypes: extracting instance features from {len(loader.dataset)} training images (no augmentation)")
    ctx = DistillContext(teacher=teacher, student=student, loader=loader, device=device, epoch=0, pairs=pairs,
                         epochs=cfg.train.epochs)
    stats = bank.refresh(ctx)
    info(f"prototypes: {int(stats['proto_instances'])} instances of {int(stats['proto_classes'])} classes; "
         f"extraction {stats['proto_extract_s']:.1f} s, selection {stats['proto_select_s']:.1f} s")

    if not dist.is_main():  # under torchrun every rank takes part in the selection; rank 0 writes
        return out

    # map the bank's instance keys back to files and original boxes
    keys = bank.pool_keys  # (N, 2) (image id, box index), the rows the indices point to
    pool_counts = torch.bincount(bank.pool_labels, minlength=cfg.model.num_classes + 1).tolist()
    dataset = loader.dataset  # the non-augmented training set the bank was built from
    files, table = instance_table(dataset.coco_gt())
    class_names = {int(c["id"]): c["name"] for c in dataset.categories}
    level_names = pyramid_levels(student)
    if pairs is not None:  # the bank's levels are the paired ones
        level_names = [level_names[j] for _, j in pairs]

    levels_pt: list[dict[str, Any]] = []
    levels_json: list[dict[str, Any]] = []
    for lv, per_class in enumerate(bank.protos):
        classes_pt, classes_json, gallery_rows = level_entries(lv, per_class, bank.pgm_costs, keys, table, files,
                                                               class_names, pool_counts)
        gallery = out / f"gallery_level{lv}.png"
        info(f"prototypes: level {lv} ({level_names[lv]}): {len(per_class)} classes -> {gallery}")
        title = f"level {lv} ({level_names[lv]}), {bank.opts.generator}, K={bank.opts.k}"
        draw_gallery(gallery_rows, title, gallery)
        levels_pt.append({"level": lv, "name": level_names[lv], "classes": classes_pt})
        levels_json.append({"level": lv, "name": level_names[lv], "gallery": gallery.name,
                            "classes": classes_json})

    elapsed = time.perf_counter() - t_start
    common = {
        "version": 1, "method": name, "options": options, "generator": bank.opts.generator, "k": bank.opts.k,
        "lam": bank.opts.lam, "num_instances": int(keys.shape[0]), "class_names": class_names,
        "checkpoint": str(checkpoint), "teacher_checkpoint": cfg.distill.teacher_checkpoint,
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save({**common, "levels": levels_pt, "config": to_dict(cfg)}, out / "prototypes.pt")
    timing = {"total_s": round(elapsed, 3), "extract_s": round(stats["proto_extract_s"], 3),
              "select_s": round(stats["proto_select_s"], 3)}
    summary = {**common, "class_names": {str(c): n for c, n in class_names.items()}, "time": timing,
               "levels": levels_json}
    atomic_write_text(out / "prototypes.json", json.dumps(summary, indent=2))
    info(f"prototypes: done in {elapsed:.1f} s ({len(levels_pt)} levels) -> {out}")
    return out
