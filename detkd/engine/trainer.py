"""The training loop: one loop for every detector, with or without distillation.

Read top to bottom: set-up (device, data, models, optimizer, resume), then epochs of steps, evaluation
and checkpoints. Distillation only adds a frozen teacher and a list of distillers whose weighted terms
are added to the detection loss; everything else is shared.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler

from detkd.config import Config, ConfigError, to_dict
from detkd.data import build_dataset, build_loader, prepare_batch
from detkd.data.samplers import ShardSampler, SkipSampler
from detkd.distill.base import DistillContext
from detkd.engine.assemble import build_models, feature_loader
from detkd.engine.evaluate import evaluate_model, shutdown_workers
from detkd.engine.logger import Progress, RunLogger
from detkd.engine.schedule import build_optimizer, build_scheduler
from detkd.engine.step import DistillStep
from detkd.engine.teacher_cache import build_teacher_cache, prepare_teacher
from detkd.errors import DistributedError, NonFiniteLossError, RunStopped
from detkd.runtime import dist
from detkd.runtime.checkpoint import (
    FINAL_METRICS,
    first_non_finite,
    latest_checkpoint,
    remove_partial_checkpoints,
    rotate_epoch_checkpoints,
    save_checkpoint,
)
from detkd.runtime.console import info
from detkd.runtime.faults import fault_point
from detkd.runtime.files import atomic_write_text
from detkd.runtime.fingerprint import fingerprint
from detkd.runtime.rng import gather_rng_states, set_rng_state
from detkd.runtime.seed import seed_everything
from detkd.runtime.transport import from_bytes, to_bytes

# ----------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    iteration: int = 0
    best: float = -1.0
    bad_steps: int = 0
    epoch_iter: int = 0  # batches of the current epoch already trained (mid-epoch checkpoints)


@dataclass
class Run:
    """What one training run holds from its set-up to its end; the loop's functions take it whole."""

    cfg: Config
    out: Path
    device: torch.device
    step: DistillStep
    model: nn.Module  # the step, or its DDP wrapper
    teacher: nn.Module | None
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    train_loader: Any
    train_sampler: SkipSampler
    val_loader: Any
    coco_gt: dict[str, Any]
    sizes: tuple[int, int]  # images in the training and validation sets
    progress: bool
    logger: RunLogger | None = None  # opened once the run is restored, as it appends to the old log
    context_loader: Any = None  # non-augmented training images for the distillers' epoch start (prototypes)
    state: LoopState = field(default_factory=LoopState)
    metrics: dict[str, float] = field(default_factory=dict)
    resume_samples: int = 0  # images of the first epoch already trained before a mid-epoch resume

    @property
    def iters_per_epoch(self) -> int:
        return len(self.train_loader)


def _make_loaders(cfg: Config):
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


def _agree_across_ranks(distillers: nn.ModuleList) -> None:
    """After a prototype refresh under DDP: every rank must distil against the same prototypes.

    The refresh is deterministic and gathers the same features on every rank, so the states are equal; if
    they ever are not, rank 0's state is given to every rank (and the disagreement is reported)."""
    if not dist.is_dist() or not distillers:
        return
    prints = dist.all_gather_objects(fingerprint(distillers.state_dict()))
    if len(set(prints)) == 1:
        return
    differ = [r for r, p in enumerate(prints) if p != prints[0]]
    info(f"warning: distiller state (prototypes) of rank(s) {differ} differs from rank 0 after the refresh; "
         "using rank 0's on every rank")
    state = dist.broadcast_object(to_bytes(distillers.state_dict()) if dist.is_main() else None)
    distillers.load_state_dict(from_bytes(state))


