"""The paper's ranking and gap shares next to detkd's converged benches (issue 19; RESULTS.md, "Converged").

    python benchmarks/paper_side_by_side.py runs/bench/converged_faster_rcnn runs/bench/converged_fcos

The paper's numbers are Tables 1 (COCO, 2x schedule) and 2 (VOC) of Tang et al., "Distilling Object
Detectors with Global Knowledge", ECCV 2022 (teacher R101, student R50). The gap share of a method is its
gain over the student alone divided by the teacher's lead over the student alone: 100% reaches the teacher,
more passes it. detkd's column is read from each bench's results.json (mean over the row's seeds; the gain
paired by seed, as the bench table has it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# mAP of teacher, student alone and each method, in the order the paper lists them
PAPER: dict[str, dict[str, float]] = {
    "COCO Faster R-CNN (Table 1)": {"teacher": 39.8, "baseline": 38.4, "fgfi": 39.3, "defeat": 40.3, "gid": 40.2,
                                    "global": 40.6},
    "COCO RetinaNet (Table 1)": {"teacher": 38.9, "baseline": 37.4, "fgfi": 38.6, "gid": 39.1, "defeat": 39.3,
                                 "global": 39.8},
    "VOC Faster R-CNN (Table 2)": {"teacher": 56.3, "baseline": 54.2, "fitnet": 55.0, "fgfi": 55.3, "gid": 56.5,
                                   "global": 56.7},
    "VOC RetinaNet (Table 2)": {"teacher": 58.2, "baseline": 56.1, "fitnet": 56.4, "fgfi": 55.6, "gid": 57.9,
                                "global": 58.6},
}


def shares(maps: dict[str, float]) -> dict[str, float]:
    """Gap share of every method row: (row - baseline) / (teacher - baseline)."""
    gap = maps["teacher"] - maps["baseline"]
    return {k: (v - maps["baseline"]) / gap for k, v in maps.items() if k not in ("teacher", "baseline")}


def ranked(table: dict[str, float]) -> list[str]:
    return sorted(table, key=lambda k: -table[k])


def bench_maps(folder: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Mean mAP (x100) per row of a bench, and each method row's paired gain (x100)."""
    table = json.loads((folder / "results.json").read_text())["table"]
    maps = {e["row"]: 100 * e["mAP"] for e in table}
    gains = {e["row"]: 100 * e["gain"] for e in table if e.get("gain") is not None}
    return maps, gains


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benches", nargs="+", help="bench output folders (holding results.json)")
    args = ap.parse_args()
    print("| source | teacher - student | ranking (gap share) |")
    print("|---|---:|---|")
    for name, maps in PAPER.items():
        s = shares(maps)
        print(f"| paper, {name} | {maps['teacher'] - maps['baseline']:.1f} | "
              + ", ".join(f"{k} {100 * s[k]:.0f}%" for k in ranked(s)) + " |")
    for folder in map(Path, args.benches):
        maps, gains = bench_maps(folder)
        gap = maps["teacher"] - maps["baseline"]
        s = {k: g / gap for k, g in gains.items()}
        print(f"| detkd, {folder.name} | {gap:.1f} | " + ", ".join(f"{k} {100 * s[k]:.0f}%" for k in ranked(s)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
