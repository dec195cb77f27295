"""What the teacher costs a distilled step, and what the teacher cache and a cheaper live teacher save.

    python benchmarks/bench_teacher.py [--device cpu|cuda] [--steps 8] [--threads 1]
        [--archs faster_rcnn retinanet] [--methods fitnet fgfi ...] [--no-variants] [--per-method] [--bf16]
        [--pair digits|coco] [--size PX]

Same configurations, data and timing protocol as benchmarks/bench_step.py (digits configs, 96 px, batch
8, ResNet-34 FPN-128 teacher, ResNet-18 FPN-32 student, untrained teacher, fixed batches; all
configurations of a family in ONE child process, steps taken in turn, median CPU time on CPU / wall time
on CUDA; ``--pair coco``: the papers' ResNet-101 -> ResNet-50 pair of configs/coco, FPN-256 both, batch 2,
on digits scenes of ``--size`` px, default 800; use ``--train-images 4``, two batches), for:

- ``student``: the student alone;
- ``teacher``: the student through the taps plus the live teacher forward (merged request), no distiller,
  and its variants: ``teacher inference_mode`` (outputs cloned, as a distiller could not use them
  otherwise), ``teacher bf16`` / ``teacher fp16`` (``distill.teacher_dtype``, autocast), ``teacher
  channels_last`` (``distill.teacher_channels_last``);
- ``METHOD``: the full training step with the live teacher (the cache off);
- ``METHOD +cache``: the same with ``distill.teacher_cache`` on, in memory, filled during the warm-up
  steps (every timed step reuses the teacher's outputs, as from the second epoch on);
- ``METHOD +cache_bf16`` (``--bf16``): the same with ``distill.teacher_dtype: bfloat16``, so what the teacher
  still computes live (the RoI head on the student's RoIs, CrossKD's head tail) runs under bfloat16 autocast.

``--per-method``: one child per method (student, METHOD, METHOD +cache) rather than one per family: with
some 30 configurations in one process a few of them (FGFI and MGD on Faster R-CNN) ran 2x slower than
alone, which a child of three does not show. Prints per family the step times and the ratios to the student
alone (of the same child) (the targets of the cache:
<= 1.10 for feature methods, <= 1.25 for methods that run the teacher's RoI head on the student's RoIs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_step import (  # the script's own folder is on sys.path
    METHODS,
    PAIR_BATCH,
    PAIRS,
    arch_methods,
    build_config,
    load_batches,
    merged_request,
    prepare,
    train_step,
)
from machine import RunStamp, add_timing_args, check_device, device_name, run_child

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCHS = ["faster_rcnn", "retinanet"]
VARIANTS = ["teacher", "teacher_inference", "teacher_bf16", "teacher_fp16", "teacher_cl"]
ROI_TARGET, FEATURE_TARGET = 1.25, 1.10


def build(name: str, arch: str, args: dict) -> dict:
    """A bench_step configuration, or a live-teacher variant, or a method with the teacher cache."""
    from torch import nn

    from detkd.engine.step import DistillStep
    from detkd.engine.teacher_cache import TeacherCache, live_teacher, prepare_teacher
    from detkd.taps import tap_student, transform_batch

    if name in VARIANTS:
        c = build_config("teacher", arch, args)
        step = c["step"]
        teacher = step.teacher
        request = merged_request(arch, teacher, step.student)
        dtype = {"teacher_bf16": torch.bfloat16, "teacher_fp16": torch.float16}.get(name, torch.float32)
        if name == "teacher_cl":
            prepare_teacher(teacher, True)

        def forward(images, targets):
            image_list, tgts = transform_batch(step.student, images, targets)
            det_losses, s_taps = tap_student(step.student, image_list, tgts, request)
            if name == "teacher_inference":
                with torch.inference_mode():
                    taps = live_teacher(teacher, image_list, tgts, request, s_taps)
                [f.clone() for f in taps.features]  # inference tensors cannot be saved for backward
            else:
                live_teacher(teacher, image_list, tgts, request, s_taps, dtype)
            return det_losses, {}

        c.update(name=name, forward=forward, step=DistillStep(step.student, nn.ModuleList(), [], teacher))
        return c
    method, _, cache_kind = name.partition("+")
    c = build_config(method, arch, args)
    if cache_kind:  # "cache": float32 teacher; "cache_bf16": its RoI head / live passes in bfloat16
        step = c["step"]
        dtype = "bfloat16" if cache_kind == "cache_bf16" else "auto"
        step.cache = TeacherCache(step.teacher, step.request, teacher_dtype=dtype)
        c["name"] = name
    c["info"]["roi"] = bool(c["step"].request.roi_outputs) if c["step"].distillers else False
    return c


def child(args: dict) -> dict:
    arch = args["arch"]
    configs = [build(n, arch, args) for n in args["configs"]]
    device = torch.device(args["device"])
    batches = load_batches(configs[0]["cfg"], device, args["batches"])
    key = "cpu" if device.type == "cpu" else "wall"
    times: dict[str, dict[str, list[float]]] = {c["name"]: {"wall": [], "cpu": []} for c in configs}
    warmup = max(args["warmup"], len(batches))  # the cache holds every batch before timing starts
    for s in range(warmup + args["steps"]):
        for c in configs:
            batch = batches[s % len(batches)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(c, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if s >= warmup:
                times[c["name"]]["wall"].append(time.perf_counter() - t0)
                times[c["name"]]["cpu"].append(time.process_time() - c0)
        print(f"  {arch}: step {s + 1}/{warmup + args['steps']}", file=sys.stderr, flush=True)
    out = {}
    for c in configs:
        t = times[c["name"]]
        out[c["name"]] = {"wall_s": statistics.median(t["wall"]), "cpu_s": statistics.median(t["cpu"]),
                          "s": statistics.median(t[key]), **c["info"]}
        cache = getattr(c["step"], "cache", None)
        if cache is not None:
            out[c["name"]]["hits"] = cache.hits
            out[c["name"]]["cache_mb"] = cache.memory_used / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(ap, steps=8, warmup=2, threads=1)  # at least one warm-up step per batch
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--train-images", type=int, default=16, help="digits training images (2 batches of 8)")
    ap.add_argument("--pair", default="digits", choices=sorted(PAIRS),
                    help="digits: the digits configs (96 px); coco: the papers' ResNet-101 -> ResNet-50 pair")
    ap.add_argument("--size", type=int, default=0, help="image size in px (default: the pair's, coco 800)")
    ap.add_argument("--no-variants", action="store_true", help="skip the live-teacher variants")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                    help="which live-teacher variants (teacher: the default live teacher, their reference)")
    ap.add_argument("--bf16", action="store_true", help="also METHOD+cache_bf16 (distill.teacher_dtype bfloat16)")
    ap.add_argument("--per-method", action="store_true",
                    help="one child process per method (student, METHOD, METHOD +cache) instead of one per family")
    a = ap.parse_args()
    if a.child:
        run_child(a.child, child)
        return
    check_device(a.device)
    torch.set_num_threads(a.threads)
    stamp = RunStamp()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_teacher_") as tmp:
        data_root, teachers = prepare(Path(tmp), a.archs, a.train_images, a.pair, a.size)
        base = {"device": a.device, "threads": a.threads, "data_root": data_root, "teachers": teachers,
                "train_images": a.train_images, "steps": a.steps, "warmup": a.warmup,
                "batches": max(1, a.train_images // PAIR_BATCH[a.pair]), "pair": a.pair, "size": a.size}
        for arch in a.archs:
            methods = arch_methods(arch, a.methods)
            groups = [["student", *([] if a.no_variants else [v for v in VARIANTS if v in a.variants])]]
            pairs = [[m, f"{m}+cache", *([f"{m}+cache_bf16"] if a.bf16 else [])] for m in methods]
            if a.per_method:  # each method next to its own student-alone reference
                groups = [g for g in groups if len(g) > 1] + [["student", *p] for p in pairs]
            else:
                groups[0] += [n for p in pairs for n in p]
            results[arch] = {}
            for names in groups:
                print(f"{arch}: {len(names)} configurations in turn: {' '.join(names)}", file=sys.stderr, flush=True)
                env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
                proc = subprocess.run([sys.executable, __file__, "--child",
                                       json.dumps({**base, "arch": arch, "configs": names})],
                                      env=env, stdout=subprocess.PIPE, text=True, check=False)
                if proc.returncode != 0:
                    sys.exit(f"child failed ({proc.returncode}) for {arch}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                ref = r.pop("student")
                for x in r.values():  # ratios to the student of the same child
                    x["x_student"] = x["s"] / ref["s"]
                results[arch].setdefault("student", {**ref, "x_student": 1.0})
                results[arch].update(r)
    unit = "CPU s (process, all threads)" if a.device == "cpu" else "wall s (synchronised)"
    print(f"# bench_teacher {stamp.start}, pair {a.pair} ({a.size or 'its own'} px), device {a.device} "
          f"({device_name(a.device)}), {a.threads} threads, torch "
          f"{torch.__version__}, {a.steps} steps after the warm-up, {stamp.load()}; median {unit} "
          f"per training step; x student: ratio to the student alone, measured side by side in one process")
    for arch, r in results.items():
        print(f"\n{arch}\n{'configuration':<26} {'step s':>7} {'wall s':>7} {'x student':>9} {'x teacher':>9}  target")
        t0 = r.get("teacher", {}).get("s")
        for n, x in r.items():
            target = ""
            if "+cache" in n:
                limit = ROI_TARGET if x.get("roi") else FEATURE_TARGET
                target = f"<= {limit:.2f} {'met' if x['x_student'] <= limit else 'MISSED'}"
                target += f" ({x['hits']} images reused, {x['cache_mb']:.0f} MB)"
            xt = f"{x['s'] / t0:9.2f}" if t0 and n in VARIANTS + ["student"] else f"{'-':>9}"
            print(f"{n:<26} {x['s']:7.3f} {x['wall_s']:7.3f} {x['x_student']:9.2f} {xt}  {target}")


if __name__ == "__main__":
    main()
