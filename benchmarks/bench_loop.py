"""detkd's training loop against a bare loop, and the data-loading and evaluation shares of an epoch.

    python benchmarks/bench_loop.py [--arch faster_rcnn|retinanet] [--rounds 12] [--train-images 48]
        [--threads 1] [--workers 1] [--device cpu|cuda]

The same student (the digits bench student of ``--arch``: configs/bench/digits/{arch}_student.yaml, 64 px,
batch 8), the same data set and loader settings, in ONE process:

- ``detkd``: :func:`detkd.engine.trainer.train_one_epoch` on a run set up by the trainer itself
  (``set_up``: loaders, model, optimizer, schedule), with everything a real run does per step (finite-loss
  check, logging window, JSONL log every ``train.log_every`` steps, scheduler step);
- ``bare``: a loop in the style of torchvision's ``references/detection/engine.py``: batch to the device,
  forward, sum of the loss dict, the loss as a Python float for the log, zero_grad, backward, optimizer
  step, scheduler step; a separate copy of the model (same initial weights), optimizer and schedule;
- ``bare, same objects``: the same bare loop on detkd's own model, optimizer, schedule and loader, so that
  the two differ in the loop's code alone (separate copies can differ by a few percent on their own).

Epochs alternate (detkd, bare, same, then the reverse order, ...) so that a change of the machine's load
hits all alike; the ratio is of the median epoch times (process CPU time on CPU: the loader's worker processes are not
in it on either side; wall time as well). Data share: time the bare loop spends waiting for the next batch
over its epoch wall time. Evaluation share: one :func:`evaluate_model` on the val split, per image, next to
the training time per image, and what that gives for the digits bench (500 train / 200 val images,
evaluated once after the last of its 4 epochs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare_epoch(model, opt, sched, loader, device) -> dict[str, float]:
    """One epoch as torchvision's reference loop trains it; returns its wall / CPU time and data wait."""
    from detkd.data import prepare_batch

    model.train()
    wait = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    batches = iter(loader)
    while True:
        w0 = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        wait += time.perf_counter() - w0
        images, targets = prepare_batch(images, targets, device)
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        loss_value = float(loss.detach())  # what the reference loop logs (and checks for NaN)
        if loss_value != loss_value:
            raise RuntimeError("bare loop: NaN loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    # the reference loop's `for` drops its iterator when the epoch ends, which stops the loader's workers
    # inside the epoch (detkd's loop stops them explicitly at the same point)
    del batches
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "wait": wait}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="faster_rcnn", choices=["faster_rcnn", "retinanet"])
    ap.add_argument("--rounds", type=int, default=12, help="epochs of each loop (alternating)")
    ap.add_argument("--train-images", type=int, default=48)
    ap.add_argument("--val-images", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="data.workers (the digits benches: 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()

    from detkd.config import load_config
    from detkd.data import build_dataset, build_loader
    from detkd.engine.evaluate import evaluate_model
    from detkd.engine.logger import RunLogger
    from detkd.engine.schedule import build_optimizer, build_scheduler
    from detkd.engine.trainer import seed_and_fix_threads, set_up, start_epoch, train_one_epoch
    from detkd.models import build_detector

    start = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load0 = os.getloadavg()
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        cfg = load_config(REPO / "configs" / "bench" / "digits" / f"{a.arch}_student.yaml", [
            f"data.root={tmp}/digits", f"data.workers={a.workers}", f"data.digits.train_images={a.train_images}",
            f"data.digits.val_images={a.val_images}", f"train.epochs={a.rounds}", f"train.threads={a.threads}",
            f"train.device={a.device}", f"output_dir={tmp}/run", "train.warmup_iters=0"])
        seed_and_fix_threads(cfg)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True)
        run = set_up(cfg, out, device, progress=False)
        run.logger = RunLogger(out)

        torch.manual_seed(cfg.train.seed)
        model = build_detector(cfg.model).to(device)
        model.load_state_dict(run.step.student.state_dict())  # the same start
        train_set = build_dataset(cfg.data, "train", cfg.model)
        loader = build_loader(train_set, cfg.data.batch_size, cfg.data.workers, shuffle=True,
                              seed=cfg.train.seed, drop_last=True)
        opt = build_optimizer(list(model.parameters()), cfg.train)
        sched = build_scheduler(opt, len(loader), cfg.train)

        sides = ("detkd", "bare", "same")
        times: dict[str, dict[str, list[float]]] = {s: {"wall": [], "cpu": [], "wait": []} for s in sides}
        for r in range(a.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                if side == "detkd":
                    start_epoch(run)
                    t0, c0 = time.perf_counter(), time.process_time()
                    train_one_epoch(run)
                    times["detkd"]["wall"].append(time.perf_counter() - t0)
                    times["detkd"]["cpu"].append(time.process_time() - c0)
                    run.state.epoch += 1
                else:
                    res = (bare_epoch(model, opt, sched, loader, device) if side == "bare" else
                           bare_epoch(run.step.student, run.opt, run.sched, run.train_loader, device))
                    for k, v in res.items():
                        times[side][k].append(v)
                print(f"  round {r + 1}/{a.rounds}: {side} done", file=sys.stderr, flush=True)
        run.logger.close()

        t0, c0 = time.perf_counter(), time.process_time()
        evaluate_model(run.step.student, run.val_loader, run.coco_gt, device, False, cfg.eval.max_dets)
        eval_wall, eval_cpu = time.perf_counter() - t0, time.process_time() - c0
        n_val, n_steps = len(run.val_loader.dataset), len(run.train_loader)
        n_train = n_steps * cfg.data.batch_size

    med = {s: {k: statistics.median(v) for k, v in d.items() if v} for s, d in times.items()}
    load1 = os.getloadavg()
    machine = cpu_name() if a.device == "cpu" else torch.cuda.get_device_name()
    print(f"# bench_loop {start}, {a.arch} digits bench student, device {a.device} ({machine}), {a.threads} threads, "
          f"workers {a.workers}, torch {torch.__version__}, {a.rounds} epochs each of {n_train} images (batch "
          f"{cfg.data.batch_size}), alternating in one process; load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"{'loop':<8} {'epoch CPU s':>11} {'epoch wall s':>12} {'img/s (wall)':>12}")
    for s in ("detkd", "bare", "same"):
        print(f"{s:<8} {med[s]['cpu']:11.2f} {med[s]['wall']:12.2f} {n_train / med[s]['wall']:12.1f}")
    print(f"detkd step rate / bare step rate: {med['bare']['cpu'] / med['detkd']['cpu']:.3f} (CPU time), "
          f"{med['bare']['wall'] / med['detkd']['wall']:.3f} (wall); target >= 0.97")
    print(f"detkd step rate / bare loop on detkd's own model, optimizer and loader ('same'): "
          f"{med['same']['cpu'] / med['detkd']['cpu']:.3f} (CPU time), "
          f"{med['same']['wall'] / med['detkd']['wall']:.3f} (wall)")
    # one epoch's time moves by several percent from epoch to epoch even on an idle machine: the ratio of
    # medians resolves a difference of about the spread divided by sqrt(rounds), so print the spread
    spread = {s: statistics.quantiles(times[s]["cpu"], n=4) for s in sides} if a.rounds >= 2 else {}
    for s, (q1, _, q3) in spread.items():
        print(f"{s} epoch CPU s, interquartile range: {q1:.2f}-{q3:.2f} ({(q3 - q1) / med[s]['cpu']:.1%} of the "
              "median)")
    print(f"data loading: the bare loop waits {med['bare']['wait']:.2f} s of its {med['bare']['wall']:.2f} s epoch "
          f"for batches ({med['bare']['wait'] / med['bare']['wall']:.1%}, "
          f"{med['bare']['wait'] / n_steps * 1e3:.1f} ms a batch; {a.workers} worker process(es))")
    per_train = med["detkd"]["wall"] / n_train
    per_val = eval_wall / n_val
    bench_eval = 200 * per_val
    bench_train = 4 * 500 * per_train
    print(f"evaluation: {eval_wall:.2f} s wall ({eval_cpu:.2f} s CPU) for {n_val} val images = {per_val * 1e3:.1f} ms "
          f"per image, training {per_train * 1e3:.1f} ms per image; the digits bench run (4 x 500 train, one "
          f"evaluation of 200): evaluation {bench_eval / (bench_eval + bench_train):.1%} of it; with an "
          f"evaluation every epoch: {4 * bench_eval / (4 * bench_eval + bench_train):.1%}")


if __name__ == "__main__":
    main()
