"""The floor under a Faster R-CNN method that needs the teacher's RoI head: what the teacher's box head
costs on the student's sampled RoIs, next to the student's whole training step.

    python benchmarks/roi_head_cost.py [--steps 10] [--warmup 2] [--threads 1] [--device cpu|cuda]
        [--pair digits|coco] [--size PX]

The configuration of benchmarks/bench_step.py / bench_teacher.py (digits, 96 px, batch 8, ResNet-34
FPN-128 teacher, ResNet-18 FPN-32 student, box_batch_size_per_image 128: 1,024 sampled RoIs a step), or
with ``--pair coco`` the papers' ResNet-101 -> ResNet-50 pair (FPN-256 both, batch 2, 512 RoIs per
image: 1,024 a step) on digits scenes of ``--size`` px (default 800). The
teacher cache removes the teacher's backbone, FPN and RPN, but not this: the RoIs are the student's, new
every step, so ``kd``, ``gid``, ``global`` and DeFeat's RoI term pay the teacher's MultiScaleRoIAlign,
its two fc layers and its predictor on every step, cache or not. Timed in one process, in turn: the
student's training step (forward, backward, AdamW), and the teacher's box head in float32 and under
bfloat16 autocast (``distill.teacher_dtype: bfloat16``), each part on its own. Median CPU time (wall,
synchronised, on CUDA) over ``--steps``; ``x student``: the ratio to the student's step, so ``1 + x``
is the least ``METHOD+cache / student`` that any RoI method can reach on this pair.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from bench_step import (  # the script's folder is on sys.path
    PAIR_BATCH,
    PAIRS,
    build_config,
    load_batches,
    prepare,
    train_step,
)
from machine import RunStamp, check_device, device_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=10, help="timed repetitions of each part")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--pair", default="digits", choices=sorted(PAIRS), help="teacher / student pair")
    ap.add_argument("--size", type=int, default=0, help="image size in px (default: the pair's, coco 800)")
    a = ap.parse_args()
    check_device(a.device)
    torch.set_num_threads(a.threads)
    from detkd.taps import TapRequest, tap_student, tap_teacher, transform_batch

    stamp = RunStamp()
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory(prefix="roi_head_cost_") as tmp:
        n_images = 2 * PAIR_BATCH[a.pair]  # two batches; one is timed
        data_root, teachers = prepare(Path(tmp), ["faster_rcnn"], n_images, a.pair, a.size)
        args = {"device": a.device, "threads": a.threads, "data_root": data_root, "teachers": teachers,
                "train_images": n_images, "pair": a.pair, "size": a.size}
        student_cfg = build_config("student", "faster_rcnn", args)
        kd = build_config("kd", "faster_rcnn", args)
        batch = load_batches(student_cfg["cfg"], device, 1)[0]
    teacher = kd["step"].teacher.eval()
    with torch.no_grad():  # the student's sampled RoIs and the teacher's (cached) features of one batch
        image_list, tgts = transform_batch(kd["step"].student, *batch)
        _, s_taps = tap_student(kd["step"].student, image_list, tgts, TapRequest(features=True))
        t_taps = tap_teacher(teacher, image_list, tgts, TapRequest(features=True))
    rois = [r.detach() for r in s_taps.rois]
    feats = OrderedDict(zip(t_taps.level_names, t_taps.features))
    rh = teacher.roi_heads
    pooled = rh.box_roi_pool(feats, rois, image_list.image_sizes)
    embedded = rh.box_head(pooled)
    parts = {"pool (MultiScaleRoIAlign)": lambda: rh.box_roi_pool(feats, rois, image_list.image_sizes),
             "box_head (fc6, fc7)": lambda: rh.box_head(pooled),
             "box_predictor": lambda: rh.box_predictor(embedded)}
    parts["whole box head"] = lambda: rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, rois,
                                                                                   image_list.image_sizes)))

    def timed(fn) -> float:
        out = []
        for i in range(a.warmup + a.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= a.warmup:
                out.append(time.perf_counter() - t0 if device.type == "cuda" else time.process_time() - c0)
        return statistics.median(out)

    student_s = timed(lambda: train_step(student_cfg, batch))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in parts.items():
            def run(fn=fn, dtype=dtype):
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    fn()
            rows.append((f"teacher {name}, {str(dtype).removeprefix('torch.')}", timed(run)))
    unit = "CPU s" if device.type == "cpu" else "wall s"
    print(f"# roi_head_cost {stamp.start}, pair {a.pair} ({a.size or 'its own'} px), device {a.device} "
          f"({device_name(a.device)}), {a.threads} threads, torch "
          f"{torch.__version__}, {sum(r.shape[0] for r in rois)} RoIs, teacher box head input "
          f"{tuple(pooled.shape[1:])}, {a.steps} repetitions, {stamp.load()}; median {unit}")
    print(f"{'part':<48} {unit:>7} {'x student':>9}")
    print(f"{'student training step':<48} {student_s:7.3f} {1.0:9.2f}")
    for name, s in rows:
        print(f"{name:<48} {s:7.3f} {s / student_s:9.2f}")


if __name__ == "__main__":
    main()
