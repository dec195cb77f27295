"""Scale of every method's distillation terms against the detection loss, on a bench's trained pair.

    python benchmarks/loss_scale.py configs/bench/digits_retinanet.yaml [--seed 0 --batches 4]

For the first seed's rows of a bench whose teacher and pre-trained student exist, it builds each row's
run as the bench does (student = the pre-trained checkpoint, distillers with their default weights,
``distill.balance`` off), forwards a few training batches and prints the mean of each loss term, the
ratio of the distillation terms to the detection loss, and the RMS of teacher and student features per
pyramid level: how far the published weights are from balanced on this pair.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detkd.bench import load_bench, plan_runs  # noqa: E402
from detkd.config import config_from_dict  # noqa: E402
from detkd.data import build_dataset, build_loader, model_targets  # noqa: E402
from detkd.distill.base import DistillContext  # noqa: E402
from detkd.engine.assemble import build_models  # noqa: E402
from detkd.taps import tap_student, transform_batch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg, methods = load_bench(args.bench)
    runs = [r for r in plan_runs(cfg, methods) if r.seed == args.seed and r.command == "distill"]
    first = config_from_dict(copy.deepcopy(runs[0].raw))
    first.train.device = "cpu"
    data = build_dataset(first.data, "train", first.model, train=False)
    loader = build_loader(data, first.data.batch_size, 0, shuffle=False)
    batches = []
    for i, (images, targets) in enumerate(loader):
        if i == args.batches:
            break
        batches.append(([img.float() / 255.0 for img in images], model_targets(targets)))

    print(f"{'row':<20} {'detection':>9} {'distill':>10} {'ratio':>8}  terms")
    rms_done = False
    det_keys: set[str] = set()
    for r in runs:
        c = config_from_dict(copy.deepcopy(r.raw))
        c.train.device = "cpu"
        c.distill.balance = 0.0  # the raw terms: the published weights, no cap
        student, teacher, step = build_models(c, torch.device("cpu"))
        # methods with prototypes select them first, as at the start of their first epoch
        ctx = DistillContext(teacher=teacher, student=student, loader=loader, device=torch.device("cpu"), epoch=0,
                             epochs=c.train.epochs, log=lambda d: None)
        for d in step.distillers:
            d.on_epoch_start(ctx)
        step.train()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for images, targets in batches:
                det, kd = step(images, targets)
                for k, v in {**det, **kd}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
        det_keys = det_keys or _det_keys(step, batches[0])
        det_total = sum(v for k, v in sums.items() if k in det_keys)
        kd_terms = {k: v for k, v in sums.items() if k not in det_keys}
        kd_total = sum(kd_terms.values())
        terms = ", ".join(f"{k} {v:.3g}" for k, v in kd_terms.items())
        print(f"{r.row:<20} {det_total:9.3f} {kd_total:10.3g} {kd_total / det_total:8.2f}  {terms}")
        if not rms_done:
            rms_done = True
            images, targets = batches[0]
            with torch.no_grad():
                il, tg = transform_batch(student, images, targets)
                _, s_taps = tap_student(student, il, tg)
                t_feats = teacher.backbone(il.tensors)
            rms = [(float(t.pow(2).mean().sqrt()), float(s.pow(2).mean().sqrt()))
                   for t, s in zip(t_feats.values(), s_taps.features)]
            print("feature RMS per level (teacher / student): " + "; ".join(f"{a:.3g} / {b:.3g}" for a, b in rms))
    return 0


def _det_keys(step, batch) -> set[str]:
    with torch.no_grad():
        return set(step.student(*batch).keys())


if __name__ == "__main__":
    sys.exit(main())
