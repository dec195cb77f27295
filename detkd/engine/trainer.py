"""The training loop: one loop for every detector, with or without distillation.

Read top to bottom: set-up (device, data, models, optimizer, resume), then epochs of steps, evaluation
and checkpoints. Distillation only adds a frozen teacher and a list of distillers whose weighted terms
are added to the detection loss; everything else is shared.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, RandomSampler, Sampler

from detkd.config import Config, ConfigError, to_dict
from detkd.engine import dist
from detkd.engine.checkpoint import (
    first_non_finite,
    latest_checkpoint,
    remove_partial_checkpoints,
    rotate_epoch_checkpoints,
    save_checkpoint,
)
from detkd.engine.evaluate import evaluate_model, shutdown_workers
from detkd.engine.faults import fault_point
from detkd.engine.logger import Progress, RunLogger
from detkd.engine.schedule import build_optimizer, build_scheduler
from detkd.utils import atomic_write_text, info, seed_everything


class RunStopped(RuntimeError):
    """The run stopped itself with a message for the user (the CLI prints it and exits with status 1)."""


class NonFiniteLossError(RunStopped):
    """Too many consecutive steps produced a NaN/Inf loss, or the weights themselves became NaN/Inf."""


class DistributedError(RunStopped):
    """A collective operation failed: another rank died, or did not answer within ``train.dist_timeout_s``."""


FINAL_METRICS = "final.json"  # in the run folder: the final evaluation, written when the run ends
_COLLECTIVE_HINTS = ("gloo", "nccl", "timed out", "timeout", "connection", "pair closure", "processgroup",
                     "socket", "broken pipe")


def _is_collective_failure(e: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(e, dist_error):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(h in text for h in _COLLECTIVE_HINTS)


# ----------------------------------------------------------------------------------------------------------
# Samplers


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, no padding: each image is evaluated exactly once."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipSampler(Sampler[int]):
    """The training sampler, able to start an epoch after its first ``skip`` indices (mid-epoch resume).

    ``base`` is a ``RandomSampler`` drawing from the loader's generator (the order of a plain
    ``shuffle=True`` loader) or a ``DistributedSampler``. The epoch's order is drawn in full, then the
    indices already trained are passed over without loading them, so the rest of the epoch sees exactly
    the images, in the order, of an uninterrupted run.
    """

    def __init__(self, base: Sampler[int] | None = None):
        self.base = base
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        it = iter(self.base)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


# ----------------------------------------------------------------------------------------------------------
# Student + distillers as one module


class DistillStep(nn.Module):
    """Student and distillers in one module, so that DDP synchronises the adapters' gradients too.

    The teacher is held outside the parameter tree: it is frozen, in eval mode, and never optimised.
    """

    def __init__(self, student: nn.Module, distillers: nn.ModuleList | None = None,
                 weights: list[float] | None = None, teacher: nn.Module | None = None, balance: float = 0.0,
                 pairs: list[tuple[int, int]] | None = None):
        super().__init__()
        self.student = student
        # (teacher level, student level) of equal stride (detkd.models.pair_levels); None: the two pyramids
        # are the same levels, passed to the distillers whole
        self.pairs = pairs
        self.distillers = distillers if distillers is not None else nn.ModuleList()
        self.weights = weights or []
        self._teacher = [teacher] if teacher is not None else []  # a list hides it from .parameters()
        self.scale = 1.0  # distillation decay factor, set by the loop every epoch
        self.balance = balance  # distill.balance: > 0 caps each method's loss at balance x detection loss
        self.balance_scales: list[dict[str, float]] = []  # per method and term, fixed on the first step
        if self.distillers:
            from detkd.taps import TapRequest

            req = TapRequest()
            for d in self.distillers:
                req = req.merge(d.request())
            self.request = req

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if not self.distillers:
            return self.student(images, targets), {}
        from detkd.taps import tap_student, tap_teacher, transform_batch

        image_list, tgts = transform_batch(self.student, images, targets)
        det_losses, s_taps = tap_student(self.student, image_list, tgts, self.request)
        t_taps = tap_teacher(self.teacher, image_list, tgts, self.request, s_taps)
        if self.pairs is not None:
            from detkd.taps import select_levels

            t_taps = select_levels(t_taps, [i for i, _ in self.pairs])
            s_taps = select_levels(s_taps, [j for _, j in self.pairs])
        outputs = [d(t_taps, s_taps, tgts) for d in self.distillers]
        if self.balance > 0 and not self.balance_scales:
            self.balance_scales = balance_scales(det_losses, outputs, self.weights, self.balance)
            info("distill.balance: term factors " + ", ".join(
                f"{k} {b:.3g}" for scales in self.balance_scales for k, b in scales.items()))
        factors = self.balance_scales or [{} for _ in outputs]
        return det_losses, weigh_terms(outputs, list(self.distillers), self.weights, factors, self.scale)


def weigh_terms(outputs: list[dict[str, Tensor]], distillers: list[nn.Module], weights: list[float],
                factors: list[dict[str, float]], scale: float) -> dict[str, Tensor]:
    """Every distiller's terms times its run-level ``weight``, its balance factor and the decay ``scale``
    (``distill.decay``), except the terms the distiller lists in ``undecayed``, which keep scale 1."""
    kd_losses: dict[str, Tensor] = {}
    for d, out, w, b in zip(distillers, outputs, weights, factors):
        exempt = getattr(d, "undecayed", frozenset())
        for k, v in out.items():
            kd_losses[k] = v * (w * b.get(k, 1.0) * (1.0 if k in exempt else scale))
    return kd_losses


def balance_scales(det_losses: dict[str, Tensor], outputs: list[dict[str, Tensor]], weights: list[float],
                   balance: float) -> list[dict[str, float]]:
    """``distill.balance``: one factor per distillation term, min(1, balance * detection loss / weighted
    term), measured on the first batch (averaged over DDP ranks) and then fixed for the run.

    The papers' loss weights were set on ImageNet-pretrained pairs; on a pair trained from scratch the
    feature-imitation terms can start 20-10,000x above the detection loss and swamp it. The
    factor never raises a weight, and terms that do not grow with the feature scale (KL divergences,
    relations, projections on prototypes) usually keep their published weight.
    """
    det = sum(float(v.detach()) for v in det_losses.values())
    names = [(i, k) for i, out in enumerate(outputs) for k in out]
    values = [weights[i] * float(outputs[i][k].detach()) for i, k in names]
    device = next(iter(det_losses.values())).device  # NCCL reduces CUDA tensors only
    ratios = torch.tensor([balance * det / v if v > 0 else 1.0 for v in values], dtype=torch.float64,
                          device=device)
    ratios = dist.all_reduce_mean(ratios)
    scales: list[dict[str, float]] = [{} for _ in outputs]
    for (i, k), r in zip(names, ratios.tolist()):
        scales[i][k] = min(1.0, r)
    return scales


# ----------------------------------------------------------------------------------------------------------
# Building a run


def resolve_device(name: str, timeout_s: int = 600) -> torch.device:
    return dist.init_from_env(name, timeout_s=timeout_s)


def build_models(cfg: Config, device: torch.device) -> tuple[nn.Module, nn.Module | None, DistillStep]:
    """Student, frozen teacher (or None) and the step module, all on ``device``."""
    from detkd.distill.base import build_distiller
    from detkd.models import build_detector, check_pair, paired_channels
    from detkd.models.weights import check_checkpoint_fits

    student = build_detector(cfg.model)
    if cfg.distill is None:
        return student.to(device), None, DistillStep(student.to(device))

    dc = cfg.distill
    check_pair(dc.teacher, cfg.model)
    if not dc.teacher_checkpoint:
        raise ConfigError("distill.teacher_checkpoint: a trained teacher checkpoint is required")
    if not dc.methods:
        raise ConfigError("distill.methods: name at least one method (e.g. methods: [fgfi])")
    if Path(dc.teacher_checkpoint).is_file():  # (else a torchvision weights name, or not found below)
        check_checkpoint_fits(dc.teacher_checkpoint, dc.teacher, "distill.teacher", "distill.teacher_checkpoint")
    if dc.student_init == "checkpoint" and dc.student_checkpoint and Path(dc.student_checkpoint).is_file():
        check_checkpoint_fits(dc.student_checkpoint, cfg.model, "model", "distill.student_checkpoint")
    teacher_cfg = _with_weights(dc.teacher, dc.teacher_checkpoint)
    teacher = build_detector(teacher_cfg)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    if dc.student_init == "checkpoint":
        if not dc.student_checkpoint:
            raise ConfigError("distill.student_checkpoint: required when distill.student_init is 'checkpoint'")
        student = build_detector(_with_weights(cfg.model, dc.student_checkpoint))
    elif dc.student_init == "inherit":
        n = inherit_from_teacher(student, teacher)
        info(f"inherit: copied {n} neck/head tensors from the teacher (shapes that match)")

    # feature distillers compare levels of equal stride: pyramids differ (P2-P6, P3-P7, MobileNetV3's 3 levels)
    pairs, t_ch, s_ch = paired_channels(teacher, student, "distill")
    all_pairs = pairs or [(i, i) for i in range(len(t_ch))]
    distillers = nn.ModuleList(
        build_distiller(m.name, m.options, t_ch, s_ch, cfg.model.arch, where=f"distill.methods[{i}]",
                        pair=f"teacher {_describe_model(dc.teacher)} / student {_describe_model(cfg.model)}")
        for i, m in enumerate(dc.methods)
    )
    check_requests(distillers, teacher, student, all_pairs, _describe_model(dc.teacher), _describe_model(cfg.model))
    weights = [m.weight for m in dc.methods]
    teacher.to(device)
    student.to(device)
    step = DistillStep(student, distillers.to(device), weights, teacher, balance=dc.balance, pairs=pairs)
    return student, teacher, step


def _describe_model(model_cfg) -> str:
    return model_cfg.torchvision or f"{model_cfg.arch} {model_cfg.backbone}"


def check_requests(distillers: nn.ModuleList, teacher: nn.Module, student: nn.Module,
                   pairs: list[tuple[int, int]], teacher_name: str, student_name: str) -> None:
    """Raise :class:`ConfigError` at start-up when a method needs outputs that this teacher / student pair
    cannot give: RoI logits or proposals (two-stage on both sides), dense per-anchor outputs (one-stage
    on both sides, the same anchors per location on every paired level), head features for the teacher's
    head (CrossKD: the same one-stage head type on both sides)."""
    from detkd.models import detector_arch

    t_arch, s_arch = detector_arch(teacher), detector_arch(student)
    pair = f"teacher {teacher_name} / student {student_name}"
    for i, d in enumerate(distillers):
        req = d.request()
        where = f"distill.methods[{i}] ({getattr(d, 'name', type(d).__name__)})"
        if (req.roi_outputs or req.proposals) and (t_arch != "faster_rcnn" or s_arch != "faster_rcnn"):
            raise ConfigError(
                f"{where}: needs the RoI outputs of both detectors on the student's RoIs, which only two "
                f"Faster R-CNNs have; the pair is {pair} (pick a method without RoI terms, or a Faster "
                f"R-CNN on both sides)"
            )
        if req.head_layer >= 0:
            from detkd.taps import head_depth

            if t_arch != s_arch or t_arch == "faster_rcnn":
                raise ConfigError(
                    f"{where}: runs the teacher's head layers on the student's head features, which needs a "
                    f"RetinaNet or FCOS head on both sides and the same head type; the pair is {pair} "
                    f"({t_arch} / {s_arch} heads)"
                )
            depth = min(head_depth(teacher), head_depth(student))
            if req.head_layer > depth:
                raise ConfigError(f"{where}: head layer {req.head_layer} is past the heads' {depth} conv blocks "
                                  f"(pair {pair})")
        if req.dense_outputs:
            if t_arch == "faster_rcnn" or s_arch == "faster_rcnn":
                raise ConfigError(
                    f"{where}: needs the dense per-anchor head outputs of both detectors, which only "
                    f"RetinaNet / FCOS have; the pair is {pair}"
                )
            t_apl = teacher.anchor_generator.num_anchors_per_location()
            s_apl = student.anchor_generator.num_anchors_per_location()
            if [t_apl[a] for a, _ in pairs] != [s_apl[b] for _, b in pairs]:
                raise ConfigError(
                    f"{where}: compares the two heads anchor by anchor, but the pair {pair} has "
                    f"{t_apl[0]} and {s_apl[0]} anchors per location: their outputs do not correspond "
                    f"(pick the same anchors on both sides)"
                )


def _with_weights(model_cfg, path: str):
    import copy

    out = copy.deepcopy(model_cfg)
    out.weights = path
    out.backbone_weights = "none"
    return out


def inherit_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy the teacher's neck (FPN) and head tensors into the student wherever names and shapes match."""
    s_state = student.state_dict()
    t_state = teacher.state_dict()
    copied = 0
    for k, v in t_state.items():
        if k.startswith("backbone.body."):
            continue  # the backbone is what the student does differently
        if k in s_state and s_state[k].shape == v.shape:
            s_state[k] = v.clone()
            copied += 1
    student.load_state_dict(s_state)
    return copied


