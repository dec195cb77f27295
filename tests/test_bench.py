"""`detkd bench`: a two-method, one-epoch bench on tiny digits runs end to end, writes its table and plots,
and a rerun skips finished runs; the summary statistics are checked by hand."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from detkd.bench import load_bench, plan_runs
from detkd.bench.table import format_markdown, summarise
from detkd.cli import main
from detkd.config import ConfigError, to_dict
from tests.engine_helpers import tiny_config, tiny_model


def _write_pair(tmp_path):
    student = tiny_config(tmp_path / "data", tmp_path / "unused", train_images=8)
    student.train.eval_every = 0
    student_raw = to_dict(student)
    student_raw.pop("distill")
    teacher_raw = json.loads(json.dumps(student_raw))
    teacher_raw["model"] = to_dict(tiny_model(fpn=48))
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(student_raw))
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher_raw))


def _bench_file(tmp_path, **extra) -> str:
    _write_pair(tmp_path)
    bench = {"student_config": "student.yaml", "teacher_config": "teacher.yaml", "seeds": [0],
             "pretrain_epochs": 1, "epochs": 1, "output_dir": str(tmp_path / "bench"),
             "distill_overrides": ["distill.balance=2.0"],
             "methods": {"fitnet": ["fitnet"], "kd": {"methods": [{"name": "kd", "weight": 0.5}],
                                                      "overrides": ["train.clip_grad=10"]}}}
    bench.update(extra)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return str(path)


def test_plan_shares_one_start_and_validates_early(tmp_path):
    path = _bench_file(tmp_path)
    cfg, methods = load_bench(path)
    runs = {r.name: r for r in plan_runs(cfg, methods)}
    assert list(runs) == ["teacher", "seed0/pretrain", "seed0/baseline", "seed0/fitnet", "seed0/kd",
                          "seed0/fair_budget"]
    init = str(tmp_path / "bench" / "seed0" / "pretrain" / "last.pt")
    assert runs["seed0/baseline"].raw["model"]["weights"] == init
    for name in ("seed0/fitnet", "seed0/kd"):
        d = runs[name].raw["distill"]
        assert (d["student_init"], d["student_checkpoint"]) == ("checkpoint", init)
        assert d["teacher_checkpoint"] == str(tmp_path / "bench" / "teacher" / "last.pt")
        assert d["teacher"]["fpn_channels"] == 48
    assert runs["seed0/kd"].raw["train"]["clip_grad"] == 10  # the row's own override
    assert runs["seed0/kd"].raw["distill"]["balance"] == 2.0  # distill_overrides: distilled runs only
    assert "distill" not in runs["seed0/baseline"].raw and "distill" not in runs["teacher"].raw
    assert runs["seed0/fitnet"].raw["train"]["clip_grad"] == 0.0
    assert runs["seed0/fair_budget"].raw["train"]["epochs"] == 2  # pre-training + distillation
    assert "weights" not in runs["seed0/fair_budget"].raw["model"] or \
        runs["seed0/fair_budget"].raw["model"]["weights"] == "none"

    # a bad method option fails while planning, naming the run, before anything trains
    bad = _bench_file(tmp_path, methods={"kd": [{"name": "kd", "weight": -1}]})
    cfg, methods = load_bench(bad)
    with pytest.raises(ConfigError, match=r"seed0/kd.*weight must be >= 0"):
        plan_runs(cfg, methods)
    bad = _bench_file(tmp_path, methods={"kd": [{"name": "kd", "temperature": -1}]})
    with pytest.raises(ConfigError, match=r"seed0/kd: distill.methods\[0\].*temperature"):
        plan_runs(*load_bench(bad))
    with pytest.raises(ConfigError, match="unknown row 'fgd'"):
        plan_runs(*load_bench(path), only=["fgd"])
    with pytest.raises(ConfigError, match="student_config: file not found"):
        load_bench(_bench_file(tmp_path, student_config="nope.yaml"))
    with pytest.raises(ConfigError, match="reserved"):
        load_bench(_bench_file(tmp_path, methods={"baseline": ["kd"]}))


def test_summary_statistics_by_hand():
    def res(row, seed, m):
        return {"row": row, "seed": seed, "epochs": 1, "wall_s": 60.0 * (seed + 1), "peak_rss_mb": 100.0 + seed,
                "metrics": {"mAP": m, "AP50": 2 * m, "AP75": m, "APs": m, "APm": m, "APl": -1.0}}

    results = [res("baseline", 0, 0.30), res("baseline", 1, 0.34), res("kd", 0, 0.33), res("kd", 1, 0.39),
               res("teacher", -1, 0.5)]
    table = {e["row"]: e for e in summarise(results, ["teacher", "baseline", "kd"])}
    kd = table["kd"]
    assert kd["mAP"] == pytest.approx(0.36)
    assert kd["mAP_std"] == pytest.approx(0.0424264, abs=1e-6)  # sample std of 0.33, 0.39
    assert kd["gain"] == pytest.approx(0.04)  # mean of the paired gains 0.03 and 0.05
    assert kd["gain_std"] == pytest.approx(0.0141421, abs=1e-6)
    assert kd["APl"] is None  # -1: no large objects
    assert kd["wall_min"] == pytest.approx(1.5) and kd["peak_rss_mb"] == 101.0
    assert table["baseline"]["gain"] is None and table["teacher"]["gain"] is None
    assert table["teacher"]["mAP_std"] == 0.0
    # 95% interval of the paired gain: t(0.975, df 1) = 12.706, half width 12.706 * 0.0141421 / sqrt(2) = 0.12706
    assert (kd["gain_lo"], kd["gain_hi"]) == (pytest.approx(0.04 - 0.12706, abs=1e-5),
                                              pytest.approx(0.04 + 0.12706, abs=1e-5))
    assert kd["significant"] is False and table["teacher"]["gain_lo"] is None
    # the teacher leads the baseline (mean 0.32) by 0.18; kd's mean gain 0.04 closes 0.04 / 0.18 of it
    assert kd["gap_closed"] == pytest.approx(0.04 / 0.18)
    assert table["baseline"]["gap_closed"] is None and table["teacher"]["gap_closed"] is None
    assert format_markdown([table["kd"]], 0).splitlines()[2].split(" | ")[8] == "22%"

    # three seeds, gains 0.05, 0.06, 0.07: std 0.01, half width t(df 2) 4.303 * 0.01 / sqrt(3) = 0.024843
    results = [res("baseline", s, 0.3) for s in range(3)] + [res("fgfi", s, 0.35 + 0.01 * s) for s in range(3)]
    fgfi = {e["row"]: e for e in summarise(results, ["baseline", "fgfi"])}["fgfi"]
    assert fgfi["gain_lo"] == pytest.approx(0.06 - 0.024843, abs=1e-5)
    assert fgfi["mAP_hi"] == pytest.approx(0.36 + 0.024843, abs=1e-5)
    assert fgfi["significant"] is True and fgfi["gap_closed"] is None  # no teacher row: no gap
    assert format_markdown([fgfi], 0).splitlines()[2].split(" | ")[7] == "+0.060 [+0.035, +0.085] *"


def test_bench_runs_writes_table_and_plots_and_resumes(tmp_path, capsys):
    path = _bench_file(tmp_path)
    out = tmp_path / "bench"
    t0 = time.perf_counter()
    assert main(["bench", path]) == 0
    elapsed = time.perf_counter() - t0
    printed = capsys.readouterr().out
    for label in ("teacher", "pre-trained (1 ep)", "student baseline (+1 ep)", "fair budget (2 ep)",
                  "+ fitnet", "+ kd"):
        assert label in printed
    for name in ("table.md", "table.csv", "results.json", "map.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "map.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 6
    assert {e["row"] for e in data["table"]} == {"teacher", "pretrain", "baseline", "fair_budget", "fitnet", "kd"}
    for r in data["runs"]:  # the metrics each run wrote; the bench's table holds them (one seed: the mean is the run's)
        written = out / r["name"] / ("eval.json" if r["command"] == "eval" else "final.json")
        assert r["metrics"] == {k: v for k, v in json.loads(written.read_text()).items() if k != "gpu_peak_mb"}
        # peak RSS of the run's own process in MB: a torch process holds a few hundred MB, so kB (x1024) or
        # bytes (x2^20) fall outside; each run's wall time is part of the bench's
        assert 150 < r["peak_rss_mb"] < 8_000
    assert 0 < sum(r["wall_s"] for r in data["runs"]) <= elapsed
    assert {e["row"]: e["mAP"] for e in data["table"]} == {r["row"]: r["metrics"]["mAP"] for r in data["runs"]}
    csv_head = (out / "table.csv").read_text().splitlines()[0]
    assert csv_head.startswith("row,n,epochs,mAP,mAP_std")

    # rerun: finished runs are skipped; a run whose result is missing runs again (resuming its last.pt)
    kept = {p: p.stat().st_mtime_ns for p in out.glob("**/result.json") if "kd" not in str(p)}
    (out / "seed0" / "kd" / "result.json").unlink()
    # --report runs nothing (even beside a running bench: it takes no lock) and tables what is finished
    from detkd.bench.run import _lock

    (out / "table.md").unlink()
    held = _lock(out)
    assert main(["bench", path, "--report"]) == 0
    held.close()
    assert "table of 5 finished runs of 6" in capsys.readouterr().err
    assert not (out / "seed0" / "kd" / "result.json").exists()
    table = (out / "table.md").read_text()
    assert "+ fitnet" in table and "+ kd" not in table
    assert main(["bench", path]) == 0
    err = capsys.readouterr().err
    assert "6 runs (5 finished earlier)" in err
    assert "[1/1] seed0/kd" in err
    assert (out / "seed0" / "kd" / "result.json").is_file()
    assert json.loads((out / "seed0" / "kd" / "result.json").read_text())["resumed"] is True
    assert {p: p.stat().st_mtime_ns for p in kept} == kept

    # a finished run is not reused under another config: the bench stops and names it, deleting nothing
    changed = yaml.safe_load(open(path))
    changed["methods"]["kd"]["methods"][0]["weight"] = 0.25
    open(path, "w").write(yaml.safe_dump(changed))
    assert main(["bench", path]) == 2
    assert "bench run seed0/kd finished with another config" in capsys.readouterr().err
    assert (out / "seed0" / "kd" / "result.json").is_file()


def test_failed_run_is_reported_and_blocks_its_dependants(tmp_path, capsys):
    path = _bench_file(tmp_path, teacher_overrides=["data.root=" + str(tmp_path / "no_such_data")],
                       overrides=["data.format=coco"])
    assert main(["bench", path, "--methods", "kd"]) == 1
    err = capsys.readouterr().err
    assert "run teacher failed" in err
    assert "seed0/kd: skipped, it needs teacher" in err
    assert "rerun the bench to retry them" in err


def test_second_bench_on_the_same_folder_is_refused(tmp_path):
    from detkd.bench.run import _lock

    held = _lock(tmp_path)
    with pytest.raises(ConfigError, match="another `detkd bench` is running"):
        _lock(tmp_path)
    held.close()
    _lock(tmp_path).close()  # free again once the first one is gone


def test_fixed_budget_rows_share_the_start_and_the_table_marks_intervals(tmp_path, capsys):
    """The default protocol: no pre-training; baseline and distilled rows train the same random student for
    the same epochs, which the runs' logged start fingerprints prove."""
    path = _bench_file(tmp_path, pretrain_epochs=0, seeds=[0, 1])
    out = tmp_path / "bench"
    cfg, methods = load_bench(path)
    runs = {r.name: r for r in plan_runs(cfg, methods)}
    assert [n for n in runs if n.startswith("seed0")] == ["seed0/baseline", "seed0/fitnet", "seed0/kd"]
    assert runs["seed0/fitnet"].raw["distill"]["student_init"] == "none"
    assert all(r.raw["train"]["epochs"] == 1 for r in runs.values())
    assert main(["bench", path]) == 0
    capsys.readouterr()
    res = {p.parent.name + "/" + p.parent.parent.name: json.loads(p.read_text())
           for p in out.glob("seed*/*/result.json")}
    for seed in ("seed0", "seed1"):
        inits = {res[f"{row}/{seed}"]["student_init"] for row in ("baseline", "fitnet", "kd")}
        assert len(inits) == 1 and None not in inits  # one start per seed ...
    assert res["baseline/seed0"]["student_init"] != res["baseline/seed1"]["student_init"]  # ... seeds differ
    table = (out / "table.md").read_text()
    assert "Fixed budget" in table and "randomly initialised student" in table and "ΔmAP [95% CI]" in table
    kd_line = next(line for line in table.splitlines() if line.startswith("| kd "))
    assert "[" in kd_line  # two seeds: an interval
    data = json.loads((out / "results.json").read_text())
    kd = next(e for e in data["table"] if e["row"] == "kd")
    assert kd["gain_lo"] <= kd["gain"] <= kd["gain_hi"]


