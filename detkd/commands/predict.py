"""``detkd predict``: run a trained detector on a user's images.

The model is a training checkpoint (``.pt`` with ``model`` and ``config``), a run folder (its ``best.pt``,
else ``last.pt``) or an exported student (a folder with ``model.json`` + ``student.pt``, from
``detkd export``). Inputs are image files and folders (their image files, not recursive). OUT receives
every image with its detections drawn (class name and score) under its own file name, and one
COCO-results JSON, ``detections.json``: ``[{"image_id", "file_name", "category_id", "bbox": [x, y, w, h],
"score"}, ...]`` in original pixel coordinates (``image_id`` numbers the images read, from 1). An image
that cannot be read is reported and skipped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch import nn

from detkd.config import ConfigError, ModelConfig, from_dict
from detkd.data import scale_image
from detkd.engine.logger import Progress
from detkd.models import build_detector
from detkd.models.weights import is_weights_name
from detkd.runtime.checkpoint import CheckpointError, load_checkpoint, pick_checkpoint
from detkd.runtime.console import info
from detkd.viz.draw import draw_detections

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")
RESULTS = "detections.json"


@dataclass
class PredictSummary:
    images: int = 0  # images read and predicted
    detections: int = 0  # detections written (score >= the threshold)
    skipped: list[str] = field(default_factory=list)  # "path: reason" of each image that could not be read
    out: Path | None = None


def _model_from(spec: dict, state: dict, source: Path) -> tuple[nn.Module, ModelConfig]:
    cfg = from_dict(ModelConfig, spec, f"{source}: model")
    # the state dict below holds every tensor (cfg keeps its weights name: class names may come from it)
    model = build_detector(dataclasses.replace(cfg, weights="none", backbone_weights="none"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: the weights do not fit its own model section: {e}") from None
    return model.eval(), cfg


def load_model(source: str | Path, checkpoint: str = "best.pt") -> tuple[nn.Module, ModelConfig, Path]:
    """(model in eval mode, its config, the file the weights came from) for a training checkpoint, a run
    folder (``checkpoint`` in it, ``best.pt`` falling back to ``last.pt``) or an exported student folder."""
    source = Path(source)
    if source.is_dir() and (source / "model.json").is_file():
        spec = json.loads((source / "model.json").read_text())
        if "model" not in spec:
            raise CheckpointError(f"{source / 'model.json'} has no 'model' section: not a detkd export")
        weights = source / "student.pt"
        state = load_checkpoint(weights)
        return (*_model_from(spec["model"], state, weights), weights)
    if source.is_dir():
        source = pick_checkpoint(source, checkpoint)
    elif not source.is_file():
        raise FileNotFoundError(f"no checkpoint, run folder or exported student at {source}")
    ckpt = load_checkpoint(source)
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(
            f"{source} is not a detkd training checkpoint (no 'model' / 'config' entry); pass a run folder, "
            f"a checkpoint written by detkd train / distill, or a folder written by detkd export"
        )
    return (*_model_from(ckpt["config"]["model"], ckpt["model"], source), source)


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Image files among ``inputs``: files as given, folders by suffix (sorted, not recursive)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        raise ConfigError(f"no image files in {', '.join(str(i) for i in inputs)} (suffixes: "
                          f"{', '.join(IMAGE_SUFFIXES)})")
    return files


def class_names_for(cfg: ModelConfig, names_file: str | None = None) -> dict[int, str]:
    """Label -> name: from ``names_file`` (a COCO json's ``categories``, or a text file, one name per line
    for labels 1, 2, ...), else from the categories of a torchvision weights name in ``cfg.weights`` when
    the class count matches (COCO models used as they are); empty = labels are drawn as numbers."""
    if names_file:
        path = Path(names_file)
        if not path.is_file():
            raise FileNotFoundError(f"--names: file not found: {path}")
        if path.suffix.lower() == ".json":
            cats = json.loads(path.read_text()).get("categories", [])
            return {int(c["id"]): str(c["name"]) for c in cats}
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        return {i + 1: name for i, name in enumerate(lines)}

    if is_weights_name(cfg.weights):
        try:
            cats = torchvision.models.get_weight(cfg.weights).meta.get("categories", [])
        except (ValueError, KeyError, AttributeError):
            cats = []
        if len(cats) == cfg.num_classes + 1:
            return {i: c for i, c in enumerate(cats) if i > 0}
    return {}


def _set_score_thresh(model: nn.Module, score: float) -> None:
    # the model drops detections below its own threshold before we see them: lower it to --score if needed
    if hasattr(model, "roi_heads"):
        model.roi_heads.score_thresh = min(model.roi_heads.score_thresh, score)
    elif hasattr(model, "score_thresh"):
        model.score_thresh = min(model.score_thresh, score)


def _output_name(path: Path, used: set[str]) -> str:
    name, k = path.name, 1
    while name in used:  # two inputs of the same name from different folders
        name = f"{path.stem}_{k}{path.suffix}"
        k += 1
    used.add(name)
    return name


@torch.no_grad()
def predict_images(source: str | Path, inputs: list[str | Path], out: str | Path, score: float = 0.3,
                   checkpoint: str = "best.pt", device: str = "cpu", names_file: str | None = None,
                   progress: bool = True) -> PredictSummary:
    """Detect on every image of ``inputs`` with the model of ``source``; write the drawn images and
    ``detections.json`` to ``out``. Unreadable images are reported on stderr and skipped."""
    if not 0.0 <= score <= 1.0:
        raise ConfigError(f"--score must be in [0, 1], got {score}")
    model, cfg, weights = load_model(source, checkpoint)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model.to(dev)
    _set_score_thresh(model, score)
    names = class_names_for(cfg, names_file)
    files = list_images(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info(f"predict: {cfg.torchvision or cfg.arch + ' ' + cfg.backbone} from {weights}, {len(files)} images, "
         f"score >= {score}")

    summary = PredictSummary(out=out)
    results: list[dict] = []
    used: set[str] = set()
    bar = Progress(len(files), "predict", enabled=progress)
    try:
        for path in files:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")  # decodes the whole file: a truncated one fails here
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
                reason = f"{path}: {type(e).__name__}: {e}"
                summary.skipped.append(reason)
                print(f"detkd predict: skipped unreadable image {reason}", file=sys.stderr, flush=True)
                bar.update(1)
                continue
            tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
            output = model([scale_image(tensor, dev)])[0]
            keep = (output["scores"] >= score) & (output["labels"] > 0)  # label 0: background, no category
            boxes, labels, scores = (output[k][keep].cpu() for k in ("boxes", "labels", "scores"))
            summary.images += 1
            image_id = summary.images
            name = _output_name(path, used)
            draw_detections(image, boxes, labels, scores, class_names=names).save(out / name)
            for box, label, s in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
                x0, y0, x1, y1 = box
                results.append({"image_id": image_id, "file_name": name, "category_id": int(label),
                                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                                "score": round(float(s), 5)})
            bar.update(1)
    finally:
        bar.close()
    summary.detections = len(results)
    (out / RESULTS).write_text(json.dumps(results))
    info(f"predict: {summary.images} images, {summary.detections} detections -> {out}"
         + (f"; {len(summary.skipped)} unreadable image(s) skipped" if summary.skipped else ""))
    return summary