# ----------------------------------------------------------------------------------------------------------
# RNG state (plain containers, so checkpoints load with weights_only=True)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ----------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    iteration: int = 0
    best: float = -1.0
    bad_steps: int = 0
    epoch_iter: int = 0  # batches of the current epoch already trained (mid-epoch checkpoints)


def _make_loaders(cfg: Config):
    from detkd.data import build_dataset, build_loader

    train_set = build_dataset(cfg.data, "train", cfg.model)
    val_set = build_dataset(cfg.data, "val", cfg.model)
    if len(train_set) == 0:
        raise ConfigError(f"data: the training split under {cfg.data.root} has no images")
    world, rank = dist.world_size(), dist.rank()
    train_sampler = SkipSampler(
        DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.train.seed, drop_last=True)
        if world > 1 else None
    )
    per_rank_bs = cfg.data.batch_size
    train_loader = build_loader(train_set, per_rank_bs, cfg.data.workers, shuffle=False,
                                sampler=train_sampler, seed=cfg.train.seed, drop_last=len(train_set) > per_rank_bs)
    if train_sampler.base is None:  # the sampler a shuffle=True loader would make, on the same generator
        train_sampler.base = RandomSampler(train_set, generator=train_loader.generator)
    val_loader = build_loader(val_set, per_rank_bs, cfg.data.workers, shuffle=False,
                              sampler=ShardSampler(len(val_set), rank, world))
    return train_set, val_set, train_loader, val_loader, train_sampler


