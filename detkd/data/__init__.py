"""Data sets (COCO, VOC, loose VOC XML folder, embedded digits), transforms, collate and loaders.

Items follow docs/architecture.md ("Data set items"); formats and the bad-input policy are described in
docs/data.md.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from detkd.config import DataConfig, ModelConfig
from detkd.data.coco import coco_dataset
from detkd.data.common import DataError, DataFileNotFoundError, DetectionDataset, ImageRecord, decode_rgb
from detkd.data.digits import ensure_digits, make_digits
from detkd.data.transforms import eval_transforms, train_transforms
from detkd.data.voc import VOC_CLASSES, resolve_xml_dir, voc_dataset, voc_folder_dataset

__all__ = [
    "DataError",
    "DataFileNotFoundError",
    "DetectionDataset",
    "ImageRecord",
    "VOC_CLASSES",
    "build_dataset",
    "build_loader",
    "coco_dataset",
    "collate",
    "decode_rgb",
    "ensure_digits",
    "kept_boxes",
    "make_digits",
    "model_targets",
    "prepare_batch",
    "scale_image",
    "voc_dataset",
    "voc_folder_dataset",
]


def build_dataset(cfg: DataConfig, split: str, model: ModelConfig, train: bool | None = None) -> DetectionDataset:
    """The ``split`` ("train" or "val") data set of ``cfg``, resized for ``model``.

    ``train=None`` augments iff ``split == "train"``. The ``digits`` format generates its data under
    ``cfg.root`` when absent. The data set's class count must equal ``model.num_classes``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train = split == "train" if train is None else train
    transforms = train_transforms(cfg, model) if train else eval_transforms(model)
    common = dict(transforms=transforms, bad_boxes=cfg.bad_boxes, bad_images=cfg.bad_images, train=train)
    name = f"{cfg.format} {split} ({cfg.root})"
    root = Path(cfg.root)
    ann, images = (cfg.train_ann, cfg.train_images) if split == "train" else (cfg.val_ann, cfg.val_images)

    if cfg.format == "digits":
        root = ensure_digits(root, cfg.digits)
        dataset = coco_dataset(root / "annotations" / f"instances_{split}.json", root / split, name=name,
                               bad_annotations=cfg.bad_annotations, **common)
    elif cfg.format == "coco":
        dataset = coco_dataset(root / ann, root / images, name=name, bad_annotations=cfg.bad_annotations, **common)
    elif cfg.format == "voc":
        sets = cfg.train_sets if split == "train" else cfg.val_sets
        dataset = voc_dataset(root, sets, cfg.class_names, name=name, **common)
    elif cfg.format == "voc_folder":
        xml_dir = resolve_xml_dir(root, ann, images)
        dataset = voc_folder_dataset(root / images, xml_dir, cfg.class_names, name=name, **common)
    else:
        raise ValueError(f"data.format: unknown format {cfg.format!r}")

    if len(dataset.categories) != model.num_classes:
        raise DataError(
            f"{name}: the data set has {len(dataset.categories)} classes but model.num_classes is "
            f"{model.num_classes}; set model.num_classes (and the teacher's) to {len(dataset.categories)}"
        )
    return dataset


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images and targets as two lists (images differ in size; the detector batches them itself)."""
    return [item[0] for item in batch], [item[1] for item in batch]


# A batch is prepared for a detector here and nowhere else: images scaled to [0, 1], ignore boxes dropped.


def scale_image(image: Tensor, device: torch.device | str) -> Tensor:
    """A uint8 (3, H, W) image as the float [0, 1] plain tensor on ``device`` that detectors take."""
    return image.as_subclass(Tensor).to(device, non_blocking=True).float() / 255.0


def kept_boxes(target: dict[str, Tensor]) -> Tensor:
    """bool (M,): the boxes a detector trains on, i.e. not flagged ``ignore`` (crowd / difficult regions)."""
    if "ignore" not in target:
        return torch.ones(len(target["labels"]), dtype=torch.bool)
    return ~torch.as_tensor(target["ignore"]).as_subclass(Tensor).reshape(-1).bool()


def model_targets(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """What the detector trains on: ignore boxes dropped, plain tensors boxes float32 (M, 4), labels int64."""
    out = []
    for t in targets:
        keep = kept_boxes(t)
        boxes = t["boxes"].as_subclass(Tensor)[keep].to(torch.float32).reshape(-1, 4)
        labels = t["labels"].as_subclass(Tensor)[keep].to(torch.int64).reshape(-1)
        out.append({"boxes": boxes, "labels": labels})
    return out


def prepare_batch(images: list[Tensor], targets: list[dict[str, Tensor]], device: torch.device
                  ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """A training batch from the loader as the detector takes it, on ``device``."""
    return ([scale_image(img, device) for img in images],
            [{k: v.to(device) for k, v in t.items()} for t in model_targets(targets)])


def _seed_worker(worker_id: int) -> None:
    """Give Python's and numpy's RNGs a per-worker seed derived from the loader's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    workers: int,
    shuffle: bool,
    sampler: torch.utils.data.Sampler | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader with :func:`collate`, reproducible for ``seed``.

    The generator fixes the shuffle order (a new permutation each epoch, the same sequence every run) and
    the workers' seeds, hence the random augmentation. With a ``sampler`` (e.g. DistributedSampler)
    ``shuffle`` is left to the sampler.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if workers > 0 else None,
        persistent_workers=False,
    )