def fit(cfg: Config, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or distil, when ``cfg.distill`` is set) and return the final evaluation metrics.

    ``resume`` continues the run in ``cfg.output_dir`` from its newest complete checkpoint (module
    :mod:`detkd.runtime.checkpoint`): epoch and position in the epoch, weights, optimizer, scheduler, AMP
    scaler, every rank's RNG state and the distillers' state (prototypes).
    """
    device = dist.init_from_env(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    out = Path(cfg.output_dir)
    found = _check_output_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    seed_and_fix_threads(cfg)
    if dist.is_main():
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    run = set_up(cfg, out, device, progress)
    resume_from = _restore(run, *found) if found is not None else None
    del found  # the loaded dict (optimizer state included) is not kept for the whole run
    run.model = _wrap_ddp(run.step, device)
    _log_start(run, resume_from)
    try:
        while run.state.epoch < cfg.train.epochs:
            start_epoch(run)
            train_one_epoch(run, after_step=lambda: _mid_epoch_checkpoint(run))
            run.state.epoch += 1
            run.state.epoch_iter = 0
            _end_epoch(run)
    except RunStopped:
        raise
    except Exception as e:
        if dist.is_dist() and dist.is_collective_failure(e):
            raise _distributed_error(e, run) from e
        raise
    finally:
        run.logger.close()
    metrics = run.metrics
    if device.type == "cuda" and metrics:
        metrics = {**metrics, "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}  # for detkd bench
    if dist.is_main():  # the run's result, read by `detkd bench`
        atomic_write_text(out / FINAL_METRICS, json.dumps(metrics, indent=2))
    return metrics


def seed_and_fix_threads(cfg: Config) -> None:
    """Seed every generator (per rank) and fix the thread count and determinism ``cfg.train`` asks for.

    :func:`fit` calls it, then :func:`set_up`, then per epoch :func:`start_epoch` and :func:`train_one_epoch`;
    ``benchmarks/bench_loop.py`` drives the same four to time detkd's loop against a bare one."""
    seed_everything(cfg.train.seed + dist.rank())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)  # float sums are split by thread: fixed threads, same result
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def set_up(cfg: Config, out: Path, device: torch.device, progress: bool) -> Run:
    """Loaders, models (the student first: see :func:`detkd.engine.assemble.build_models`), optimizer, schedule."""
    train_set, val_set, train_loader, val_loader, train_sampler = _make_loaders(cfg)
    _, teacher, step = build_models(cfg, device)
    if teacher is not None:  # the teacher cache and the live teacher's dtype / memory format
        prepare_teacher(teacher, cfg.distill.teacher_channels_last)
        step.cache = build_teacher_cache(cfg, teacher, step.request)
    coco_gt = val_set.coco_gt()
    opt = build_optimizer(list(step.student.parameters()) + list(step.distillers.parameters()), cfg.train)
    if len(train_loader) == 0:
        raise ConfigError("data.batch_size is larger than the training set; lower it")
    sched = build_scheduler(opt, len(train_loader), cfg.train)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and device.type == "cuda")
    return Run(cfg=cfg, out=out, device=device, step=step, model=step, teacher=teacher, opt=opt, sched=sched,
               scaler=scaler, train_loader=train_loader, train_sampler=train_sampler, val_loader=val_loader,
               coco_gt=coco_gt, sizes=(len(train_set), len(val_set)), progress=progress)


def _restore(run: Run, path: Path, ckpt: dict[str, Any]) -> Path:
    """Load a checkpoint's state into the run (weights, optimizer, schedule, scaler, RNG, position)."""
    cfg, step = run.cfg, run.step
    step.student.load_state_dict(ckpt["model"])
    step.distillers.load_state_dict(ckpt.get("distillers", {}))
    step.balance_scales = [{k: float(v) for k, v in x.items()} for x in ckpt.get("balance_scales", [])]
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    state = run.state = LoopState(ckpt["epoch"], ckpt["iteration"], ckpt["best"], 0,
                                  int(ckpt.get("epoch_iteration", 0)))
    run.resume_samples = int(ckpt.get("epoch_samples", state.epoch_iter * cfg.data.batch_size))
    run.metrics = ckpt.get("metrics", {})
    saved_world = int(ckpt.get("world_size", 1))
    if saved_world == dist.world_size():
        rngs = ckpt.get("rng_ranks") or [ckpt["rng"]]
        set_rng_state(rngs[dist.rank()] if dist.rank() < len(rngs) else rngs[0])
    else:
        # each rank skips its share of the images the old ranks trained in this epoch
        run.resume_samples = run.resume_samples * saved_world // dist.world_size()
        info(f"resuming with world size {dist.world_size()} (checkpoint: {saved_world}): the data order and "
             "RNG streams differ from an uninterrupted run")
    where = f", {state.epoch_iter} of its {run.iters_per_epoch} iterations" if state.epoch_iter else ""
    info(f"resumed from {path}: {state.epoch} epochs done{where}, iteration {state.iteration}")
    return path


def _wrap_ddp(step: DistillStep, device: torch.device) -> nn.Module:
    if not dist.is_dist():
        return step
    # the graph is searched for unused parameters only where a distiller says it may leave some
    return nn.parallel.DistributedDataParallel(
        step, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=any(d.unused_parameters for d in step.distillers),
    )


def _log_start(run: Run, resume_from: Path | None) -> None:
    cfg, step, state = run.cfg, run.step, run.state
    run.logger = RunLogger(run.out)
    if resume_from is not None:
        run.logger.log({"kind": "resume", "epoch": state.epoch, "iteration": state.iteration,
                        "checkpoint": str(resume_from)}, state.iteration)
    else:  # the student's starting weights, so runs meant to share a start can be checked (detkd bench)
        run.logger.log({"kind": "start", "student_init": fingerprint(step.student.state_dict())}, 0)
    run.context_loader = feature_loader(cfg) if step.distillers else None
    n_params = sum(p.numel() for p in step.student.parameters())
    n_train, n_val = run.sizes
    info(f"{'distil' if step.distillers else 'train'} {cfg.model.arch}/{cfg.model.backbone}: {n_params / 1e6:.2f} M "
         f"params, {n_train} train / {n_val} val images, {cfg.train.epochs} epochs x "
         f"{run.iters_per_epoch} iterations, device {run.device}, world size {dist.world_size()}, output {run.out}")


