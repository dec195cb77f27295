"""Cost of one distillation training step, per method, next to the student alone and the teacher forward.

    python benchmarks/bench_step.py [--device cpu|cuda] [--steps 20] [--warmup 3] [--threads 2]
        [--archs faster_rcnn retinanet] [--methods fitnet fgfi ...] [--train-images 64] [--no-memory]
        [--pair digits|coco] [--size PX]

Configurations, for each detector family, all built from the digits configs
(``configs/digits/{arch}_r34_r18_{method}.yaml``: 96 px images, batch 8, ResNet-34 FPN-128 teacher,
ResNet-18 FPN-32 student, Faster R-CNN box_batch_size_per_image 128) with an untrained teacher:

- ``student``: the student alone (a plain training run: ``DistillStep`` without teacher);
- ``+teacher``: the student through the taps plus the teacher forward with the request merged from ALL
  distillers (features, and RoI outputs for Faster R-CNN / dense head outputs for RetinaNet), no distiller;
- ``+teacher (features)``: the same with the teacher asked for its features only (what fitnet, fgfi, rkd,
  fgd need), so that every method can also be compared with the teacher forward of its OWN request;
- ``+METHOD``: (the methods that support the family: crosskd is RetinaNet / FCOS only)
  ``detkd.engine.assemble.build_models`` + ``DistillStep`` with that one method: exactly the
  training step (forward, backward, optimizer step). Prototype methods (``global``) select their
  prototypes once before timing (:meth:`on_epoch_start`, as before an epoch; the refresh is per epoch,
  not per step).

Every step runs on the same fixed batches of the digits data set (generated into a temporary folder).
``--pair coco``: the papers' ResNet-101 -> ResNet-50 pair of configs/coco instead (FPN-256 both, batch 2,
512 sampled RoIs per image, random weights) on digits scenes of ``--size`` px (default 800).

Time: all configurations of a family live in ONE child process and take their steps in turn (round robin),
so that a change of the background load hits every configuration alike; the median over ``--steps`` steps
after ``--warmup`` steps of the wall time and, on CPU, of the process CPU time (all threads). On a shared,
oversubscribed CPU the wall time swings by +-30 % from step to step with the other processes' load, the CPU
time by about 3 %, so on CPU the ratios and the verdict use the CPU time (on CUDA: wall time, synchronised).

Work: one more step of each configuration under ``torch.utils.flop_counter.FlopCounterMode`` (forward and
backward of the matrix products and convolutions; RoIAlign, NMS and element-wise ops are not counted):
GFLOP per step and its ratio to the teacher forward of the method's own request. It does not depend on the
load, so it tells a cost the method's loss needs (a generator, a second head pass) from a slow implementation.

Memory: every configuration runs again in a fresh child process; CPU: growth of the peak resident memory
(VmHWM, reset through /proc/self/clear_refs after the models and batches exist) over ``--warmup`` steps,
with a fixed glibc mmap threshold so that freed heap memory cannot hide allocations; CUDA:
``torch.cuda.max_memory_allocated`` minus what was allocated before the first step. Both include the
gradients and the optimizer state created by the first step.

Children run with OMP_WAIT_POLICY=PASSIVE (see benchmarks/bench_pgm.py: spinning OpenMP threads are very
slow on a shared, oversubscribed CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import RunStamp, add_timing_args, check_device, device_name, run_child  # the script's own folder
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ["fitnet", "fgfi", "defeat", "kd", "rkd", "fgd", "gid", "global", "pkd", "cwd", "mgd", "crosskd"]
ARCHS = ["faster_rcnn", "retinanet"]
TARGET = 1.10  # each distiller at most 10 % over "+teacher"


# ----------------------------------------------------------------------------------------------------------
# Building one configuration (in a child)


# The teacher / student pairs a step can be timed on. "digits": the digits configs (96 px, batch 8,
# ResNet-34 FPN-128 teacher, ResNet-18 FPN-32 student, Faster R-CNN box_batch_size_per_image 128). "coco":
# the papers' pair of configs/coco (ResNet-101 -> ResNet-50, FPN-256 both, frozen BN, batch 2, 512 sampled
# RoIs per image) on digits scenes rendered at ``size`` px (800 = the papers' short side), random weights,
# the digits' 10 classes (COCO's 80 would widen only the heads' last layers).
PAIRS = {"digits": "configs/digits/{arch}_r34_r18_fitnet.yaml", "coco": "configs/coco/{arch}_r101_r50_fitnet.yaml"}
PAIR_BATCH = {"digits": 8, "coco": 2}  # the configs' data.batch_size: images per fixed batch


def load_cfg(arch: str, method: str, data_root: str, teacher_ckpt: str, train_images: int, device: str,
             pair: str = "digits", size: int = 0):
    """The ``pair`` config of ``arch`` distilled with ``method`` (any method: only ``methods`` differs);
    ``size`` > 0 renders the digits scenes and sizes both models' inputs at ``size`` px."""
    from detkd.config import MethodConfig, load_config

    over = [f"distill.teacher_checkpoint={teacher_ckpt}", f"data.root={data_root}", "data.workers=0",
            f"data.digits.train_images={train_images}", "data.digits.val_images=4", f"train.device={device}"]
    if pair == "coco":  # no download: random weights; digits scenes in place of COCO images
        over += ["model.backbone_weights=none", "distill.teacher.backbone_weights=none", "data.format=digits",
                 "data.hflip=0.0", "train.amp=false", "model.num_classes=10", "distill.teacher.num_classes=10"]
        size = size or 800
    if size:
        over += [f"data.digits.image_size={size}", *(f"{m}.{k}={size}" for m in ("model", "distill.teacher")
                                                      for k in ("min_size", "max_size"))]
    cfg = load_config(REPO / PAIRS[pair].format(arch=arch), over)
    cfg.distill.methods = [MethodConfig(method)]
    return cfg


