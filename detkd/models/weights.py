"""Weights for a detector or its backbone: ``none``, a torchvision weights name, or a checkpoint path.

A torchvision weights name (``ResNet50_Weights.IMAGENET1K_V1``, ``FCOS_ResNet50_FPN_Weights.COCO_V1``)
is read from the torch hub cache (``torch.hub.get_dir()/checkpoints``) or downloaded with a short
socket timeout; without internet it fails at once with an error that says where to put the file. A
checkpoint path is a ``.pt`` / ``.pth`` holding a state dict, or a detkd checkpoint (a dict with a
``"model"`` state dict). Every load checks shapes first and names the checkpoint, the mismatched keys
and their shapes, so loading weights of another architecture or class count fails clearly.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection._utils import overwrite_eps

from detkd.runtime.checkpoint import CheckpointError, load_checkpoint
from detkd.runtime.console import info

DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation; a download that stalls longer fails
_WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")

# layers whose shape depends on the number of classes: left at their initial values when a torchvision
# weights name (trained on COCO's 91 outputs) is loaded into a detector with another class count
CLASS_LAYERS = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "head.classification_head.cls_logits.",
)


# torchvision v1 COCO weights whose frozen BN layers use eps 0 (torchvision's builders call overwrite_eps)
ZERO_EPS_WEIGHTS = ("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", "RetinaNet_ResNet50_FPN_Weights.COCO_V1")


def is_weights_name(value: str) -> bool:
    """True for strings shaped like a torchvision weights enum member (``Xxx_Weights.YYY``)."""
    return bool(_WEIGHTS_NAME.match(value))


def torchvision_state_dict(name: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> dict[str, Tensor]:
    """State dict of a torchvision weights name: from the hub cache, else downloaded (fails fast offline)."""
    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"unknown torchvision weights name {name!r}: {e}") from None
    model_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.join(model_dir, os.path.basename(weights.url))
    if os.path.isfile(cached):
        return torch.load(cached, map_location="cpu", weights_only=True)

    # not cached: try the download, but never hang on a machine without internet
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, model_dir=model_dir, map_location="cpu", progress=False, weights_only=True
        )
    except Exception as e:  # URLError, timeout, hash mismatch...: all mean "no usable file"
        raise CheckpointError(
            f"could not download weights {name} from {weights.url} ({type(e).__name__}: {e}); without "
            f"internet, put the file at {cached} or pass a local checkpoint path"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def checkpoint_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The model state dict inside a ``.pt`` / ``.pth`` file (plain state dict or detkd checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = load_checkpoint(path)  # weights_only: never executes pickled code
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # detkd checkpoint
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict (expected tensors or a 'model' entry)")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_weights(source: str, field: str) -> tuple[dict[str, Tensor], bool]:
    """(state dict, is_torchvision_name) for a config value ``source`` of config key ``field``."""
    if os.path.isfile(source):
        return checkpoint_state_dict(source), False
    if is_weights_name(source):
        return torchvision_state_dict(source), True
    if source.endswith((".pt", ".pth")) or os.sep in source:
        raise FileNotFoundError(f"{field}: checkpoint not found: {source}")
    raise ValueError(
        f"{field}: {source!r} is neither 'none', an existing checkpoint file, nor a torchvision weights "
        f"name like 'ResNet50_Weights.IMAGENET1K_V1'"
    )


def load_checked(
    module: nn.Module,
    state: dict[str, Tensor],
    source: str,
    allow_missing: tuple[str, ...] = (),
    skip_mismatched: tuple[str, ...] = (),
) -> list[str]:
    """Load ``state`` into ``module``, raising an error that names ``source`` and the offending keys when
    shapes differ or keys are missing / unexpected. Mismatched keys under a ``skip_mismatched`` prefix are
    left at their initial values; missing keys under an ``allow_missing`` prefix are tolerated.
    Returns the skipped keys."""
    own = module.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    skipped = [k for k, _, _ in mismatched if k.startswith(skip_mismatched)]  # startswith(()) is False
    bad = [m for m in mismatched if m[0] not in skipped]
    if bad:
        shown = "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in bad[:4])
        raise CheckpointError(
            f"checkpoint {source} does not fit this {type(module).__name__} ({len(bad)} tensors differ in "
            f"shape; another architecture, width or class count?): {shown}"
        )
    state = {k: v for k, v in state.items() if k not in skipped}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape errors after torchvision's own key renaming (old RetinaNet heads)
        raise CheckpointError(f"checkpoint {source} does not fit this {type(module).__name__}: {e}") from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")
               and k not in skipped and not k.startswith(allow_missing)]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not fit this {type(module).__name__}: {len(missing)} missing keys "
            f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}"
        )
    return skipped


def load_backbone_weights(trunk: nn.Module, source: str, backbone: str) -> None:
    """Initialise a classification trunk (torchvision ResNet / MobileNetV3, before FPN wrapping).

    ``source``: a torchvision weights name (ImageNet), a classification state dict (``detkd pretrain``
    writes one), or a detector checkpoint (its ``backbone.body.*`` tensors are used)."""
    state, _ = read_weights(source, "model.backbone_weights")
    # the classifier head is no part of a detector: a file may leave it out (a detector's body,
    # `detkd pretrain`'s trunk); every other key must be there
    head = "classifier." if backbone.startswith("mobilenet") else "fc."
    if any(k.startswith("backbone.body.") for k in state):
        # a detector's backbone: the body holds the trunk without its classifier
        prefix = "features." if backbone.startswith("mobilenet") else ""
        body = "backbone.body."
        state = {prefix + k[len(body):]: v for k, v in state.items() if k.startswith(body)}
    load_checked(trunk, state, source, allow_missing=(head,))
    info(f"backbone {backbone}: loaded {source}")


def load_detector_weights(model: nn.Module, source: str, what: str) -> None:
    """Initialise a whole detector. For a torchvision weights name whose class count differs, the
    class-specific output layers stay at their initial values (fine-tuning); a checkpoint must fit."""
    state, from_torchvision = read_weights(source, "model.weights")
    skipped = load_checked(model, state, source, skip_mismatched=CLASS_LAYERS if from_torchvision else ())
    if source in ZERO_EPS_WEIGHTS:
        # these two were trained with frozen BN of eps 0; torchvision's builders set it the same way
        overwrite_eps(model, 0.0)
    info(f"detector {what}: loaded {source}")
    if skipped:
        info(f"detector {what}: class-specific layers left at their initial values: {', '.join(skipped)}")


_RESNET_BY_BLOCKS = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101",
                     (36, True): "resnet152"}


def describe_detector_state(state: dict[str, Tensor]) -> dict[str, Any]:
    """What a detector state dict reveals about the model it came from, read from key names and shapes:
    ``arch``, ``num_classes`` (foreground), ``backbone`` and ``fpn_channels``, each only where readable."""
    out: dict[str, Any] = {}
    cls = state.get("head.classification_head.cls_logits.weight")
    reg = state.get("head.regression_head.bbox_reg.weight")
    if "roi_heads.box_predictor.cls_score.weight" in state:
        out["arch"] = "faster_rcnn"
        out["num_classes"] = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1
    elif cls is not None and "head.regression_head.bbox_ctrness.weight" in state:
        out["arch"] = "fcos"
        out["num_classes"] = int(cls.shape[0]) - 1
    elif cls is not None and reg is not None and reg.shape[0] % 4 == 0 and reg.shape[0] > 0:
        out["arch"] = "retinanet"
        anchors = int(reg.shape[0]) // 4
        if cls.shape[0] % anchors == 0:
            out["num_classes"] = int(cls.shape[0]) // anchors - 1
    blocks = {k.split(".")[3] for k in state if k.startswith("backbone.body.layer3.")}
    if blocks:
        bottleneck = any(k.startswith("backbone.body.layer1.0.conv3.") for k in state)
        name = _RESNET_BY_BLOCKS.get((len(blocks), bottleneck))
        if name:
            out["backbone"] = name
    elif any(k.startswith("backbone.body.0.") for k in state):
        out["backbone"] = "mobilenet_v3_large"
    fpn = state.get("backbone.fpn.inner_blocks.0.0.weight", state.get("backbone.fpn.inner_blocks.0.weight"))
    if fpn is not None:
        out["fpn_channels"] = int(fpn.shape[0])
    return out


def check_checkpoint_fits(path: str | Path, cfg: Any, section: str, key: str) -> None:
    """Raise :class:`CheckpointError` when the detector in checkpoint ``path`` (given by config key ``key``)
    is of another family, class count, backbone or FPN width than config section ``section`` (a
    :class:`~detkd.config.ModelConfig`), naming the checkpoint, each difference and the config key."""
    found = describe_detector_state(checkpoint_state_dict(path))
    what = {"arch": "a {} detector", "num_classes": "{} classes", "backbone": "a {} backbone",
            "fpn_channels": "{} FPN channels"}
    diffs = [f"it has {what[f].format(v)}, {section}.{f} is {getattr(cfg, f)}"
             for f, v in found.items() if getattr(cfg, f) != v]
    if diffs:
        raise CheckpointError(f"{key}: checkpoint {path} does not fit {section}: " + "; ".join(diffs))
