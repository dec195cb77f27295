"""Loss terms of a bench's runs, epoch by epoch, against the detection loss: what each distillation term
weighs during training (after `distill.balance` and the method's weights), and the global method's sigma.

    python benchmarks/term_trajectories.py runs/bench/digits_faster_rcnn --seed 0 [--rows fgfi global]

Reads only the runs' `metrics.jsonl` and `log.txt` (nothing is trained). Prints one Markdown table per run:
per epoch the mean detection loss, every distillation term and its ratio to the detection loss, and for
the prototype methods the mean sigma (Eq. 8) and the share of instances whose class has prototypes.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

DET_TERMS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "classification",
             "bbox_regression", "bbox_ctrness")
SKIP = {"kind", "epoch", "iteration", "lr", "img_per_s", "loss"}


def epoch_means(records: list[dict]) -> dict[int, dict[str, float]]:
    """Mean of every logged value per epoch over the run's training records."""
    sums: dict[int, dict[str, float]] = {}
    counts: dict[int, int] = {}
    for r in records:
        if r.get("kind") != "train":
            continue
        e = int(r["epoch"])
        acc = sums.setdefault(e, {})
        counts[e] = counts.get(e, 0) + 1
        for k, v in r.items():
            if k not in SKIP and isinstance(v, (int, float)):
                acc[k] = acc.get(k, 0.0) + float(v)
    return {e: {k: v / counts[e] for k, v in acc.items()} for e, acc in sorted(sums.items())}


def run_table(folder: Path) -> str:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    means = epoch_means(records)
    if not means:
        return f"{folder}: no training records"
    first = next(iter(means.values()))
    terms = [k for k in first if k not in DET_TERMS and "/" not in k]
    stats = [k for k in first if "/" in k and k.endswith(("sigma_mean", "proto_covered"))]
    head = ["epoch", "detection", *[f"{t} (x det)" for t in terms], *stats]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for e, m in means.items():
        det = sum(m.get(k, 0.0) for k in DET_TERMS)
        cells = [str(e), f"{det:.3f}"] + [f"{m[t]:.3f} ({m[t] / det:.2f})" for t in terms]
        cells += [f"{m[s]:.3f}" for s in stats]
        lines.append("| " + " | ".join(cells) + " |")
    log = (folder / "log.txt").read_text() if (folder / "log.txt").is_file() else ""
    factors = re.findall(r"distill.balance: term factors (.*)", log)
    final = next((r for r in reversed(records) if r.get("kind") == "eval"), {})
    title = f"**{folder.name}**" + (f", mAP {final['mAP']:.3f}" if "mAP" in final else "")
    title += f"; balance factors: {factors[-1]}" if factors else ""
    return title + "\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_dir", help="a bench's output_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", nargs="*", help="rows to show (default: every run of the seed)")
    args = ap.parse_args()
    seed_dir = Path(args.bench_dir) / f"seed{args.seed}"
    if not seed_dir.is_dir():
        raise SystemExit(f"{seed_dir}: no such folder (is {args.bench_dir} a bench output_dir?)")
    rows = args.rows or sorted(p.name for p in seed_dir.iterdir() if (p / "metrics.jsonl").is_file())
    for row in rows:
        if not (seed_dir / row / "metrics.jsonl").is_file():
            raise SystemExit(f"{seed_dir / row}: no metrics.jsonl")
        print(run_table(seed_dir / row) + "\n")


if __name__ == "__main__":
    main()
