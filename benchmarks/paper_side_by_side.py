"""The paper's ranking and gap shares next to detkd's converged benches (issue 19; RESULTS.md, "Converged").

    python benchmarks/paper_side_by_side.py runs/bench/converged_faster_rcnn runs/bench/converged_fcos

The paper's numbers are Tables 1 (COCO, 2x schedule) and 2 (VOC) of Tang et al., "Distilling Object
Detectors with Global Knowledge", ECCV 2022 (teacher R101, student R50). The gap share of a method is its
gain over the student alone divided by the teacher's lead over the student alone: 100% reaches the teacher,
more passes it. detkd's column is read from each bench's results.json (write it with `detkd bench FILE
--report`): the gain paired by seed with its 95% interval (* where it excludes zero) and the seeds it rests on;
the ranking row ranks the methods the paper ran, by detkd's mean gain.
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


def bench_rows(folder: Path) -> tuple[float, dict[str, dict]]:
    """The teacher's lead over the student alone (x100) and every method row of a bench's results.json."""
    path = folder / "results.json"
    if not path.is_file():
        sys.exit(f"{path}: no such file (run `detkd bench FILE --report` to write it)")
    table = {e["row"]: e for e in json.loads(path.read_text())["table"]}
    for need in ("teacher", "baseline"):
        if need not in table:
            sys.exit(f"{path}: no {need} row")
    gap = 100 * (table["teacher"]["mAP"] - table["baseline"]["mAP"])
    return gap, {k: e for k, e in table.items() if k not in ("teacher", "baseline") and e.get("gain") is not None}


def detkd_cell(e: dict, gap: float) -> str:
    """``25% (+1.9 [+0.4, +3.4]*, 3 seeds)``: gap share, paired gain with its 95% interval (one seed: none)."""
    gain = 100 * e["gain"]
    ci = f" [{100 * e['gain_lo']:+.1f}, {100 * e['gain_hi']:+.1f}]" if e.get("gain_lo") is not None else ""
    star = "*" if e.get("significant") else ""
    n = len(e["seeds"])
    return f"{100 * gain / gap:.0f}% ({gain:+.1f}{ci}{star}, {n} seed{'s' if n > 1 else ''})"


def side_by_side(family: str, papers: list[str], folder: Path) -> list[str]:
    """One Markdown table: a row per method, the paper's gap shares and detkd's."""
    gap, rows = bench_rows(folder)
    paper = {name: shares(PAPER[name]) for name in papers}
    methods = ranked({k: e["gain"] for k, e in rows.items()})
    for m in (m for name in papers for m in ranked(paper[name])):
        if m not in methods:
            methods.append(m)
    head = [f"{name.split(' (')[0]} ({PAPER[name]['teacher'] - PAPER[name]['baseline']:.1f})" for name in papers]
    out = [f"{family}: gap share (teacher - student alone in points)",
           "",
           "| method | " + " | ".join(f"paper, {h}" for h in head) + f" | detkd, {folder.name} ({gap:.1f}) |",
           "|---|" + "---:|" * (len(papers) + 1)]
    for m in methods:
        cells = [f"{100 * paper[name][m]:.0f}%" if m in paper[name] else "–" for name in papers]
        out.append(f"| {m} | " + " | ".join(cells) + f" | {detkd_cell(rows[m], gap) if m in rows else '–'} |")
    out.append("| ranking | " + " | ".join(" > ".join(ranked(paper[name])) for name in papers)
               + " | " + " > ".join(m for m in ranked({k: e["gain"] for k, e in rows.items()})
                                   if m in {x for name in papers for x in paper[name]}) + " |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("faster_rcnn", type=Path, help="the converged Faster R-CNN bench's folder (holding results.json)")
    ap.add_argument("one_stage", type=Path, help="the converged one-stage bench's folder, set beside the "
                    "paper's RetinaNet")
    args = ap.parse_args()
    lines = side_by_side("Faster R-CNN", ["COCO Faster R-CNN (Table 1)", "VOC Faster R-CNN (Table 2)"],
                         args.faster_rcnn)
    lines += [""] + side_by_side("One-stage", ["COCO RetinaNet (Table 1)", "VOC RetinaNet (Table 2)"],
                                 args.one_stage)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
