"""The bench's table: per row the mean and sample std over seeds, the gain over the baseline paired by seed
with its 95% interval (Student's t), as Markdown, CSV and a bar plot. Pure functions of the runs' results."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ["mAP", "AP50", "AP75", "APs", "APm", "APl"]

# Two-sided 95% quantiles of Student's t by degrees of freedom (n seeds - 1); beyond 30 the normal 1.96.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def ci95(values: list[float]) -> tuple[float, float] | None:
    """95% confidence interval of the mean of ``values`` (Student's t, sample std); None for fewer than 2."""
    n = len(values)
    if n < 2:
        return None
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * std / np.sqrt(n)
    return mean - half, mean + half


def summarise(results: list[dict[str, Any]], rows: list[str]) -> list[dict[str, Any]]:
    """Mean and spread (sample standard deviation over seeds) of every metric per row, the 95% interval of
    the mean mAP, and the mAP gain over the baseline paired by seed with its 95% interval (``gain_lo``,
    ``gain_hi``); ``significant`` when that interval excludes zero."""
    by_row: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        by_row.setdefault(res["row"], []).append(res)
    base = {res["seed"]: res["metrics"]["mAP"] for res in by_row.get("baseline", [])}
    table = []
    for row in rows:
        rs = sorted(by_row.get(row, []), key=lambda x: x["seed"])
        if not rs:
            continue
        entry: dict[str, Any] = {"row": row, "seeds": [x["seed"] for x in rs], "n": len(rs),
                                 "epochs": rs[0]["epochs"]}
        for m in METRICS:
            vals = np.array([x["metrics"].get(m, -1.0) for x in rs], dtype=float)
            if (vals < 0).any():  # COCO's -1: no ground truth of that size
                entry[m], entry[m + "_std"] = None, None
            else:
                entry[m] = float(vals.mean())
                entry[m + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        ci = ci95([x["metrics"]["mAP"] for x in rs]) if entry["mAP"] is not None else None
        entry["mAP_lo"], entry["mAP_hi"] = ci if ci else (None, None)
        paired = row not in ("teacher", "baseline")
        gains = [x["metrics"]["mAP"] - base[x["seed"]] for x in rs if x["seed"] in base] if paired else []
        entry["gain"] = float(np.mean(gains)) if gains else None
        entry["gain_std"] = float(np.std(gains, ddof=1)) if len(gains) > 1 else None
        gci = ci95(gains)
        entry["gain_lo"], entry["gain_hi"] = gci if gci else (None, None)
        entry["significant"] = bool(gci and (gci[0] > 0 or gci[1] < 0))
        entry["gap_closed"] = None  # filled below, once the teacher and the baseline are known
        entry["wall_min"] = float(np.mean([x["wall_s"] for x in rs])) / 60
        entry["peak_rss_mb"] = float(max(x["peak_rss_mb"] for x in rs))
        gpu = [x["gpu_peak_mb"] for x in rs if x.get("gpu_peak_mb")]
        entry["gpu_peak_mb"] = float(max(gpu)) if gpu else None
        table.append(entry)
    # the share of the teacher's lead over the student alone that a row's mean gain closes (1 = reaches the
    # teacher, more passes it): the papers' way of comparing methods across pairs
    rows_by = {e["row"]: e for e in table}
    teacher, baseline = rows_by.get("teacher"), rows_by.get("baseline")
    if teacher and baseline and teacher["mAP"] is not None and baseline["mAP"] is not None:
        lead = teacher["mAP"] - baseline["mAP"]
        for e in table:
            if e["gain"] is not None and lead > 0:
                e["gap_closed"] = e["gain"] / lead
    return table


def _label(row: str, entry: dict[str, Any], pre: int) -> str:
    if row == "teacher":
        return f"teacher ({entry['epochs']} ep)" if entry["epochs"] else "teacher"
    if row == "pretrain":
        return f"student, pre-trained ({entry['epochs']} ep)"
    if row == "baseline":
        return f"student baseline (+{entry['epochs']} ep)" if pre else f"student baseline ({entry['epochs']} ep)"
    if row == "fair_budget":
        return f"student, fair budget ({entry['epochs']} ep)"
    return f"+ {row}" if pre else row


def _pm(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "–"
    s = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return s if not std else f"{s} ± {std:.3f}"


def _gain_cell(e: dict[str, Any]) -> str:
    """Paired mean gain, its 95% interval, and * when the interval excludes zero."""
    if e["gain"] is None:
        return "–"
    if e["gain_lo"] is None:
        return f"{e['gain']:+.3f}"
    return f"{e['gain']:+.3f} [{e['gain_lo']:+.3f}, {e['gain_hi']:+.3f}]" + (" *" if e["significant"] else "")


def format_markdown(table: list[dict[str, Any]], pre: int) -> str:
    head = ["method", *METRICS, "ΔmAP [95% CI]", "gap closed", "min/run", "peak MB", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for e in table:
        cells = [_label(e["row"], e, pre)] + [_pm(e[m], e[m + "_std"]) for m in METRICS]
        cells += [_gain_cell(e), "–" if e.get("gap_closed") is None else f"{100 * e['gap_closed']:.0f}%",
                  f"{e['wall_min']:.1f}",
                  f"{e['peak_rss_mb']:.0f}" + (f" / GPU {e['gpu_peak_mb']:.0f}" if e["gpu_peak_mb"] else ""),
                  str(e["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = ["row", "n", "epochs"] + [c for m in METRICS for c in (m, m + "_std")]
    cols += ["mAP_lo", "mAP_hi", "gain", "gain_std", "gain_lo", "gain_hi", "significant", "gap_closed", "wall_min",
             "peak_rss_mb", "gpu_peak_mb"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for e in table:
        w.writerow({k: ("" if e.get(k) is None else e.get(k)) for k in cols})
    return buf.getvalue()


def plot_bars(table: list[dict[str, Any]], path: Path, pre: int = 0, title: str = "") -> None:
    """mean mAP per row with its 95% interval over seeds as error bars (none for one seed), * over the rows
    whose paired gain over the baseline is significant; the teacher as a dashed line."""
    # matplotlib only when a plot is drawn (slow to import), its file backend chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use

    rows = [e for e in table if e["row"] != "teacher"]
    teacher = next((e for e in table if e["row"] == "teacher"), None)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(rows) + 2), 3.6), dpi=120)
    colours = ["#888888" if e["row"] in ("pretrain", "baseline", "fair_budget") else "#3b75af" for e in rows]
    low = [e["mAP"] - e["mAP_lo"] if e.get("mAP_lo") is not None else 0.0 for e in rows]
    high = [e["mAP_hi"] - e["mAP"] if e.get("mAP_hi") is not None else 0.0 for e in rows]
    ax.bar(range(len(rows)), [e["mAP"] for e in rows], yerr=[low, high], color=colours, capsize=3)
    for i, e in enumerate(rows):
        if e.get("significant"):
            ax.annotate("*", (i, e["mAP"] + high[i]), ha="center", va="bottom", fontsize=11)
    base = next((e for e in rows if e["row"] == "baseline"), None)
    if base is not None:
        ax.axhline(base["mAP"], color="#888888", lw=0.8, ls=":")
    if teacher is not None:
        ax.axhline(teacher["mAP"], color="#c0392b", lw=1.0, ls="--", label=f"teacher {teacher['mAP']:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(rows)), [_label(e["row"], e, pre).replace("student, ", "") for e in rows],
                  rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("mAP (COCO 0.5:0.95)")
    lo = min(e["mAP"] - d for e, d in zip(rows, low))
    ax.set_ylim(max(0.0, lo - 0.05), None)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
