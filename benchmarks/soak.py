"""Soak: memory of a long CPU run of tiny models, epoch after epoch (issue 7, long-run hygiene).

    python benchmarks/soak.py [--minutes 12] [--method global] [--arch retinanet] [--workers 2]
        [--threads 1] [--train-images 256] [--size 64] [--json benchmarks/soak.json] [--out DIR]

One ``detkd.engine.trainer.fit`` run on the digits data (``--size`` px scenes), a ResNet-18 FPN-16 student
distilled by ``--method`` (``none``: plain training) from an untrained ResNet-18 FPN-32 teacher, with
``--workers`` data loader worker processes (re-created every epoch, as in real runs), an evaluation and
checkpoints (last / best / keep_last = 1) after every epoch, for as many epochs as fit in ``--minutes``
(estimated from the first epochs; the run is one ``fit`` call, so the epoch count is decided up front from
a short calibration run of 2 epochs in a scratch folder).

Recorded per epoch: the resident set size (RSS, /proc) of the main process when the epoch starts (after
the prototype refresh) and when it ends (after its evaluation and checkpoints, still inside ``fit``), its
peak during the epoch, and the peak total RSS and PSS (shared pages split between the processes sharing
them) of the loader workers with their count, from a sampling thread (every 0.25 s). Growth is the slope
of a least-squares line through the main process's end-of-epoch RSS after a warm-up (the first 20 % of
the epochs, at least 3), in MB per epoch and over the run; the JSON holds every epoch. At the end the
script checks that no worker process is left. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB / 1024
    except (OSError, IndexError, ValueError):
        return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size in MB: shared pages (a forked worker shares most of the parent's) are split
    between the processes sharing them, so worker PSS is the memory the workers really add."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (the loader workers of the main process)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """Samples the main process's RSS and its children's total RSS; ``mark()`` starts a new epoch record."""

    def __init__(self, period: float = 0.25):
        super().__init__(daemon=True)
        self.period = period
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.epochs: list[dict] = []
        self.current: dict | None = None

    def mark(self, epoch: int) -> None:
        with self.lock:
            now = rss_mb()
            self.current = {"epoch": epoch, "t": time.perf_counter(), "main_start_mb": now, "main_end_mb": now,
                            "main_peak_mb": now, "workers_peak_mb": 0.0, "workers_pss_peak_mb": 0.0,
                            "workers_max": 0}
            self.epochs.append(self.current)

    def end(self) -> None:
        """The epoch's evaluation and checkpoints are done."""
        with self.lock:
            if self.current is not None:
                self.current["main_end_mb"] = rss_mb()
                self.current["s"] = round(time.perf_counter() - self.current.pop("t"), 2)

    def run(self) -> None:
        while not self.stop.wait(self.period):
            main = rss_mb()
            kids = children(self.pid)
            total = sum(rss_mb(k) for k in kids)
            pss = sum(pss_mb(k) for k in kids)
            with self.lock:
                if self.current is not None:
                    c = self.current
                    c["main_peak_mb"] = max(c["main_peak_mb"], main)
                    c["workers_peak_mb"] = max(c["workers_peak_mb"], total)
                    c["workers_pss_peak_mb"] = max(c["workers_pss_peak_mb"], pss)
                    c["workers_max"] = max(c["workers_max"], len(kids))