def test_a_row_can_run_on_some_seeds_only(tmp_path):
    """An ablation row on one seed: planned for that seed only; a seed the bench does not run is refused."""
    path = _bench_file(tmp_path, pretrain_epochs=0, seeds=[0, 1],
                       methods={"kd": ["kd"], "fitnet": {"methods": ["fitnet"], "seeds": [1]}})
    names = [r.name for r in plan_runs(*load_bench(path))]
    assert names == ["teacher", "seed0/baseline", "seed0/kd", "seed1/baseline", "seed1/fitnet", "seed1/kd"]
    bad = _bench_file(tmp_path, methods={"fitnet": {"methods": ["fitnet"], "seeds": [7]}})
    with pytest.raises(ConfigError, match=r"methods.fitnet.seeds: \[7\] names a seed the bench does not run"):
        load_bench(bad)


def _pids_running(needle: str) -> list[int]:
    """Processes (Linux /proc) whose command line contains ``needle``."""
    from pathlib import Path

    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = next(line for line in (p / "status").read_text().splitlines() if line.startswith("State"))
            except (OSError, StopIteration):
                continue
            if needle in cmdline and "zombie" not in state:
                found.append(int(p.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_stopped_bench_stops_its_runs(tmp_path, jobs):
    # SIGTERM to the bench (a scheduler, `kill`) used to leave the run it waited for training unwatched; with
    # --jobs 2 the teacher and seed 0's pre-training (which does not need the teacher) run at once: both stop
    path = _bench_file(tmp_path)
    started = [str(tmp_path / "bench" / "teacher" / "run.yaml")]
    if jobs == 2:
        started.append(str(tmp_path / "bench" / "seed0" / "pretrain" / "run.yaml"))
    bench = subprocess.Popen([sys.executable, "-m", "detkd.cli", "bench", path, "--jobs", str(jobs)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not all(_pids_running(c) for c in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_pids_running(c) for c in started), "the runs never started"
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=60) == 128 + signal.SIGTERM
    assert [_pids_running(c) for c in started] == [[]] * len(started)
    assert not (tmp_path / "bench" / "teacher" / "result.json").exists()


def test_jobs_run_side_by_side_after_what_they_start_from(tmp_path, monkeypatch, capsys):
    """--jobs N: at most N runs at once; a distilled row starts after the teacher has finished, a warm-start
    row after its seed's pre-training; every run runs once (a stand-in for the subprocess, timed)."""
    from detkd.bench import run as bench_run

    cfg, methods = load_bench(_bench_file(tmp_path, seeds=[0, 1]))
    runs = plan_runs(cfg, methods)
    lock = __import__("threading").Lock()
    events: list[tuple[str, str, float]] = []
    live = [0, 0]  # now, most

    def fake_execute(run, out, quiet=True):
        with lock:
            events.append(("start", run.name, time.monotonic()))
            live[0] += 1
            live[1] = max(live)
        time.sleep(0.15 if run.row in ("teacher", "pretrain") else 0.05)
        with lock:
            live[0] -= 1
            events.append(("end", run.name, time.monotonic()))
        return {"metrics": {"mAP": 0.5}, "wall_s": 0.1, "peak_rss_mb": 1.0}

    monkeypatch.setattr(bench_run, "execute", fake_execute)
    monkeypatch.setattr(bench_run, "write_report", lambda *a, **k: {})
    failures = bench_run._run_all(runs, runs, tmp_path / "bench", cfg, True, jobs=3)
    assert failures == []
    starts = {n: t for kind, n, t in events if kind == "start"}
    ends = {n: t for kind, n, t in events if kind == "end"}
    assert sorted(starts) == sorted(r.name for r in runs) and len(starts) == len(events) / 2
    assert live[1] == 3
    for r in runs:
        if r.command == "distill":
            assert starts[r.name] >= ends["teacher"], r.name
        if r.seed >= 0 and r.row not in ("pretrain", "fair_budget"):
            assert starts[r.name] >= ends[f"seed{r.seed}/pretrain"], r.name
    assert main(["bench", str(tmp_path / "bench.yaml"), "--jobs", "0"]) == 2
    assert "--jobs 0: give at least 1" in capsys.readouterr().err
