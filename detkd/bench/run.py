"""Running a bench: each run a ``detkd train`` / ``detkd distill`` subprocess, resumed when interrupted,
skipped when finished; the report rewritten after every run. ``jobs`` runs that many at once, each as soon
as the runs it needs (the teacher, its seed's pre-training) have finished."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml

from detkd.bench.plan import plan_runs
from detkd.bench.report import write_report
from detkd.bench.spec import BenchRun, load_bench, result_path
from detkd.config import ConfigError, config_from_dict, from_dict
from detkd.engine.logger import read_jsonl
from detkd.engine.pretrain import PretrainOptions, ensure_backbone_weights
from detkd.errors import BenchError
from detkd.runtime.checkpoint import FINAL_METRICS
from detkd.runtime.console import info
from detkd.runtime.files import atomic_write_text

# the runs' processes now running (from any of the bench's worker threads): a stopped bench stops them all
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _stop_live() -> None:
    """Stop every running run (the bench was stopped: Ctrl-C, SIGTERM) rather than leave them training
    unwatched; each resumes from its last checkpoint when the bench is run again."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait()


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
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            # wait4 gives this child's own resource usage (peak RSS of the run, not of the bench)
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
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


def _final_metrics(run: BenchRun, folder: Path, log_path: Path) -> dict[str, Any]:
    path = folder / ("eval.json" if run.command == "eval" else FINAL_METRICS)
    if not path.is_file():
        raise BenchError(f"run {run.name}: it wrote no {path.name}; see {log_path}")
    return json.loads(path.read_text())


def run_bench(path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None,
              seeds: list[int] | None = None, dry_run: bool = False, quiet: bool = True,
              report_only: bool = False, jobs: int = 1) -> dict[str, Any]:
    """Plan, run what is not finished, and write the table and plots. Returns the summary.

    ``jobs``: how many runs at once (each its own process with the config's ``train.threads``; on CPU give
    each job its share of the cores).

    ``report_only``: run nothing, write the table and plots of the runs finished so far (also while another
    process runs the bench: the table files are written atomically)."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give at least 1")
    cfg, methods = load_bench(path, overrides)
    if seeds:
        cfg.seeds = seeds
    runs = plan_runs(cfg, methods, only)
    pretrain_opts = from_dict(PretrainOptions, cfg.pretrain_options, "pretrain_options")
    if cfg.pretrain_backbones and not (dry_run or report_only):
        # the teacher's (unless a trained one is given) and the student's, before any run needs them
        for r in ([] if runs[0].command == "eval" else [runs[0]]) + [runs[-1]]:
            model = config_from_dict(copy.deepcopy({k: v for k, v in r.raw.items() if k != "distill"})).model
            ensure_backbone_weights(model.backbone, model.backbone_weights, pretrain_opts)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out) if not (dry_run or report_only) else None  # held until this process exits
    todo = [r for r in runs if not result_path(r, out).is_file()]
    _check_unchanged([r for r in runs if r not in todo], out)
    if report_only:
        summary = write_report(out, runs, cfg)
        print(summary["markdown"])
        info(f"bench {path}: table of {len(runs) - len(todo)} finished runs of {len(runs)} in {out} (ran nothing)")
        return summary
    info(f"bench {path}: {len(runs)} runs ({len(runs) - len(todo)} finished earlier), output {out}")
    if dry_run:
        for r in runs:
            state = "done" if r not in todo else "to run"
            print(f"{r.name:<28} {r.command:<8} {state}")
        return {}
    failures = _run_all(todo, runs, out, cfg, quiet, jobs)
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
    f = (out / ".lock").open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError(f"another `detkd bench` is running in {out} (it holds {out / '.lock'}); wait for it "
                          "or use another output_dir") from None
    return f


def _run_all(todo: list[BenchRun], runs: list[BenchRun], out: Path, cfg: Any, quiet: bool, jobs: int) -> list[str]:
    """Run ``todo``, up to ``jobs`` at once, in plan order as their dependencies finish; the report is
    rewritten after every run. Returns the names of the runs that failed or were skipped for a failure."""
    planned = {r.name for r in runs}
    done = {r.name for r in runs if r not in todo}
    pending = list(todo)
    running: dict[Future, tuple[int, BenchRun]] = {}
    failures: list[str] = []
    numbered = completed = 0  # runs started (or skipped), runs ended
    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            while pending or running:
                for r in list(pending):
                    if len(running) >= jobs:
                        break
                    blocked = _blocked_by(r, failures)
                    if blocked:
                        pending.remove(r)
                        numbered += 1
                        completed += 1
                        info(f"[{numbered}/{len(todo)}] {r.name}: skipped, it needs {blocked} which failed")
                        failures.append(r.name)
                        continue
                    if any(n in planned and n not in done for n in _needs(r)):
                        continue  # its teacher or pre-training is still running
                    pending.remove(r)
                    numbered += 1
                    info(f"[{numbered}/{len(todo)}] {r.name}: {r.command} "
                         f"({_eta(t_start, completed, len(todo) - completed)})")
                    running[pool.submit(execute, r, out, quiet)] = (numbered, r)
                if not running:
                    break
                finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished_now:
                    i, r = running.pop(fut)
                    completed += 1
                    try:
                        res = fut.result()
                    except BenchError as e:
                        info(str(e))
                        failures.append(r.name)
                        continue
                    done.add(r.name)
                    info(f"[{i}/{len(todo)}] {r.name}: mAP {res['metrics']['mAP']:.4f} in "
                         f"{res['wall_s'] / 60:.1f} min, peak {res['peak_rss_mb']:.0f} MB")
                    write_report(out, runs, cfg)
        except BaseException:
            _stop_live()
            raise
    return failures


def _needs(run: BenchRun) -> list[str]:
    """The runs this one starts from: the teacher (distilled rows), its seed's pre-training (warm start)."""
    needs = []
    if run.command == "distill":
        needs.append("teacher")
    if run.seed >= 0 and run.row not in ("pretrain", "fair_budget"):
        needs.append(f"seed{run.seed}/pretrain")
    return needs


def _blocked_by(run: BenchRun, failures: list[str]) -> str:
    """The failed run this one depends on (the teacher, or its seed's pre-training), if any."""
    return next((n for n in _needs(run) if n in failures), "")


def _eta(t_start: float, finished: int, left: int) -> str:
    """``left`` runs not ended yet; the time left at the bench's pace so far (wall time per ended run, which
    counts the runs that ran side by side)."""
    if finished == 0:
        return f"{left} to go"
    per = (time.perf_counter() - t_start) / finished
    return f"{left} to go, about {per * left / 60:.0f} min left"