def _feature_loader(cfg: Config):
    """Training images without random augmentation, this rank's shard (prototype extraction)."""
    from detkd.data import build_dataset, build_loader

    ds = build_dataset(cfg.data, "train", cfg.model, train=False)
    return build_loader(ds, cfg.data.batch_size, cfg.data.workers, shuffle=False,
                        sampler=ShardSampler(len(ds), dist.rank(), dist.world_size()))


def _checkpoint_state(step: DistillStep, opt, sched, scaler, state: LoopState, cfg: Config,
                      metrics: dict[str, float] | None, rngs: list[Any]) -> dict[str, Any]:
    return {
        "model": step.student.state_dict(),
        "distillers": step.distillers.state_dict(),
        "balance_scales": [dict(x) for x in step.balance_scales],
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "iteration": state.iteration,
        "epoch_iteration": state.epoch_iter,
        "epoch_samples": state.epoch_iter * cfg.data.batch_size,
        "best": state.best,
        "rng": rngs[0],
        "rng_ranks": rngs,
        "config": to_dict(cfg),
        "metrics": metrics or {},
        "world_size": dist.world_size(),
    }


def _check_output_dir(out: Path, resume: bool) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from (``--resume``), after removing half-written files of a killed run."""
    if dist.is_main():
        remove_partial_checkpoints(out)
    dist.barrier()
    if resume:
        found = latest_checkpoint(out)
        if found is None:
            info(f"--resume: no checkpoint in {out.resolve()}, starting a new run there (relative paths are "
                 f"resolved against the current directory, {Path.cwd()})")
        return found
    if (out / "last.pt").is_file():
        raise ConfigError(
            f"output_dir {out} already holds a run (last.pt); pass --resume to continue it or choose another "
            "output_dir (nothing was overwritten)"
        )
    return None


def _fingerprint(state: dict[str, Any]) -> str:
    """A hash of every tensor (and plain value) of a nested state: equal iff bitwise equal."""
    h = hashlib.sha1()

    def visit(obj: Any) -> None:
        if isinstance(obj, Tensor):
            h.update(str((obj.dtype, tuple(obj.shape))).encode())
            h.update(obj.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                visit(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)
        else:
            h.update(repr(obj).encode())

    visit(state)
    return h.hexdigest()


def _agree_across_ranks(distillers: nn.ModuleList) -> None:
    """After a prototype refresh under DDP: every rank must distil against the same prototypes.

    The refresh is deterministic and gathers the same features on every rank, so the states are equal; if
    they ever are not, rank 0's state is given to every rank (and the disagreement is reported)."""
    if not dist.is_dist() or not distillers:
        return
    prints = dist.all_gather_objects(_fingerprint(distillers.state_dict()))
    if len(set(prints)) == 1:
        return
    differ = [r for r, p in enumerate(prints) if p != prints[0]]
    info(f"warning: distiller state (prototypes) of rank(s) {differ} differs from rank 0 after the refresh; "
         "using rank 0's on every rank")
    state = dist.broadcast_object(_to_bytes(distillers.state_dict()) if dist.is_main() else None)
    distillers.load_state_dict(_from_bytes(state))


