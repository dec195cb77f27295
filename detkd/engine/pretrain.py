"""Backbone pre-training on the embedded digits: detkd's stand-in for ImageNet weights.

Every published distillation result starts both detectors from an ImageNet-pretrained backbone. The digits
benches cannot download ImageNet weights, so :func:`pretrain_backbone` trains the same torchvision trunk as a
10-way digit classifier on single-digit crops, and writes its weights for ``model.backbone_weights``.

The crops are made by the scene generator of :mod:`detkd.data.digits` (the same backgrounds, tints, glyph
scaling and alpha blending as the detection scenes), one digit per ``size`` px crop, from the digits of the
**train** pool only: the detection val scenes use the other 20 % of each class, so pre-training never sees a
val digit. Each epoch draws ``images`` new crops (seeded by ``seed`` and the epoch, so a run repeats and a
resumed run draws what the killed one would have); top-1 accuracy is measured on ``val_images`` fixed crops
of the val pool.

Files in ``out_dir``: ``BACKBONE.pt`` (``{"model": trunk state dict}``, the classifier head left out, since a
detector has none; written last, atomically), ``BACKBONE.json`` (options, accuracy per epoch, seconds) and,
while training, ``BACKBONE.partial.pt`` (state after the last finished epoch, to resume from).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from detkd.config import ConfigError, DigitsConfig
from detkd.data.digits import compose_scene, load_mnist, split_pools
from detkd.models.torchvision_build import IMAGE_MEAN, IMAGE_STD
from detkd.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from detkd.runtime.console import info
from detkd.runtime.files import atomic_write_text

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v3_large")
DEFAULT_OUT = "runs/pretrain/digits"  # the shipped digits configs name weights in this folder
FORMAT_VERSION = 1


@dataclass
class PretrainOptions:
    epochs: int = 6  # passes; each draws `images` new crops
    images: int = 8000  # crops per epoch
    val_images: int = 1000  # fixed crops of the val pool for top-1 accuracy
    size: int = 40  # crop side in px
    scale_min: float = 0.9  # digit scale range (x its 28 px glyph), as data.digits.scale_*
    scale_max: float = 1.4
    batch_size: int = 128
    lr: float = 0.002  # AdamW, cosine to 0 after a short warm-up
    weight_decay: float = 0.0001
    seed: int = 0
    threads: int = 1  # torch CPU threads: fixed, so that a run repeats (0 = PyTorch's default)


def check_options(opts: PretrainOptions, backbone: str) -> None:
    """Raise :class:`ConfigError` naming the option and its value."""
    if backbone not in BACKBONES:
        raise ConfigError(f"pretrain: unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")
    checks = [("epochs", opts.epochs >= 1, ">= 1"), ("images", opts.images >= 1, ">= 1"),
              ("val_images", opts.val_images >= 1, ">= 1"), ("size", opts.size >= 16, ">= 16"),
              ("scale_min", opts.scale_min > 0, "> 0"), ("scale_max", opts.scale_max >= opts.scale_min, ">= scale_min"),
              ("batch_size", opts.batch_size >= 1, ">= 1"), ("lr", opts.lr > 0, "> 0"),
              ("weight_decay", opts.weight_decay >= 0, ">= 0"), ("threads", opts.threads >= 0, ">= 0")]
    for name, ok, rule in checks:
        if not ok:
            raise ConfigError(f"pretrain.{name}: must be {rule}, got {getattr(opts, name)}")
    if 28 * opts.scale_max > opts.size:
        raise ConfigError(f"pretrain.scale_max: a digit of {28 * opts.scale_max:.0f} px does not fit a "
                          f"{opts.size} px crop (lower scale_max or raise size)")


def digit_crops(n: int, opts: PretrainOptions, split: str, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` single-digit crops (uint8 ``(n, size, size, 3)``) and their digits (int64 ``(n,)``), drawn from
    the ``split`` pool with the seed stream ``(opts.seed, stream)``."""
    glyphs, labels = load_mnist()
    pools = split_pools(labels)[split]
    scene_cfg = DigitsConfig(image_size=opts.size, min_digits=1, max_digits=1, scale_min=opts.scale_min,
                             scale_max=opts.scale_max)
    rng = np.random.default_rng([opts.seed, stream])
    images = np.empty((n, opts.size, opts.size, 3), dtype=np.uint8)
    digits = np.empty(n, dtype=np.int64)
    for i in range(n):
        scene = compose_scene(rng, glyphs, pools, scene_cfg)
        images[i], digits[i] = scene.image, scene.digits[0]
    return images, digits


def to_input(images: np.ndarray) -> Tensor:
    """uint8 NHWC crops -> float NCHW, normalised as the detectors normalise (ImageNet mean / std)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def head_prefix(backbone: str) -> str:
    """State-dict prefix of the trunk's classifier head (not part of a detector)."""
    return "classifier." if backbone.startswith("mobilenet") else "fc."


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train()
    return correct / len(x)