def make_config(args: argparse.Namespace, data_root: Path, teacher: str, out: Path, epochs: int):
    from detkd.config import Config, DataConfig, DigitsConfig, DistillConfig, MethodConfig, ModelConfig, TrainConfig

    def model(fpn: int) -> ModelConfig:
        return ModelConfig(arch=args.arch, backbone="resnet18", num_classes=10, fpn_channels=fpn, min_size=args.size,
                           max_size=args.size, norm="bn", anchor_sizes=[16, 32, 64, 128, 256],
                           detections_per_img=20)

    digits = DigitsConfig(image_size=args.size, train_images=args.train_images, val_images=args.train_images // 4,
                          min_digits=1, max_digits=3, scale_min=1.0, scale_max=1.6, seed=0)
    data = DataConfig(format="digits", root=str(data_root), batch_size=8, workers=args.workers, hflip=0.5,
                      digits=digits)
    train = TrainConfig(epochs=epochs, optimizer="sgd", lr=0.01, warmup_iters=20, schedule="cosine", eval_every=1,
                        clip_grad=10.0, keep_last=1, log_every=50, seed=0, device="cpu")
    cfg = Config(data=data, model=model(16), train=train, output_dir=str(out))
    if args.method != "none":
        cfg.distill = DistillConfig(teacher=model(32), teacher_checkpoint=teacher,
                                    methods=[MethodConfig(args.method, options={"k": 4}
                                                          if args.method == "global" else {})])
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--method", default="global", help="distillation method, or none for plain training")
    ap.add_argument("--arch", default="retinanet", choices=["retinanet", "fcos", "faster_rcnn"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-images", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "soak.json"))
    ap.add_argument("--out", default="", help="run folder (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from detkd.engine import trainer
    from detkd.models import build_detector
    from detkd.runtime.checkpoint import save_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="detkd_soak_"))
    atexit.register(shutil.rmtree, tmp, True)  # data, teacher and checkpoints: about 0.5 GB
    out = Path(args.out) if args.out else tmp / "run"
    data_root = tmp / "digits"
    torch.manual_seed(1)
    teacher = str(tmp / "teacher.pt")
    cfg0 = make_config(args, data_root, teacher, tmp / "calibrate", 2)
    if cfg0.distill is not None:
        save_checkpoint(teacher, {"model": build_detector(cfg0.distill.teacher).state_dict()})

    sampler = Sampler()
    original = trainer.train_one_epoch

    def marked(run, *rest, **kw):
        sampler.mark(run.state.epoch)
        return original(run, *rest, **kw)

    original_rotate = trainer.rotate_epoch_checkpoints

    def rotated(*a, **kw):  # called once per epoch, after the evaluation and the checkpoints
        original_rotate(*a, **kw)
        sampler.end()

    trainer.train_one_epoch = marked
    trainer.rotate_epoch_checkpoints = rotated
    sampler.start()

    t0 = time.perf_counter()
    trainer.fit(cfg0, progress=False)  # calibration (also generates the data)
    per_epoch = (time.perf_counter() - t0) / 2
    epochs = max(10, int(args.minutes * 60 / per_epoch))
    print(f"calibration: {per_epoch:.1f} s per epoch -> {epochs} epochs for {args.minutes} min", flush=True)
    sampler.epochs.clear()

    cfg = make_config(args, data_root, teacher, out, epochs)
    t1 = time.perf_counter()
    trainer.fit(cfg, progress=False)
    wall = time.perf_counter() - t1
    time.sleep(1.0)
    after_fit = rss_mb()
    sampler.stop.set()
    sampler.join()
    trainer.train_one_epoch = original
    trainer.rotate_epoch_checkpoints = original_rotate

    leftover = [p.pid for p in multiprocessing.active_children()] + children(os.getpid())
    rows = sampler.epochs
    xs = [r["epoch"] for r in rows]
    ys = [r["main_end_mb"] for r in rows]
    warm = max(3, len(rows) // 5)
    fx, fy = xs[warm:], ys[warm:]
    mx, my = sum(fx) / len(fx), sum(fy) / len(fy)
    slope = sum((x - mx) * (y - my) for x, y in zip(fx, fy)) / max(1e-12, sum((x - mx) ** 2 for x in fx))
    workers = [r["workers_peak_mb"] for r in rows]
    workers_pss = [r["workers_pss_peak_mb"] for r in rows]
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "arch": args.arch,
        "method": args.method,
        "workers": args.workers,
        "image_size": args.size,
        "train_images": args.train_images,
        "epochs": epochs,
        "iterations": epochs * (args.train_images // 8),
        "wall_s": round(wall, 1),
        "warmup_epochs": warm,
        "main_rss_start_mb": round(rows[0]["main_start_mb"], 1),
        "main_rss_first_mb": round(ys[0], 1),
        "main_rss_after_warmup_mb": round(fy[0], 1),
        "main_rss_last_mb": round(ys[-1], 1),
        "main_rss_max_mb": round(max(r["main_peak_mb"] for r in rows), 1),
        "main_rss_after_fit_mb": round(after_fit, 1),
        "main_slope_mb_per_epoch": round(slope, 4),
        "main_growth_after_warmup_mb": round(slope * (fx[-1] - fx[0]), 2),
        "workers_peak_first_mb": round(workers[0], 1) if workers else 0.0,
        "workers_peak_last_mb": round(workers[-1], 1) if workers else 0.0,
        "workers_peak_max_mb": round(max(workers), 1) if workers else 0.0,
        "workers_pss_peak_first_mb": round(workers_pss[0], 1) if workers_pss else 0.0,
        "workers_pss_peak_last_mb": round(workers_pss[-1], 1) if workers_pss else 0.0,
        "workers_pss_peak_max_mb": round(max(workers_pss), 1) if workers_pss else 0.0,
        "workers_per_epoch_max": max((r["workers_max"] for r in rows), default=0),
        "leftover_processes": leftover,
        "per_epoch": rows,
    }
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"\n{'epoch':>6} {'main start MB':>14} {'main end MB':>12} {'main peak MB':>13} {'workers RSS MB':>15} "
          f"{'workers PSS MB':>15} {'workers':>8}")
    step = max(1, len(rows) // 15)
    for r in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else []):
        print(f"{r['epoch']:>6} {r['main_start_mb']:>14.1f} {r['main_end_mb']:>12.1f} {r['main_peak_mb']:>13.1f} "
              f"{r['workers_peak_mb']:>15.1f} {r['workers_pss_peak_mb']:>15.1f} {r['workers_max']:>8}")
    print(f"\n{summary['machine']}, {args.threads} thread(s), {args.workers} workers, {args.arch} "
          f"{args.method}, {epochs} epochs in {wall / 60:.1f} min")
    print(f"main RSS at the end of an epoch: {ys[0]:.1f} MB after epoch 0, {fy[0]:.1f} MB after the {warm} warm-up "
          f"epochs, {ys[-1]:.1f} MB after the last; slope after warm-up {slope:+.3f} MB/epoch "
          f"({summary['main_growth_after_warmup_mb']:+.1f} MB over {fx[-1] - fx[0]} epochs); {after_fit:.1f} MB "
          "after fit returned")
    print(f"workers: peak total RSS {summary['workers_peak_first_mb']:.1f} MB (PSS "
          f"{summary['workers_pss_peak_first_mb']:.1f} MB) in the first epoch, {summary['workers_peak_last_mb']:.1f} "
          f"MB (PSS {summary['workers_pss_peak_last_mb']:.1f} MB) in the last; leftover processes after fit: "
          f"{leftover or 'none'}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