# Tensors inside objects sent with all_gather_object / broadcast_object_list do not always unpickle on the
# other side (torch 2.14, gloo: "UntypedStorage has no attribute dtype"): send torch.save bytes instead.
def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective under DDP)."""
    if not dist.is_dist():
        return [rng_state()]
    return [_from_bytes(b) for b in dist.all_gather_objects(_to_bytes(rng_state()))]


def fit(cfg: Config, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or distil, when ``cfg.distill`` is set) and return the final evaluation metrics.

    ``resume`` continues the run in ``cfg.output_dir`` from its newest complete checkpoint (module
    :mod:`detkd.engine.checkpoint`): epoch and position in the epoch, weights, optimizer, scheduler, AMP
    scaler, every rank's RNG state and the distillers' state (prototypes).
    """
    device = dist.init_from_env(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    out = Path(cfg.output_dir)
    found = _check_output_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed + dist.rank())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)  # float sums are split by thread: fixed threads, same result
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if dist.is_main():
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    train_set, val_set, train_loader, val_loader, train_sampler = _make_loaders(cfg)
    student, teacher, step = build_models(cfg, device)
    coco_gt = val_set.coco_gt()

    params = list(step.student.parameters()) + list(step.distillers.parameters())
    opt = build_optimizer(params, cfg.train)
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise ConfigError("data.batch_size is larger than the training set; lower it")
    sched = build_scheduler(opt, iters_per_epoch, cfg.train)
    use_amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    state = LoopState()
    metrics: dict[str, float] = {}
    resume_samples = 0
    resume_from: Path | None = None
    if found is not None:
        resume_from, ckpt = found
        found = None  # the loaded dict (optimizer state included) is not kept for the whole run
        step.student.load_state_dict(ckpt["model"])
        step.distillers.load_state_dict(ckpt.get("distillers", {}))
        step.balance_scales = [{k: float(v) for k, v in x.items()} for x in ckpt.get("balance_scales", [])]
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = LoopState(ckpt["epoch"], ckpt["iteration"], ckpt["best"], 0, int(ckpt.get("epoch_iteration", 0)))
        resume_samples = int(ckpt.get("epoch_samples", state.epoch_iter * cfg.data.batch_size))
        metrics = ckpt.get("metrics", {})
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world == dist.world_size():
            rngs = ckpt.get("rng_ranks") or [ckpt["rng"]]
            set_rng_state(rngs[dist.rank()] if dist.rank() < len(rngs) else rngs[0])
        else:
            # each rank skips its share of the images the old ranks trained in this epoch
            resume_samples = resume_samples * saved_world // dist.world_size()
            info(f"resuming with world size {dist.world_size()} (checkpoint: {saved_world}): the data order and "
                 "RNG streams differ from an uninterrupted run")
        where = f", {state.epoch_iter} of its {iters_per_epoch} iterations" if state.epoch_iter else ""
        info(f"resumed from {resume_from}: {state.epoch} epochs done{where}, iteration {state.iteration}")
        del ckpt

    model: nn.Module = step
    if dist.is_dist():
        model = nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(step.distillers),
        )

    logger = RunLogger(out)
    if resume_from is not None:
        logger.log({"kind": "resume", "epoch": state.epoch, "iteration": state.iteration,
                    "checkpoint": str(resume_from)}, state.iteration)
    else:  # the student's starting weights, so runs meant to share a start can be checked (detkd bench)
        logger.log({"kind": "start", "student_init": _fingerprint(step.student.state_dict())}, 0)
    context_loader = _feature_loader(cfg) if step.distillers else None
    n_params = sum(p.numel() for p in step.student.parameters())
    info(f"{'distil' if step.distillers else 'train'} {cfg.model.arch}/{cfg.model.backbone}: {n_params / 1e6:.2f} M "
         f"params, {len(train_set)} train / {len(val_set)} val images, {cfg.train.epochs} epochs x "
         f"{iters_per_epoch} iterations, device {device}, world size {dist.world_size()}, output {out}")

    def save(names: list[str]) -> None:
        """Write the loop's state to ``names`` in ``out`` (rank 0), unless the weights went non-finite."""
        rngs = gather_rng_states()  # a collective: every rank takes part
        bad = first_non_finite({**step.student.state_dict(), **{f"distillers.{k}": v for k, v in
                                                                 step.distillers.state_dict().items()}})
        if dist.is_dist():  # buffers (BatchNorm statistics) differ between ranks: every rank must stop
            bad = next((b for b in dist.all_gather_objects(bad) if b is not None), None)
        if bad is not None:
            raise NonFiniteLossError(
                f"{bad} holds NaN/Inf at iteration {state.iteration} although the losses were finite; the "
                f"checkpoints in {out} were not overwritten (last.pt is the last good state); lower train.lr "
                "or enable train.clip_grad"
            )
        if not dist.is_main():
            return
        ckpt = _checkpoint_state(step, opt, sched, scaler, state, cfg, metrics, rngs)
        for name in names:
            save_checkpoint(out / name, ckpt)

    try:
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            if isinstance(train_sampler.base, DistributedSampler):
                train_sampler.base.set_epoch(epoch)
            train_sampler.skip = resume_samples
            resume_samples = 0
            if hasattr(train_loader, "generator") and train_loader.generator is not None:
                train_loader.generator.manual_seed(cfg.train.seed * 100_003 + epoch)
            step.scale = (1.0 - epoch / cfg.train.epochs) if (cfg.distill and cfg.distill.decay) else 1.0
            if step.distillers:
                from detkd.distill.base import DistillContext

                ctx = DistillContext(teacher=teacher, student=step.student, loader=context_loader, device=device,
                                     epoch=epoch, epochs=cfg.train.epochs, pairs=step.pairs,
                                     log=lambda d, e=epoch: logger.log({"kind": "distill", "epoch": e, **d},
                                                                       state.iteration))
                for d in step.distillers:
                    d.on_epoch_start(ctx)
                _agree_across_ranks(step.distillers)

            def mid_epoch_checkpoint() -> None:
                every = cfg.train.checkpoint_every
                if every and state.iteration % every == 0 and state.epoch_iter < iters_per_epoch:
                    save(["last.pt"])

            _train_one_epoch(model, step, train_loader, opt, sched, scaler, state, cfg, device, logger, progress,
                             mid_epoch_checkpoint)
            state.epoch += 1
            state.epoch_iter = 0

            last_epoch = state.epoch == cfg.train.epochs
            if (cfg.train.eval_every and state.epoch % cfg.train.eval_every == 0) or last_epoch:
                metrics = evaluate_model(step.student, val_loader, coco_gt, device, progress, cfg.eval.max_dets)
                metrics["epoch"] = state.epoch
                logger.log({"kind": "eval", **metrics}, state.iteration)
                info(f"epoch {state.epoch}/{cfg.train.epochs}: mAP {metrics['mAP']:.4f} AP50 {metrics['AP50']:.4f} "
                     f"AP75 {metrics['AP75']:.4f} VOC_AP50 {metrics['VOC_AP50']:.4f}")
            is_best = bool(metrics) and metrics.get("epoch") == state.epoch and metrics["mAP"] > state.best
            if is_best:
                state.best = metrics["mAP"]
            names = ["last.pt"] + ([f"epoch_{state.epoch}.pt"] if cfg.train.keep_last else [])
            save(names + (["best.pt"] if is_best else []))
            if dist.is_main() and cfg.train.keep_last:
                rotate_epoch_checkpoints(out, cfg.train.keep_last)
            dist.barrier()
    except RunStopped:
        raise
    except Exception as e:
        if dist.is_dist() and _is_collective_failure(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {dist.rank()} of {dist.world_size()}: a collective operation failed at iteration "
                f"{state.iteration} (another rank died, or did not answer within train.dist_timeout_s = "
                f"{cfg.train.dist_timeout_s} s): {first}. Resume the run with --resume once every rank can run."
            ) from e
        raise
    finally:
        logger.close()
    if device.type == "cuda" and metrics:
        metrics = {**metrics, "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}  # for detkd bench
    if dist.is_main():  # the run's result, read by `detkd bench`
        atomic_write_text(out / FINAL_METRICS, json.dumps(metrics, indent=2))
    return metrics


def _train_one_epoch(model: nn.Module, step: DistillStep, loader, opt, sched, scaler, state: LoopState,
                     cfg: Config, device: torch.device, logger: RunLogger, progress: bool,
                     after_step: Callable[[], None] = lambda: None) -> None:
    from detkd.data import model_targets

    step.student.train()
    if step.teacher is not None:
        step.teacher.eval()
    use_amp = scaler.is_enabled()
    bar = Progress(len(loader), f"epoch {state.epoch + 1}/{cfg.train.epochs}", enabled=progress)
    window: dict[str, float] = {}
    n_window = 0
    t_window = time.perf_counter()
    batches = iter(loader)
    try:
        for images, targets in batches:
            images = [img.to(device, non_blocking=True).float() / 255.0 for img in images]
            tgts = [{k: v.to(device) for k, v in t.items()} for t in model_targets(targets)]
            with torch.autocast(device_type=device.type, enabled=use_amp):
                det_losses, kd_losses = model(images, tgts)
            terms = {**det_losses, **kd_losses}
            loss = sum(terms.values())

            bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
            flag = torch.tensor([1.0 if bad else 0.0], device=device)
            if dist.is_dist():
                torch.distributed.all_reduce(flag)
            if flag.item() > 0:
                state.bad_steps += 1
                opt.zero_grad(set_to_none=True)
                msg = f"non-finite loss at iteration {state.iteration} in {', '.join(bad) or 'another rank'}"
                info(f"skipped step: {msg} ({state.bad_steps} in a row)")
                logger.log({"kind": "skip", "iteration": state.iteration, "terms": bad}, state.iteration)
                if state.bad_steps >= cfg.train.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{state.bad_steps} consecutive non-finite losses (last: {msg}); stopping. The last good "
                        f"checkpoint in {cfg.output_dir} is intact; lower train.lr or enable train.clip_grad."
                    )
                state.iteration += 1
                state.epoch_iter += 1
                sched.step()
                bar.update(len(images))
                continue
            state.bad_steps = 0

            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.train.clip_grad > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                               cfg.train.clip_grad)
            scaler.step(opt)
            scaler.update()
            sched.step()
            state.iteration += 1
            state.epoch_iter += 1

            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            window["loss"] = window.get("loss", 0.0) + float(loss.detach())
            n_window += 1
            lr = opt.param_groups[0]["lr"]
            bar.update(len(images), loss=float(loss.detach()), lr=lr)
            if state.iteration % cfg.train.log_every == 0 or n_window == len(loader):
                elapsed = max(1e-9, time.perf_counter() - t_window)
                rec = {"kind": "train", "epoch": state.epoch, "iteration": state.iteration, "lr": lr,
                       "img_per_s": n_window * len(images) * dist.world_size() / elapsed}
                rec.update({k: v / n_window for k, v in window.items()})
                for d in step.distillers:
                    rec.update({f"{d.name}/{k}": v for k, v in getattr(d, "stats", {}).items()})
                logger.log(rec, state.iteration)
                window, n_window, t_window = {}, 0, time.perf_counter()
            after_step()
            fault_point("train_step")
    finally:
        bar.close()
        shutdown_workers(batches)  # now, not when a traceback that holds the iterator is freed


def evaluate_checkpoint(cfg: Config, checkpoint: str, progress: bool = True) -> dict[str, float]:
    """Evaluate a detkd checkpoint, or a plain/exported state dict, with the model of ``cfg``."""
    from detkd.data import build_dataset, build_loader
    from detkd.models import build_detector, checkpoint_state_dict, load_checked
    from detkd.models.weights import check_checkpoint_fits

    device = resolve_device(cfg.train.device, cfg.train.dist_timeout_s)
    if Path(checkpoint).is_file():
        check_checkpoint_fits(checkpoint, cfg.model, "model", "--checkpoint")
    model = build_detector(cfg.model)
    load_checked(model, checkpoint_state_dict(checkpoint), checkpoint)
    model.to(device)
    val_set = build_dataset(cfg.data, "val", cfg.model)
    loader = build_loader(val_set, cfg.data.batch_size, cfg.data.workers, shuffle=False,
                          sampler=ShardSampler(len(val_set), dist.rank(), dist.world_size()))
    return evaluate_model(model, loader, val_set.coco_gt(), device, progress, cfg.eval.max_dets)