def classifier(backbone: str) -> nn.Module:
    """The torchvision trunk with a 10-way digit head, every BatchNorm at momentum 0.1.

    Why the momentum: torchvision builds MobileNetV3 with 0.01, tuned for ImageNet's 100k+ steps; after the
    ~400 steps of a digit pre-training its running statistics are still near their initial values, so the
    classifier scores chance in eval mode and a frozen-BN detector inherits wrong statistics. ResNets
    already use 0.1, so their weights are unchanged by this."""
    model = torchvision.models.get_model(backbone, weights=None, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model


def lr_at(it: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` iterations, then cosine to 0."""
    if it < warmup:
        return (it + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))


def weights_path(out_dir: str | Path, backbone: str) -> Path:
    """Where :func:`pretrain_backbone` writes ``backbone``'s weights in ``out_dir``."""
    return Path(out_dir) / f"{backbone}.pt"


def pretrain_backbone(backbone: str, out_dir: str | Path = DEFAULT_OUT, opts: PretrainOptions | None = None,
                      progress: bool = True) -> Path:
    """Pre-train ``backbone`` as a digit classifier (module docstring) and return its weights file.

    A finished file with the same options is reused as it is (the cache); one with other options is an
    error, never overwritten. An interrupted run resumes after its last finished epoch.

    Why one function: it is the pre-training script, read top to bottom (the cache, the resume, the
    epochs, the final file)."""
    opts = opts or PretrainOptions()
    check_options(opts, backbone)
    out = Path(out_dir)
    final, meta_file, partial = weights_path(out, backbone), out / f"{backbone}.json", out / f"{backbone}.partial.pt"
    wanted = {"version": FORMAT_VERSION, "backbone": backbone, "options": dataclasses.asdict(opts)}
    if final.is_file():
        found = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if {k: found.get(k) for k in wanted} != wanted:
            raise CheckpointError(
                f"{final} was pre-trained with other options ({found.get('options')}, wanted {wanted['options']}): "
                f"delete it or pass another --out")
        info(f"pretrain {backbone}: {final} exists (top-1 {found['val_top1'][-1]:.4f}), reused")
        return final
    out.mkdir(parents=True, exist_ok=True)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    model = classifier(backbone)
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    iters = math.ceil(opts.images / opts.batch_size)
    total, warmup = iters * opts.epochs, min(100, iters)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda it: lr_at(it, total, warmup))
    history: list[float] = []
    seconds = 0.0
    start_epoch = 0
    if partial.is_file():
        state = load_checkpoint(partial)
        if state.get("meta") != wanted:
            raise CheckpointError(f"{partial} belongs to a pre-training with other options: delete it to start "
                                  "afresh")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch, history, seconds = int(state["epoch"]), list(state["val_top1"]), float(state["seconds"])
        info(f"pretrain {backbone}: resuming after epoch {start_epoch} of {opts.epochs}")

    val_x, val_y = digit_crops(opts.val_images, opts, "val", stream=1_000_000)
    val_x = to_input(val_x)
    y_val = torch.from_numpy(val_y)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(start_epoch, opts.epochs):
        t0 = time.perf_counter()
        images, digits = digit_crops(opts.images, opts, "train", stream=epoch)
        x, y = to_input(images), torch.from_numpy(digits)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(opts.seed * 1000 + epoch))
        running = 0.0
        for i in range(iters):
            idx = order[i * opts.batch_size : (i + 1) * opts.batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            running += float(loss.detach())
            if progress and (i + 1) % 20 == 0:
                info(f"pretrain {backbone}: epoch {epoch + 1}/{opts.epochs} iter {i + 1}/{iters} "
                     f"loss {running / (i + 1):.4f}")
        history.append(accuracy(model, val_x, y_val, 256))
        seconds += time.perf_counter() - t0
        info(f"pretrain {backbone}: epoch {epoch + 1}/{opts.epochs}: loss {running / iters:.4f}, "
             f"val top-1 {history[-1]:.4f} ({seconds:.0f} s)")
        save_checkpoint(partial, {"meta": wanted, "model": model.state_dict(), "optimizer": optim.state_dict(),
                                  "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                                  "epoch": epoch + 1, "val_top1": history, "seconds": seconds})

    head = head_prefix(backbone)
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    atomic_write_text(meta_file, json.dumps({**wanted, "val_top1": history, "seconds": round(seconds, 1),
                                             "torch": torch.__version__}, indent=1))
    save_checkpoint(final, {"model": trunk})  # last: its presence marks the pre-training finished
    partial.unlink(missing_ok=True)
    info(f"pretrain {backbone}: val top-1 {history[-1]:.4f} after {opts.epochs} epochs ({seconds:.0f} s): {final}")
    return final


def ensure_backbone_weights(backbone: str, backbone_weights: str, opts: PretrainOptions | None = None,
                            progress: bool = True) -> bool:
    """Pre-train ``backbone`` into ``backbone_weights`` when that file is missing and is named as
    :func:`pretrain_backbone` names its output (``DIR/BACKBONE.pt``); the benches' ``pretrain_backbones``
    step. Returns whether it trained. Any other value is left alone."""
    path = Path(backbone_weights)
    if backbone_weights == "none" or path.is_file() or path.name != f"{backbone}.pt":
        return False
    info(f"pretrain: {path} is missing: pre-training {backbone} as a digit classifier (detkd pretrain)")
    pretrain_backbone(backbone, path.parent, opts, progress=progress)
    return True
