"""Learning curves of the converged digits protocol (issue 19; benchmarks/RESULTS.md, "Converged").

    python benchmarks/converged_curves.py            # every run below not yet finished, then table + plot
    python benchmarks/converged_curves.py NAME...    # only these runs, in this order
    python benchmarks/converged_curves.py --report   # table + plot of what has finished

Each run is a `detkd train` of a `configs/bench/converged/` config (seed 0) that evaluates after every epoch,
written to runs/curves/NAME; a finished run (NAME/done) is skipped, an interrupted one resumed. It answers:
does the digit pre-training work as ImageNet weights do (the student alone converges faster and higher with
it than from scratch), where does each detector plateau (the 1x schedule: doubling it adds < 1 mAP point),
and how far below its teacher does the converged student stay.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_name  # noqa: E402

C = "configs/bench/converged"
BACKBONES = ["resnet18", "resnet34", "mobilenet_v3_large"]  # every backbone the runs below name
SCRATCH = ["model.backbone_weights=none", "model.norm=bn", "model.trainable_layers=5"]
# name -> (config, overrides): the order they run in
RUNS: dict[str, tuple[str, list[str]]] = {
    "fr_student_pre_e12": (f"{C}/faster_rcnn_student.yaml", []),
    "fr_teacher_pre_e12": (f"{C}/faster_rcnn_teacher.yaml", []),
    # the ResNet-18 student ends within 2 points of its teacher: the benches' student is MobileNetV3-Large
    "fr_mbv3_student_pre_e12": (f"{C}/faster_rcnn_mbv3_student.yaml", []),
    "fcos_teacher_pre_e12": (f"{C}/fcos_teacher.yaml", []),
    "fcos_mbv3_student_pre_e12": (f"{C}/fcos_mbv3_student.yaml", []),
    "fr_mbv3_student_scratch_e12": (f"{C}/faster_rcnn_mbv3_student.yaml", SCRATCH),
    "fcos_mbv3_student_scratch_e12": (f"{C}/fcos_mbv3_student.yaml", SCRATCH),
    "fr_mbv3_student_pre_e24": (f"{C}/faster_rcnn_mbv3_student.yaml", ["train.epochs=24"]),
    "fcos_mbv3_student_pre_e24": (f"{C}/fcos_mbv3_student.yaml", ["train.epochs=24"]),
}


def run(name: str, out_root: Path) -> None:
    cfg, overrides = RUNS[name]
    out = out_root / name
    if (out / "done").is_file():
        return
    cmd = [sys.executable, "-m", "detkd.cli", "train", cfg, f"output_dir={out}", *overrides, "--quiet"]
    if (out / "last.pt").is_file():
        cmd.append("--resume")
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    # the wall time of the last attempt (a resumed run's is that of its last part)
    (out / "done").write_text(json.dumps({"wall_s": time.perf_counter() - t0, "resumed": "--resume" in cmd}))


def curve(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["epoch"], r["mAP"]) for r in recs if r.get("kind") == "eval"]


def report(out_root: Path, plot: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    print(f"machine: {cpu_name()}; mAP after each epoch (seed 0, 1 thread)\n")
    print("| run | epochs | mAP per epoch | final | minutes |")
    print("|---|---:|---|---:|---:|")
    for name in RUNS:
        out = out_root / name
        if not (out / "done").is_file():
            continue
        pts = curve(out)
        final = json.loads((out / "final.json").read_text())
        minutes = json.loads((out / "done").read_text())["wall_s"] / 60
        print(f"| {name} | {len(pts)} | {' '.join(f'{m:.3f}' for _, m in pts)} | {final['mAP']:.4f} | "
              f"{minutes:.1f} |")
        ax = axes[0] if name.startswith("fr_") else axes[1]
        style = "--" if "scratch" in name else ("-" if "student" in name else ":")
        ax.plot([e for e, _ in pts], [m for _, m in pts], style, marker="o", ms=3, label=name)
    titles = ("Faster R-CNN: teacher R34, students R18 / MobileNetV3", "FCOS: teacher R34, student MobileNetV3")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val mAP")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(plot)
    print(f"\nplot: {plot}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="runs to do, in this order (default: every run of RUNS)")
    ap.add_argument("--out", default="runs/curves", help="folder of the runs (relative to the repository)")
    ap.add_argument("--report", action="store_true", help="only print the table and draw the plot")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "converged_curves.png"))
    args = ap.parse_args()
    out_root = ROOT / args.out
    unknown = [n for n in args.names if n not in RUNS]
    if unknown:
        ap.error(f"unknown run(s) {unknown}; known: {list(RUNS)}")
    if not args.report:
        # the backbones the configs name (a finished file is reused)
        subprocess.run([sys.executable, "-m", "detkd.cli", "pretrain", *BACKBONES, "--quiet"], check=True, cwd=ROOT)
        for name in args.names or RUNS:
            run(name, out_root)
    report(out_root, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