def arch_methods(arch: str, methods: list[str]) -> list[str]:
    """The methods of ``methods`` that support ``arch`` (crosskd: one-stage only)."""
    from detkd.distill import REGISTRY

    return [m for m in methods if arch in REGISTRY[m].archs]


def merged_request(arch: str, teacher, student):
    """TapRequest merged over every distiller of ``arch`` (what "+teacher" asks of the teacher; with crosskd
    on a one-stage family it includes the head walk of both detectors, ``head_layer``)."""
    from detkd.distill import build_distiller
    from detkd.models import feature_channels
    from detkd.taps import TapRequest

    t_ch, s_ch = feature_channels(teacher), feature_channels(student)
    req = TapRequest(features=True)
    for m in arch_methods(arch, METHODS):
        req = req.merge(build_distiller(m, {}, t_ch, s_ch, arch).request())
    return req


def build_config(name: str, arch: str, args: dict) -> dict:
    """Models, optimizer and the step function of configuration ``name`` (student | teacher | a method)."""
    import copy

    from torch import nn

    from detkd.distill.base import DistillContext
    from detkd.engine.assemble import build_models, feature_loader
    from detkd.engine.schedule import build_optimizer
    from detkd.engine.step import DistillStep
    from detkd.taps import tap_student, tap_teacher, transform_batch

    device = torch.device(args["device"])
    method = name if name in METHODS else "fitnet"
    cfg = load_cfg(arch, method, args["data_root"], args["teachers"][arch], args["train_images"], args["device"],
                   args.get("pair", "digits"), args.get("size", 0))
    torch.manual_seed(0)
    info: dict = {}
    if name == "student":
        plain = copy.deepcopy(cfg)
        plain.distill = None
        _, _, step = build_models(plain, device)
        forward = step
    elif name in ("teacher", "teacher_feat"):
        from detkd.taps import TapRequest

        student, teacher, step = build_models(cfg, device)
        request = merged_request(arch, teacher, student) if name == "teacher" else TapRequest(features=True)
        info["request"] = str(request)
        step = DistillStep(student, nn.ModuleList(), [], teacher)  # no distiller

        def forward(images, targets):
            image_list, tgts = transform_batch(step.student, images, targets)
            det_losses, s_taps = tap_student(step.student, image_list, tgts, request)  # head_layer: the walk
            tap_teacher(step.teacher, image_list, tgts, request, s_taps)
            return det_losses, {}
    else:
        from dataclasses import replace

        from detkd.taps import TapRequest

        student, teacher, step = build_models(cfg, device)
        forward = step
        own = replace(step.request, features=True)  # tap_teacher computes the features whatever is asked
        info["own"] = ("teacher_feat" if own == TapRequest(features=True) else
                       "teacher" if own == merged_request(arch, teacher, student) else "")
        ctx = DistillContext(teacher=teacher, student=student, loader=feature_loader(cfg), device=device,
                             epoch=0, epochs=cfg.train.epochs)
        t0 = time.perf_counter()
        for d in step.distillers:
            d.on_epoch_start(ctx)  # prototype selection (global), once, outside the timed steps
        info["epoch_start_s"] = time.perf_counter() - t0
    step.student.train()
    params = list(step.student.parameters()) + list(step.distillers.parameters())
    opt = build_optimizer(params, cfg.train)
    return {"name": name, "cfg": cfg, "step": step, "forward": forward, "opt": opt, "info": info}


