"""The method comparison of benchmarks/RESULTS.md: `detkd bench` on the fixed-budget digits protocol of both
families (Faster R-CNN and FCOS) and of the cross-family pair (the FCOS teacher into a RetinaNet student).

    python benchmarks/bench_methods.py                         # the three digits benches, then the figures
    python benchmarks/bench_methods.py configs/bench/voc_faster_rcnn.yaml   # any bench file (GPU ones too)

Each bench resumes where it stopped (finished runs are skipped). When every bench has finished, its table
is printed with the machine it ran on, and the mAP bar charts are copied to docs/ (the README shows them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_name  # noqa: E402

from detkd.bench import BenchError, load_bench, run_bench  # noqa: E402

# the cross-family bench last: it takes the FCOS bench's teacher
DIGITS = ["configs/bench/digits_faster_rcnn.yaml", "configs/bench/digits_fcos.yaml",
          "configs/bench/digits_fcos_retinanet.yaml"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benches", nargs="*", default=DIGITS, help="bench files (default: the digits ones)")
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where the bar charts are copied")
    args = ap.parse_args()
    failed = False
    for path in args.benches:
        try:
            run_bench(path)
        except BenchError as e:
            print(f"{path}: {e}", file=sys.stderr)
            failed = True
            continue
        cfg, _ = load_bench(path)
        out = Path(cfg.output_dir)
        name = Path(path).stem
        for kind in ("map", "curves"):
            shutil.copyfile(out / f"{kind}.png", Path(args.docs) / f"bench_{name}_{kind}.png")
        print(f"\n## {name} ({cpu_name()})\n")
        print((out / "table.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
