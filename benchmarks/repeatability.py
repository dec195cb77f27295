"""Do runs repeat? The same training run, several times and at several thread counts, side by side.

    python benchmarks/repeatability.py CONFIG [--threads 1 1 2] [--out /tmp/repeat] [key=value ...]

Runs `detkd train CONFIG` (or `detkd distill` when the config has a distill section) once per entry of
--threads, each with `train.threads=N train.deterministic=true` into its own folder, and prints per run
the final mAP and a fingerprint of the final student weights. Runs with the same thread count on the same
machine should agree bit for bit; the spread between thread counts is what a user on another machine
(or with another thread setting) should expect. Example (the digits Faster R-CNN bench student, 4 epochs):

    python benchmarks/repeatability.py configs/bench/digits/faster_rcnn_student.yaml train.epochs=4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_name  # noqa: E402


def weights_fingerprint(checkpoint: Path) -> str:
    """sha1 over the student's tensors in name order: equal iff the weights are bitwise equal."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 1, 2])
    ap.add_argument("--out", default="", help="folder for the runs (default: a temporary folder)")
    args = ap.parse_args()
    import yaml

    command = "distill" if yaml.safe_load(Path(args.config).read_text()).get("distill") else "train"
    out = Path(args.out or tempfile.mkdtemp(prefix="detkd_repeat_"))
    print(f"machine: {cpu_name()}; config {args.config} {' '.join(args.overrides)}; runs under {out}")
    print("| run | threads | mAP | weights | min |\n|---:|---:|---:|---|---:|")
    maps: dict[int, list[float]] = {}
    for i, n in enumerate(args.threads):
        folder = out / f"run{i}_threads{n}"
        cmd = [sys.executable, "-m", "detkd.cli", command, args.config, *args.overrides, f"output_dir={folder}",
               f"train.threads={n}", "train.deterministic=true", "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
            return 1
        m = json.loads((folder / "final.json").read_text())["mAP"]
        maps.setdefault(n, []).append(m)
        print(f"| {i} | {n} | {m:.4f} | {weights_fingerprint(folder / 'last.pt')} | "
              f"{(time.perf_counter() - t0) / 60:.1f} |", flush=True)
    every = [m for ms in maps.values() for m in ms]
    print(f"\nsame thread count: largest mAP difference "
          f"{max(max(ms) - min(ms) for ms in maps.values()):.4f}; all runs: {max(every) - min(every):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
