"""torchvision.transforms.v2 pipelines on ``(image, target)``; the library moves the boxes.

Both pipelines resize like the detector's own transform (shorter side to ``model.min_size``, longer
side at most ``model.max_size``, aspect ratio kept), so the model's ``GeneralizedRCNNTransform`` leaves
the image size unchanged. Training adds a random horizontal flip (``data.hflip``), optional photometric
distortion (``data.photometric``) and removes boxes that became smaller than 1 px, keeping ``labels``
and ``ignore`` aligned with ``boxes``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchvision.transforms import v2

from detkd.config import DataConfig, ModelConfig


def _labels_and_ignore(inputs: Any) -> tuple[Tensor, Tensor]:
    """What SanitizeBoundingBoxes filters together with the boxes (module-level: picklable for workers)."""
    target = inputs[1]
    return target["labels"], target["ignore"]


def resize(model: ModelConfig) -> v2.Transform:
    if model.max_size <= model.min_size:
        # the longer side decides alone; torchvision's Resize needs max_size > size otherwise
        return v2.Resize(size=None, max_size=model.max_size, antialias=True)
    return v2.Resize(size=model.min_size, max_size=model.max_size, antialias=True)


def train_transforms(data: DataConfig, model: ModelConfig) -> v2.Compose:
    ops: list[v2.Transform] = [resize(model)]
    if data.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=data.hflip))
    if data.photometric:
        ops.append(v2.RandomPhotometricDistort(p=0.5))
    # Clamp first: float rounding in Resize can put x2 a hair past the border, which Sanitize would drop.
    ops += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_labels_and_ignore)]
    return v2.Compose(ops)


def eval_transforms(model: ModelConfig) -> v2.Compose:
    return v2.Compose([resize(model), v2.ClampBoundingBoxes()])