def load_batches(cfg, device: torch.device, n_batches: int) -> list:
    """Fixed training batches (float images on ``device``, detector targets), prepared as the trainer does."""
    from detkd.data import build_dataset, build_loader, model_targets

    ds = build_dataset(cfg.data, "train", cfg.model)
    loader = build_loader(ds, cfg.data.batch_size, 0, shuffle=False, drop_last=True)
    out = []
    for images, targets in loader:
        imgs = [img.to(device).float() / 255.0 for img in images]
        tgts = [{k: v.to(device) for k, v in t.items()} for t in model_targets(targets)]
        out.append((imgs, tgts))
        if len(out) == n_batches:
            break
    return out


def train_step(c: dict, batch) -> None:
    """One training step as in ``train_one_epoch``: forward, summed loss, backward, optimizer step."""
    images, targets = batch
    det_losses, kd_losses = c["forward"](images, targets)
    loss = sum({**det_losses, **kd_losses}.values())
    c["opt"].zero_grad(set_to_none=True)
    loss.backward()
    c["opt"].step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))


def child_time(args: dict) -> dict:
    """All configurations of one family, steps taken in turn; median seconds per step of each."""
    arch = args["arch"]
    configs = [build_config(n, arch, args) for n in args["configs"]]
    device = torch.device(args["device"])
    batches = load_batches(configs[0]["cfg"], device, args["batches"])
    wall: dict[str, list[float]] = {c["name"]: [] for c in configs}
    cpu: dict[str, list[float]] = {c["name"]: [] for c in configs}
    for s in range(args["warmup"] + args["steps"]):
        for c in configs:
            batch = batches[s % len(batches)]
            _sync(args["device"])
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(c, batch)
            _sync(args["device"])
            if s >= args["warmup"]:
                wall[c["name"]].append(time.perf_counter() - t0)
                cpu[c["name"]].append(time.process_time() - c0)
        print(f"  {arch}: step {s + 1}/{args['warmup'] + args['steps']}", file=sys.stderr, flush=True)
    flops = {}
    for c in configs:  # one more step each, counted: the work a step needs, whatever the machine's load
        with FlopCounterMode(display=False) as counter:
            train_step(c, batches[0])
        flops[c["name"]] = counter.get_total_flops()
    return {c["name"]: {"wall_s": statistics.median(wall[c["name"]]), "cpu_s": statistics.median(cpu[c["name"]]),
                        "gflop": flops[c["name"]] / 1e9, **c["info"]} for c in configs}


