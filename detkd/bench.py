"""``detkd bench``: every method on the same teacher / student pair, same data, same budget, one table.

A bench file names a student config, a teacher config and the methods to compare. The bench trains the
teacher once (or evaluates a given checkpoint), then for every seed:

1. ``pretrain`` (when ``pretrain_epochs > 0``): the student alone for ``pretrain_epochs``. Every run of
   the seed starts from this checkpoint, as the papers start distillation from a trained student
   (an ImageNet-pretrained one in their case);
2. ``baseline``: the student alone for ``epochs`` more, from that start;
3. one run per method, distilled for ``epochs`` from the same start, same data order;
4. ``fair_budget`` (when ``pretrain_epochs > 0``): the student alone for ``pretrain_epochs + epochs`` in
   one schedule from scratch, as many student epochs as pre-training plus distillation.

Each run is a ``detkd train`` / ``detkd distill`` subprocess (its peak memory is its own, a crash stays
in its log) with its config written to ``RUN/run.yaml``. A finished run writes ``RUN/result.json``
atomically; running the bench again skips finished runs and resumes an interrupted one from its
``last.pt``. After every run the bench rewrites ``table.md``, ``table.csv``, ``results.json``,
``map.png`` (mAP per method, error bars over seeds) and ``curves.png`` (loss and mAP of every run).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detkd.bench_table import format_csv, format_markdown, plot_bars, summarise
from detkd.config import (
    ConfigError,
    MethodConfig,
    apply_overrides,
    config_from_dict,
    from_dict,
    load_raw,
    load_yaml,
    normalise_methods,
    resolve_config_path,
)
from detkd.distill import build_distiller
from detkd.engine.logger import read_jsonl
from detkd.engine.trainer import FINAL_METRICS
from detkd.models.torchvision_build import NUM_LEVELS
from detkd.runtime.console import info
from detkd.runtime.files import atomic_write_text


@dataclass
class BenchMethod:
    """One row of the table: the distillers of the run and config overrides for that run only."""

    methods: list[MethodConfig] = field(default_factory=list)  # as distill.methods of a run config
    overrides: list[str] = field(default_factory=list)  # key=value for this row, e.g. train.clip_grad=35
    seeds: list[int] = field(default_factory=list)  # the seeds this row runs (an ablation on one seed); [] = all


@dataclass
class BenchConfig:
    student_config: str = ""  # config of the student (data, model, train); relative to the bench file
    teacher_config: str = ""  # config of the teacher (its model and train sections); same
    teacher_checkpoint: str = ""  # trained teacher; empty = train it with teacher_config in OUT/teacher
    methods: dict[str, Any] = field(default_factory=dict)  # label -> [methods] or {methods, overrides}
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one run of every row per seed
    pretrain_epochs: int = 0  # student epochs before distillation (0 = distil from scratch)
    epochs: int = 0  # distillation (and baseline) epochs; 0 = the student config's train.epochs
    fair_budget: bool = True  # add the baseline trained pretrain_epochs + epochs in one schedule
    overrides: list[str] = field(default_factory=list)  # key=value for every run (teacher included)
    teacher_overrides: list[str] = field(default_factory=list)  # key=value for the teacher run only
    distill_overrides: list[str] = field(default_factory=list)  # key=value for every distilled run, e.g.
    # distill.balance=1.0 (pairs trained from scratch; see docs/bench.md)
    finetune_overrides: list[str] = field(default_factory=list)  # key=value for the runs that start from the
    # pre-trained student (baseline and methods), e.g. a shorter warm-up for a short second phase
    output_dir: str = "runs/bench"  # runs, table, plots


class BenchError(RuntimeError):
    """A run of the bench failed; its log names the cause."""


@dataclass
class BenchRun:
    """One run of a bench (the teacher, a seed's baseline or a method's row): its command and full config."""

    name: str  # folder under the bench output, e.g. seed0/fgd
    row: str  # table row label
    seed: int
    command: str  # train | distill | eval
    raw: dict[str, Any]  # full config mapping written to run.yaml
    checkpoint: str = ""  # eval runs: the checkpoint evaluated

    def folder(self, out: Path) -> Path:
        return out / self.name


def load_bench(path: str | Path, overrides: list[str] | None = None) -> tuple[BenchConfig, dict[str, BenchMethod]]:
    """Read a bench file (or a shipped one by name, like ``bench/digits_retinanet``); config paths inside it
    are relative to the file. Errors name the file and key."""
    path = resolve_config_path(path)
    raw = apply_overrides(load_yaml(path), overrides or [])
    try:
        cfg = from_dict(BenchConfig, raw)
        methods = _parse_methods(cfg.methods)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for key in ("student_config", "teacher_config"):
        value = getattr(cfg, key)
        if not value:
            raise ConfigError(f"{path}: {key} is required")
        resolved = (path.parent / value).resolve()
        if not resolved.is_file():
            raise ConfigError(f"{path}: {key}: file not found: {resolved}")
        setattr(cfg, key, str(resolved))
    if cfg.teacher_checkpoint and not Path(cfg.teacher_checkpoint).is_file():
        raise ConfigError(f"{path}: teacher_checkpoint: file not found: {cfg.teacher_checkpoint} (train that "
                          f"teacher first, or set teacher_checkpoint= to let this bench train one with teacher_config)")
    if not cfg.seeds:
        raise ConfigError(f"{path}: seeds: give at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"{path}: seeds: {cfg.seeds} repeats a seed")
    if cfg.pretrain_epochs < 0 or cfg.epochs < 0:
        raise ConfigError(f"{path}: pretrain_epochs and epochs must be >= 0")
    for label, m in methods.items():
        if set(m.seeds) - set(cfg.seeds):
            raise ConfigError(f"{path}: methods.{label}.seeds: {m.seeds} names a seed the bench does not run "
                              f"(seeds: {cfg.seeds})")
    return cfg, methods


def _parse_methods(raw: dict[str, Any]) -> dict[str, BenchMethod]:
    out = {}
    reserved = {"teacher", "pretrain", "baseline", "fair_budget"}
    for label, value in raw.items():
        where = f"methods.{label}"
        if label in reserved or "/" in label or not label:
            raise ConfigError(f"{where}: {label!r} is not a usable row label (reserved or contains '/')")
        if not isinstance(value, dict):
            value = {"methods": value}
        value = normalise_methods(dict(value))
        out[label] = from_dict(BenchMethod, value, where)
        if not out[label].methods:
            raise ConfigError(f"{where}: name at least one method")
    return out


# ----------------------------------------------------------------------------------------------------------
# Planning


def plan_runs(cfg: BenchConfig, methods: dict[str, BenchMethod], only: list[str] | None = None) -> list[BenchRun]:
    """Every run of the bench in execution order (seed by seed, so a partial bench has whole seeds).

    Each run's config is validated here, so a bad method option fails before anything trains.
    """
    if only:
        unknown = [m for m in only if m not in methods]
        if unknown:
            raise ConfigError(f"--methods: unknown row {unknown[0]!r} (rows of this bench: {', '.join(methods)})")
        methods = {k: v for k, v in methods.items() if k in only}
    out = Path(cfg.output_dir)
    student = apply_overrides(load_raw(cfg.student_config), list(cfg.overrides))
    teacher = apply_overrides(load_raw(cfg.teacher_config), [*cfg.overrides, *cfg.teacher_overrides])
    student.pop("distill", None)
    teacher.pop("distill", None)
    epochs = cfg.epochs or config_from_dict(copy.deepcopy(student)).train.epochs
    pre = cfg.pretrain_epochs

    runs: list[BenchRun] = []
    if cfg.teacher_checkpoint:
        t_run = BenchRun("teacher", "teacher", -1, "eval", _with(teacher, out / "teacher"), cfg.teacher_checkpoint)
        teacher_ckpt = cfg.teacher_checkpoint
    else:
        t_run = BenchRun("teacher", "teacher", -1, "train", _with(teacher, out / "teacher"))
        teacher_ckpt = str(out / "teacher" / "last.pt")
    runs.append(t_run)

    for seed in cfg.seeds:
        init = ""
        if pre > 0:
            runs.append(BenchRun(f"seed{seed}/pretrain", "pretrain", seed, "train",
                            _with(student, out / f"seed{seed}/pretrain", seed=seed, epochs=pre)))
            init = str(out / f"seed{seed}/pretrain" / "last.pt")
        base = apply_overrides(_with(student, out / f"seed{seed}/baseline", seed=seed, epochs=epochs),
                               list(cfg.finetune_overrides) if init else [])
        if init:
            base["model"]["weights"] = init
            base["model"]["backbone_weights"] = "none"
        runs.append(BenchRun(f"seed{seed}/baseline", "baseline", seed, "train", base))
        for label, m in methods.items():
            if m.seeds and seed not in m.seeds:
                continue
            raw = apply_overrides(_with(student, out / f"seed{seed}/{label}", seed=seed, epochs=epochs),
                                  list(cfg.finetune_overrides) if init else [])
            raw["distill"] = {
                "teacher": copy.deepcopy(teacher["model"]),
                "teacher_checkpoint": teacher_ckpt,
                "methods": [{"name": x.name, "weight": x.weight, "options": dict(x.options)} for x in m.methods],
                "student_init": "checkpoint" if init else "none",
                "student_checkpoint": init,
                # every row and seed feeds the teacher the same images: one teacher cache for all of them
                "cache_dir": str(out / "teacher_cache"),
            }
            raw = apply_overrides(raw, [*cfg.distill_overrides, *m.overrides])
            runs.append(BenchRun(f"seed{seed}/{label}", label, seed, "distill", raw))
        if pre > 0 and cfg.fair_budget:
            runs.append(BenchRun(f"seed{seed}/fair_budget", "fair_budget", seed, "train",
                            _with(student, out / f"seed{seed}/fair_budget", seed=seed, epochs=pre + epochs)))

    for r in runs:
        try:
            _validate(config_from_dict(copy.deepcopy(r.raw)))
        except ConfigError as e:
            raise ConfigError(f"bench run {r.name}: {e}") from None
    return runs


def _validate(run_cfg) -> None:
    """Method names and options too, not only the config's types: a bad option would otherwise surface only
    when its run starts, maybe an hour into the bench."""
    if run_cfg.distill is None:
        return
    t_ch = [run_cfg.distill.teacher.fpn_channels] * NUM_LEVELS  # every FPN level has the FPN's width
    s_ch = [run_cfg.model.fpn_channels] * NUM_LEVELS
    for i, m in enumerate(run_cfg.distill.methods):
        build_distiller(m.name, m.options, t_ch, s_ch, run_cfg.model.arch, where=f"distill.methods[{i}]")


def _with(raw: dict[str, Any], out: Path, seed: int | None = None, epochs: int | None = None) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    raw["output_dir"] = str(out)
    train = raw.setdefault("train", {})
    if seed is not None:
        train["seed"] = seed
    if epochs is not None:
        train["epochs"] = epochs
        train.pop("preset", None)  # a preset would overwrite the epochs
        if train.get("schedule", "multistep") == "multistep":
            # the student file's milestones belong to its own length: scale them to this one
            train["milestones"] = _scaled_milestones(raw, epochs)
    return raw


def _scaled_milestones(raw: dict[str, Any], epochs: int) -> list[int]:
    cfg = config_from_dict(copy.deepcopy({k: v for k, v in raw.items() if k != "distill"}))
    base_epochs = {"1x": 12, "2x": 24}.get(cfg.train.preset, cfg.train.epochs)
    return sorted({max(1, round(m * epochs / base_epochs)) for m in cfg.train.milestones if m < base_epochs})


# ----------------------------------------------------------------------------------------------------------
# Running


def result_path(run: BenchRun, out: Path) -> Path:
    return run.folder(out) / "result.json"


def execute(run: BenchRun, out: Path, quiet: bool = True) -> dict[str, Any]:
    """Run one bench run in a subprocess (resuming it if interrupted); write and return its result."""
    folder = run.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "run.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(run.raw, sort_keys=False))
    cmd = [sys.executable, "-m", "detkd.cli", run.command, str(cfg_path)]
    if run.command == "eval":
        cmd += ["--checkpoint", run.checkpoint, "--json", str(folder / "eval.json")]
    else:
        cmd += ["--resume"]
    if quiet:
        cmd.append("--quiet")
    log_path = folder / "log.txt"
    resumed = (folder / "last.pt").is_file()
    t0 = time.perf_counter()
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives this child's own resource usage (peak RSS of the run, not of the bench)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-8:])
        raise BenchError(f"run {run.name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    metrics = _final_metrics(run, folder, log_path)
    result = {
        "name": run.name, "row": run.row, "seed": run.seed, "command": run.command,
        "epochs": run.raw.get("train", {}).get("epochs"), "metrics": metrics,
        "student_init": _student_init(folder),
        "wall_s": wall, "resumed": resumed,  # a resumed run's wall time is that of its last attempt only
        "peak_rss_mb": usage.ru_maxrss / 1024.0,  # kilobytes on Linux
        "gpu_peak_mb": metrics.pop("gpu_peak_mb", None),
        "config": run.raw,
    }
    atomic_write_text(result_path(run, out), json.dumps(result, indent=2))
    return result


def _student_init(folder: Path) -> str | None:
    """The fingerprint of the student's starting weights that the run logged (None for an evaluation)."""
    log = folder / "metrics.jsonl"
    if not log.is_file():
        return None
    return next((r["student_init"] for r in read_jsonl(log) if r.get("kind") == "start"), None)