def start_epoch(run: Run) -> None:
    """The epoch's data order (reseeded: resumable), decay factor, and the distillers' epoch start."""
    cfg, step, epoch = run.cfg, run.step, run.state.epoch
    if isinstance(run.train_sampler.base, DistributedSampler):
        run.train_sampler.base.set_epoch(epoch)
    run.train_sampler.skip = run.resume_samples
    run.resume_samples = 0
    loader = run.train_loader
    if hasattr(loader, "generator") and loader.generator is not None:
        loader.generator.manual_seed(cfg.train.seed * 100_003 + epoch)
    step.scale = (1.0 - epoch / cfg.train.epochs) if (cfg.distill and cfg.distill.decay) else 1.0
    if not step.distillers:
        return
    ctx = DistillContext(teacher=run.teacher, student=step.student, loader=run.context_loader, device=run.device,
                         epoch=epoch, epochs=cfg.train.epochs, pairs=step.pairs,
                         log=lambda d: run.logger.log({"kind": "distill", "epoch": epoch, **d}, run.state.iteration))
    for d in step.distillers:
        d.on_epoch_start(ctx)
    _agree_across_ranks(step.distillers)


def _mid_epoch_checkpoint(run: Run) -> None:
    every, state = run.cfg.train.checkpoint_every, run.state
    if every and state.iteration % every == 0 and state.epoch_iter < run.iters_per_epoch:
        _save(run, ["last.pt"])


def _end_epoch(run: Run) -> None:
    """Evaluate when due (always after the last epoch), then write last / epoch_N / best checkpoints."""
    cfg, state = run.cfg, run.state
    last_epoch = state.epoch == cfg.train.epochs
    if (cfg.train.eval_every and state.epoch % cfg.train.eval_every == 0) or last_epoch:
        metrics = evaluate_model(run.step.student, run.val_loader, run.coco_gt, run.device, run.progress,
                                 cfg.eval.max_dets)
        metrics["epoch"] = state.epoch
        run.metrics = metrics
        run.logger.log({"kind": "eval", **metrics}, state.iteration)
        info(f"epoch {state.epoch}/{cfg.train.epochs}: mAP {metrics['mAP']:.4f} AP50 {metrics['AP50']:.4f} "
             f"AP75 {metrics['AP75']:.4f} VOC_AP50 {metrics['VOC_AP50']:.4f}")
    if run.step.cache is not None and run.step.cache.enabled:
        info(run.step.cache.summary())
    metrics = run.metrics
    is_best = bool(metrics) and metrics.get("epoch") == state.epoch and metrics["mAP"] > state.best
    if is_best:
        state.best = metrics["mAP"]
    names = ["last.pt"] + ([f"epoch_{state.epoch}.pt"] if cfg.train.keep_last else [])
    _save(run, names + (["best.pt"] if is_best else []))
    if dist.is_main() and cfg.train.keep_last:
        rotate_epoch_checkpoints(run.out, cfg.train.keep_last)
    dist.barrier()


def _save(run: Run, names: list[str]) -> None:
    """Write the loop's state to ``names`` in the run folder (rank 0), unless the weights went non-finite."""
    step, state = run.step, run.state
    rngs = gather_rng_states()  # a collective: every rank takes part
    bad = first_non_finite({**step.student.state_dict(), **{f"distillers.{k}": v for k, v in
                                                             step.distillers.state_dict().items()}})
    if dist.is_dist():  # buffers (BatchNorm statistics) differ between ranks: every rank must stop
        bad = next((b for b in dist.all_gather_objects(bad) if b is not None), None)
    if bad is not None:
        raise NonFiniteLossError(
            f"{bad} holds NaN/Inf at iteration {state.iteration} although the losses were finite; the "
            f"checkpoints in {run.out} were not overwritten (last.pt is the last good state); lower train.lr "
            "or enable train.clip_grad"
        )
    if not dist.is_main():
        return
    ckpt = _checkpoint_state(step, run.opt, run.sched, run.scaler, state, run.cfg, run.metrics, rngs)
    for name in names:
        save_checkpoint(run.out / name, ckpt)


def _distributed_error(e: BaseException, run: Run) -> DistributedError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DistributedError(
        f"rank {dist.rank()} of {dist.world_size()}: a collective operation failed at iteration "
        f"{run.state.iteration} (another rank died, or did not answer within train.dist_timeout_s = "
        f"{run.cfg.train.dist_timeout_s} s): {first}. Resume the run with --resume once every rank can run."
    )


def train_one_epoch(run: Run, after_step: Callable[[], None] = lambda: None) -> None:
    """One pass over the training loader: a step per batch, a skipped step per non-finite loss, logs."""
    model, step, opt, sched, scaler, state = run.model, run.step, run.opt, run.sched, run.scaler, run.state
    cfg, device, loader, logger = run.cfg, run.device, run.train_loader, run.logger
    step.student.train()
    if step.teacher is not None:
        step.teacher.eval()
    use_amp = scaler.is_enabled()
    bar = Progress(len(loader), f"epoch {state.epoch + 1}/{cfg.train.epochs}", enabled=run.progress)
    window: dict[str, float] = {}
    n_window = 0
    t_window = time.perf_counter()
    batches = iter(loader)
    try:
        for images, targets in batches:
            images, tgts = prepare_batch(images, targets, device)
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

