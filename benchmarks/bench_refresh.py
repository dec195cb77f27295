"""Cost of the global method's prototype refresh next to a training epoch, on the digits data.

    python benchmarks/bench_refresh.py [--archs retinanet faster_rcnn] [--steps 10] [--warmup 2]
        [--threads 1] [--workers 0] [--data-root DIR] [--cap N] [--refreshes 2]

For each detector family the run is built from ``configs/digits/{arch}_r34_r18_global.yaml`` exactly as
``detkd distill`` builds it (:func:`detkd.engine.assemble.build_models`, the trainer's feature loader and
training loader: 96 px images, batch 8, 2000 training images, ResNet-34 FPN-128 teacher, ResNet-18 FPN-32
student), with an untrained teacher (the cost does not depend on its weights). In one process, in turn:

1. the first refresh (``on_epoch_start`` of epoch 0: teacher and student features, then PGM);
2. ``--warmup`` + ``--steps`` / 2 training steps, as ``detkd.engine.trainer.train_one_epoch`` takes them
   (batch fetch, forward with the distiller, backward, optimizer step);
3. the later refresh(es) (epoch 1, ...: student features only, the teacher's are cached);
4. ``--steps`` / 2 more training steps.

An epoch is extrapolated as the median step time times the number of iterations of an epoch (the training
loader's length). The ratio is refresh seconds / epoch seconds; the target is <= 0.10. The refresh's own
split (``proto_extract_s``: images through the detectors and pooling; ``proto_select_s``: PGM) comes from
the statistics the bank logs. On a shared CPU the absolute times move with the other processes' load;
refresh and steps are measured in the same process, close in time, so the ratio moves less.

``--data-root`` reuses an existing digits folder with the configs' parameters (default: generate one in a
temporary folder); ``--cap`` overrides the configs' ``max_images_per_class`` (0 = every image).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import RunStamp, cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCHS = ["retinanet", "faster_rcnn"]
TARGET = 0.10


def load_cfg(arch: str, data_root: str, teacher_ckpt: str, workers: int, cap: int | None):
    from detkd.config import load_config

    cfg = load_config(REPO / "configs" / "digits" / f"{arch}_r34_r18_global.yaml", [
        f"distill.teacher_checkpoint={teacher_ckpt}", f"data.root={data_root}", f"data.workers={workers}",
        "train.device=cpu",
    ])
    if cap is not None:
        for m in cfg.distill.methods:
            m.options["max_images_per_class"] = cap
    return cfg


def untrained_teacher(cfg, path: Path) -> str:
    from detkd.models import build_detector
    from detkd.runtime.checkpoint import save_checkpoint

    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(path, {"model": build_detector(cfg.distill.teacher).state_dict()})
    return str(path)


def run_arch(arch: str, a: argparse.Namespace, data_root: str, tmp: Path) -> dict:
    """Refreshes and training steps of one family, in one process; seconds and ratios."""
    from detkd.data import build_dataset, build_loader, model_targets
    from detkd.distill.base import DistillContext
    from detkd.engine.assemble import build_models, feature_loader
    from detkd.engine.schedule import build_optimizer

    device = torch.device("cpu")
    cfg = load_cfg(arch, data_root, "none", a.workers, a.cap)
    cfg = load_cfg(arch, data_root, untrained_teacher(cfg, tmp / f"teacher_{arch}.pt"), a.workers, a.cap)
    torch.manual_seed(0)
    student, teacher, step = build_models(cfg, device)
    train_set = build_dataset(cfg.data, "train", cfg.model)
    train_loader = build_loader(train_set, cfg.data.batch_size, cfg.data.workers, shuffle=True,
                                seed=cfg.train.seed, drop_last=len(train_set) > cfg.data.batch_size)
    loader = feature_loader(cfg)
    params = list(step.student.parameters()) + list(step.distillers.parameters())
    opt = build_optimizer(params, cfg.train)
    logs: list[dict] = []

    def refresh(epoch: int) -> dict:
        ctx = DistillContext(teacher=teacher, student=step.student, loader=loader, device=device,
                             epoch=epoch, epochs=cfg.train.epochs, log=logs.append)
        t0 = time.perf_counter()
        for d in step.distillers:
            d.on_epoch_start(ctx)
        out = {"refresh_s": time.perf_counter() - t0, **logs[-1]}
        print(f"  {arch}: refresh of epoch {epoch}: {out['refresh_s']:.1f} s", file=sys.stderr, flush=True)
        return out

    batches = iter(train_loader)

    def steps(n: int) -> list[float]:
        """n training steps as train_one_epoch takes them, each timed from the batch fetch."""
        nonlocal batches
        step.student.train()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                images, targets = next(batches)
            except StopIteration:
                batches = iter(train_loader)
                images, targets = next(batches)
            images = [img.to(device).float() / 255.0 for img in images]
            tgts = [{k: v.to(device) for k, v in t.items()} for t in model_targets(targets)]
            det_losses, kd_losses = step(images, tgts)
            loss = sum({**det_losses, **kd_losses}.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            out.append(time.perf_counter() - t0)
        return out

    refreshes = [refresh(0)]
    times = steps(a.warmup + a.steps // 2)[a.warmup:]
    for e in range(1, a.refreshes):
        refreshes.append(refresh(e))
    times += steps(a.steps - a.steps // 2)
    step_s = statistics.median(times)
    iters = len(train_loader)
    epoch_s = step_s * iters
    return {"step_s": step_s, "step_min": min(times), "step_max": max(times), "iters": iters, "epoch_s": epoch_s,
            "refreshes": refreshes, "cap": step.distillers[0].opts.max_images_per_class}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (half before, half after the "
                    "later refreshes)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    ap.add_argument("--refreshes", type=int, default=2, help="refreshes: the first (with teacher) and later ones")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--workers", type=int, default=0, help="data loader workers (configs: 2)")
    ap.add_argument("--data-root", default="", help="existing digits folder (default: generate one)")
    ap.add_argument("--cap", type=int, default=None, help="override max_images_per_class (0 = every image)")
    a = ap.parse_args()
    if a.steps < 2 or a.refreshes < 1:
        sys.exit("--steps must be >= 2 and --refreshes >= 1")

    torch.set_num_threads(a.threads)
    stamp = RunStamp()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_refresh_") as tmp:
        data_root = a.data_root or str(Path(tmp) / "digits")
        for arch in a.archs:
            print(f"{arch}: building", file=sys.stderr, flush=True)
            results[arch] = run_arch(arch, a, data_root, Path(tmp))

    print(f"# bench_refresh {stamp.start}, {cpu_name()}, {os.cpu_count()} cores, {a.threads} threads, torch "
          f"{torch.__version__}, {a.workers} loader workers, {stamp.load()}")
    print(f"# epoch = median training step x iterations ({a.steps} timed steps after {a.warmup} warm-up); "
          f"ratio = refresh / epoch, target <= {TARGET:.2f}")
    print(f"{'arch':<12} {'cap':>4} {'step s':>7} {'epoch s':>8} {'refresh':>8} {'s':>7} {'extract':>8} "
          f"{'select':>7} {'inst':>6} {'ratio':>6}  verdict")
    for arch, r in results.items():
        for i, f in enumerate(r["refreshes"]):
            ratio = f["refresh_s"] / r["epoch_s"]
            name = "first" if i == 0 else f"later{i}"
            print(f"{arch:<12} {r['cap']:>4} {r['step_s']:7.3f} {r['epoch_s']:8.1f} {name:>8} {f['refresh_s']:7.1f} "
                  f"{f['proto_extract_s']:8.1f} {f['proto_select_s']:7.2f} {int(f['proto_instances']):>6} "
                  f"{ratio:6.3f}  {'met' if ratio <= TARGET else 'MISSED'}")
        print(f"{'':<12} steps: {r['iters']} per epoch, median {r['step_s']:.3f} s (min {r['step_min']:.3f}, "
              f"max {r['step_max']:.3f})")


if __name__ == "__main__":
    main()