def _start_mismatches(results: list[dict[str, Any]]) -> list[str]:
    """Seeds whose baseline and distilled rows did not start from the same student weights."""
    by_seed: dict[int, set[str]] = {}
    for r in results:
        if r["row"] not in ("teacher", "pretrain", "fair_budget") and r.get("student_init"):
            by_seed.setdefault(r["seed"], set()).add(r["student_init"])
    return [f"seed {s}" for s, inits in sorted(by_seed.items()) if len(inits) > 1]


def _final_metrics(run: BenchRun, folder: Path, log_path: Path) -> dict[str, Any]:
    path = folder / ("eval.json" if run.command == "eval" else FINAL_METRICS)
    if not path.is_file():
        raise BenchError(f"run {run.name}: it wrote no {path.name}; see {log_path}")
    return json.loads(path.read_text())


def run_bench(path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None,
              seeds: list[int] | None = None, dry_run: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Plan, run what is not finished, and write the table and plots. Returns the summary."""
    cfg, methods = load_bench(path, overrides)
    if seeds:
        cfg.seeds = seeds
    runs = plan_runs(cfg, methods, only)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out) if not dry_run else None  # held until this process exits
    todo = [r for r in runs if not result_path(r, out).is_file()]
    _check_unchanged([r for r in runs if r not in todo], out)
    info(f"bench {path}: {len(runs)} runs ({len(runs) - len(todo)} finished earlier), output {out}")
    if dry_run:
        for r in runs:
            state = "done" if r not in todo else "to run"
            print(f"{r.name:<28} {r.command:<8} {state}")
        return {}
    failures: list[str] = []
    t_start = time.perf_counter()
    for i, r in enumerate(todo):
        blocked = _blocked_by(r, failures)
        if blocked:
            info(f"[{i + 1}/{len(todo)}] {r.name}: skipped, it needs {blocked} which failed")
            failures.append(r.name)
            continue
        info(f"[{i + 1}/{len(todo)}] {r.name}: {r.command} ({_eta(t_start, i, len(todo))})")
        try:
            res = execute(r, out, quiet=quiet)
        except BenchError as e:
            info(str(e))
            failures.append(r.name)
            continue
        info(f"[{i + 1}/{len(todo)}] {r.name}: mAP {res['metrics']['mAP']:.4f} in {res['wall_s'] / 60:.1f} min, "
             f"peak {res['peak_rss_mb']:.0f} MB")
        write_report(out, runs, cfg)
    summary = write_report(out, runs, cfg)
    print(summary["markdown"])
    if lock is not None:
        lock.close()
    if failures:
        raise BenchError(f"{len(failures)} run(s) failed: {', '.join(failures)} (logs under {out}); rerun the "
                         "bench to retry them, finished runs are kept")
    return summary


def _check_unchanged(finished: list[BenchRun], out: Path) -> None:
    """A finished run is reused only if the bench would run it with the same config."""
    for r in finished:
        saved = json.loads(result_path(r, out).read_text()).get("config")
        if saved is not None and _result_keys(saved) != _result_keys(r.raw):
            raise ConfigError(
                f"bench run {r.name} finished with another config than the bench file gives now; move or delete "
                f"{r.folder(out)} to run it again, or use another output_dir (nothing was deleted)"
            )


# distill keys that change no result (the float32 teacher cache is exact): a run finished before them, or with
# other values, is still the same run
RESULT_NEUTRAL = ("teacher_cache", "cache_dir", "cache_memory_mb", "cache_disk_mb")


def _result_keys(raw: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(raw.get("distill"), dict):
        return raw
    return {**raw, "distill": {k: v for k, v in raw["distill"].items() if k not in RESULT_NEUTRAL}}


def _lock(out: Path):
    """An exclusive lock on the bench folder: two benches writing the same runs would corrupt them."""
    import fcntl

    f = (out / ".lock").open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError(f"another `detkd bench` is running in {out} (it holds {out / '.lock'}); wait for it "
                          "or use another output_dir") from None
    return f


def _blocked_by(run: BenchRun, failures: list[str]) -> str:
    """The failed run this one depends on (the teacher, or its seed's pre-training), if any."""
    needs = []
    if run.command == "distill":
        needs.append("teacher")
    if run.seed >= 0 and run.row not in ("pretrain", "fair_budget"):
        needs.append(f"seed{run.seed}/pretrain")
    return next((n for n in needs if n in failures), "")


def _eta(t_start: float, done: int, total: int) -> str:
    if done == 0:
        return f"{total} to go"
    per = (time.perf_counter() - t_start) / done
    return f"{total - done} to go, about {per * (total - done) / 60:.0f} min left"


# ----------------------------------------------------------------------------------------------------------
# Report


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
    note = (f"Every distilled row and the baseline start from the student pre-trained for {cfg.pretrain_epochs} "
            "epochs (the papers start from ImageNet-pretrained students); the fair-budget row trains the "
            "student alone for as many epochs as pre-training + distillation, in one schedule."
            if cfg.pretrain_epochs else
            "Fixed budget: per seed, every row trains the same randomly initialised student for the same "
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax_loss.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