def child_memory(args: dict) -> dict:
    """Peak memory growth of one configuration in a fresh process: over all of ``max(2, warmup)`` steps
    from before the first (``peak_mb``: includes the gradients and the optimizer state the first step
    creates), and within the later steps above the state held between steps (``step_mb``: activations,
    gradients, the distiller's temporaries)."""
    device = torch.device(args["device"])
    c = build_config(args["configs"][0], args["arch"], args)
    batches = load_batches(c["cfg"], device, args["batches"])
    cuda = device.type == "cuda"

    def reset_peak() -> int:
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return _status_kb("VmRSS") * 1024

    def peak() -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_kb("VmHWM") * 1024

    base = reset_peak()
    train_step(c, batches[0])
    first_peak = peak()
    c["opt"].zero_grad(set_to_none=True)  # between steps: no gradients held (the trainer's state too)
    between = reset_peak()
    for s in range(1, max(2, args["warmup"])):
        train_step(c, batches[s % len(batches)])
    later_peak = peak()
    return {"peak_mb": (max(first_peak, later_peak) - base) / 2**20, "step_mb": (later_peak - between) / 2**20}


# ----------------------------------------------------------------------------------------------------------
# Parent


def spawn(args: dict, memory: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # fixed threshold: big blocks are mmapped and unmapped on free
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps({**args, "memory": memory})],
                          env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}) for {args['arch']} {args['configs']}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(tmp: Path, archs: list[str], train_images: int, pair: str = "digits",
            size: int = 0) -> tuple[str, dict[str, str]]:
    """Digits data in ``tmp`` and an untrained teacher checkpoint per family (the cost does not depend on
    the teacher's training)."""
    from detkd.models import build_detector
    from detkd.runtime.checkpoint import save_checkpoint

    data_root = str(tmp / "digits")
    teachers = {}
    for arch in archs:
        cfg = load_cfg(arch, "fitnet", data_root, "none", train_images, "cpu", pair, size)
        torch.manual_seed(0)
        path = tmp / f"teacher_{arch}.pt"
        save_checkpoint(path, {"model": build_detector(cfg.distill.teacher).state_dict()})
        teachers[arch] = str(path)
    from detkd.data import ensure_digits

    cfg = load_cfg(archs[0], "fitnet", data_root, "none", train_images, "cpu", pair, size)
    ensure_digits(data_root, cfg.data.digits)
    return data_root, teachers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(ap, steps=20, warmup=3, threads=2)  # warm-up steps are also the memory run's steps
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--train-images", type=int, default=64, help="digits training images (batches + prototypes)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    ap.add_argument("--pair", default="digits", choices=sorted(PAIRS),
                    help="digits: the digits configs (96 px); coco: the papers' ResNet-101 -> ResNet-50 pair")
    ap.add_argument("--size", type=int, default=0, help="image size in px (default: the pair's, coco 800)")
    a = ap.parse_args()

    if a.child:
        run_child(a.child, lambda args: child_memory(args) if args["memory"] else child_time(args))
        return

    check_device(a.device)
    torch.set_num_threads(a.threads)
    stamp = RunStamp()
    names = {arch: ["student", "teacher", "teacher_feat", *arch_methods(arch, a.methods)] for arch in a.archs}
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        data_root, teachers = prepare(Path(tmp), a.archs, a.train_images, a.pair, a.size)
        base = {"device": a.device, "threads": a.threads, "data_root": data_root, "teachers": teachers,
                "train_images": a.train_images, "steps": a.steps, "warmup": a.warmup,
                "batches": max(1, a.train_images // PAIR_BATCH[a.pair]), "pair": a.pair, "size": a.size}
        for arch in a.archs:
            print(f"{arch}: timing {len(names[arch])} configurations in turn", file=sys.stderr, flush=True)
            results[arch] = spawn({**base, "arch": arch, "configs": names[arch]}, memory=False)
            if not a.no_memory:
                for n in names[arch]:
                    print(f"{arch}: memory of {n}", file=sys.stderr, flush=True)
                    results[arch][n].update(spawn({**base, "arch": arch, "configs": [n]}, memory=True))

    key = "cpu_s" if a.device == "cpu" else "wall_s"
    mem_name = "peak RSS growth" if a.device == "cpu" else "peak CUDA alloc growth"
    print(f"# bench_step {stamp.start}, pair {a.pair} ({a.size or 'its own'} px), device {a.device} "
          f"({device_name(a.device)}), {a.threads} threads, torch "
          f"{torch.__version__}, {a.steps} steps after {a.warmup} warm-up, {stamp.load()}")
    print(f"# step: median wall s and {'CPU s (process, all threads)' if a.device == 'cpu' else '-'} per training "
          f"step; memory: {mem_name} (MB) over the first steps (peak) and within a later step above the state "
          f"between steps (step); x teach: ratio to 'student + teacher forward' (merged request); x own: to the "
          f"teacher forward of the method's own request; verdict: time and step memory x own <= {TARGET:.2f}")
    for arch in a.archs:
        print_table(arch, results[arch], names[arch], key)


def print_table(arch: str, r: dict, names: list[str], key: str) -> None:
    label = {"student": "student alone", "teacher": "student + teacher forward",
             "teacher_feat": "student + teacher (features)"}
    print(f"\n{arch}")
    print(f"{'':<29} {'time':-^31} {'memory':-^47} {'work':-^15}")
    print(f"{'configuration':<29} {'wall s':>7} {'CPU s':>7} {'x teach':>7} {'x own':>7} {'peak MB':>7} "
          f"{'x teach':>7} {'step MB':>7} {'x teach':>7} {'x own':>7} {'GFLOP':>7} {'x own':>7}  verdict")

    def ratio(n: str, ref: str, field: str) -> float | None:
        if not ref or r[n].get(field) is None or not r[ref].get(field):
            return None
        return r[n][field] / r[ref][field]

    def fmt(v: float | None, spec: str) -> str:
        return f"{v:{spec}}" if v is not None else f"{'-':>7}"

    for n in names:
        x = r[n]
        own = x.get("own", "")
        t_teach, t_own = ratio(n, "teacher", key), ratio(n, own, key)
        p_teach = ratio(n, "teacher", "peak_mb")
        m_teach, m_own = ratio(n, "teacher", "step_mb"), ratio(n, own, "step_mb")
        f_own = ratio(n, own, "gflop")
        verdict = ""
        if n in METHODS:
            t_ref, m_ref = t_own or t_teach, m_own or m_teach
            ok = t_ref <= TARGET and (m_ref is None or m_ref <= TARGET)
            verdict = ("met" if ok else "MISSED") + f" (own: {label.get(own, own)})"
        if x.get("epoch_start_s", 0) > 0.05:
            verdict += f"; prototype selection {x['epoch_start_s']:.1f} s once per epoch"
        cpu = x["cpu_s"] if key == "cpu_s" else None
        print(f"{label.get(n, '+ ' + n):<29} {x['wall_s']:7.3f} {fmt(cpu, '7.3f')} {fmt(t_teach, '7.2f')} "
              f"{fmt(t_own, '7.2f')} {fmt(x.get('peak_mb'), '7.0f')} {fmt(p_teach, '7.2f')} "
              f"{fmt(x.get('step_mb'), '7.0f')} {fmt(m_teach, '7.2f')} {fmt(m_own, '7.2f')}"
              f" {fmt(x.get('gflop'), '7.1f')} {fmt(f_own, '7.2f')}  {verdict}")


if __name__ == "__main__":
    main()
