"""The bench's report from its finished runs: table.md, table.csv, results.json, map.png, curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detkd.bench.spec import BenchConfig, BenchRun, result_path
from detkd.bench.table import format_csv, format_markdown, plot_bars, summarise
from detkd.engine.logger import read_jsonl
from detkd.runtime.console import info
from detkd.runtime.files import atomic_write_text


def _start_mismatches(results: list[dict[str, Any]]) -> list[str]:
    """Seeds whose baseline and distilled rows did not start from the same student weights."""
    by_seed: dict[int, set[str]] = {}
    for r in results:
        if r["row"] not in ("teacher", "pretrain", "fair_budget") and r.get("student_init"):
            by_seed.setdefault(r["seed"], set()).add(r["student_init"])
    return [f"seed {s}" for s, inits in sorted(by_seed.items()) if len(inits) > 1]


def collect(out: Path, runs: list[BenchRun]) -> list[dict[str, Any]]:
    results = []
    for r in runs:
        p = result_path(r, out)
        if p.is_file():
            results.append(json.loads(p.read_text()))
    return results


def _row_order(runs: list[BenchRun]) -> list[str]:
    order: list[str] = []
    for r in runs:
        if r.row not in order:
            order.append(r.row)
    # baselines first, methods after, in the bench file's order
    fixed = [x for x in ("teacher", "pretrain", "baseline", "fair_budget") if x in order]
    return fixed + [x for x in order if x not in fixed]


def write_report(out: Path, runs: list[BenchRun], cfg: BenchConfig) -> dict[str, Any]:
    """Write table.md / table.csv / results.json / map.png / curves.png from the finished runs."""
    results = collect(out, runs)
    table = summarise(results, _row_order(runs))
    md = format_markdown(table, cfg.pretrain_epochs)
    weights = {r.raw.get("model", {}).get("backbone_weights", "none") for r in runs if r.row == "baseline"}
    start = "randomly initialised" if weights <= {"none", ""} else "backbone-pretrained"
    note = (f"Every distilled row and the baseline start from the student pre-trained for {cfg.pretrain_epochs} "
            "epochs (the papers start from ImageNet-pretrained students); the fair-budget row trains the "
            "student alone for as many epochs as pre-training + distillation, in one schedule."
            if cfg.pretrain_epochs else
            f"Fixed budget: per seed, every row trains the same {start} student for the same "
            "epochs on the same data order; the distilled rows are distilled from the first step, so the "
            "baseline is the student alone at the same budget.")
    bad = _start_mismatches(results)
    if bad:
        note += (f" WARNING: the rows of {', '.join(bad)} did not start from the same student weights (their "
                 "result.json files hold different student_init fingerprints); their gains are not paired.")
        info(f"bench: {note.split('WARNING: ')[1]}")
    md = (f"{md}\n\nmean ± sample std over seeds; ΔmAP: mean gain over the baseline, paired by seed, with its "
          f"95% interval (Student's t over seeds); * marks a gain whose interval excludes zero. {note}\n")
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.csv", format_csv(table))
    summary = {"table": table, "runs": results, "markdown": md}
    atomic_write_text(out / "results.json", json.dumps({"table": table, "runs": results}, indent=2))
    if table:
        title = f"{out.name}: mean mAP and 95% interval over seeds {', '.join(map(str, cfg.seeds))}"
        plot_bars(table, out / "map.png", cfg.pretrain_epochs, title=title)
        plot_curves(out, runs, out / "curves.png")
    return summary


def plot_curves(out: Path, runs: list[BenchRun], path: Path) -> None:
    """Training loss (per logged window) and evaluated mAP of every run, one colour per row."""
    # matplotlib only when a plot is drawn (slow to import), its file backend chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use

    rows = _row_order(runs)
    cmap = plt.get_cmap("tab20")
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    seen: set[str] = set()
    for r in runs:
        log = r.folder(out) / "metrics.jsonl"
        if r.command == "eval" or not log.is_file():
            continue
        recs = read_jsonl(log)
        colour = cmap(rows.index(r.row) % 20)
        label = r.row if r.row not in seen else None
        seen.add(r.row)
        train = [x for x in recs if x.get("kind") == "train" and "loss" in x]
        if train:
            ax_loss.plot([x["iteration"] for x in train], [x["loss"] for x in train], color=colour, lw=0.8,
                         alpha=0.8, label=label)
        evals = [x for x in recs if x.get("kind") == "eval"]
        if evals:
            ax_map.plot([x["epoch"] for x in evals], [x["mAP"] for x in evals], "o-", color=colour, lw=0.8,
                        ms=3, alpha=0.8)
    ax_loss.set_xlabel("iteration (of each run)")
    ax_loss.set_ylabel("total loss (detection + distillation)")
    ax_loss.set_yscale("log")
    ax_map.set_xlabel("epoch (of each run)")
    ax_map.set_ylabel("val mAP")
    if ax_loss.get_legend_handles_labels()[0]:  # none before the first training run has logged
        ax_loss.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
