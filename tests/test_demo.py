"""`detkd demo --quick`: every run of the demo bench finishes, the table is printed, and a rerun skips them."""

import json

from detkd.cli import main


def test_quick_demo_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("teacher", "student baseline (1 ep)", "| fgfi", "| global", "[demo] at the same budget",
                "+ fgfi:", "+ global:"):
        assert row in printed
    assert "pre-trained" not in printed and "fair budget" not in printed  # fixed budget, no warm start
    data = json.loads((out / "runs" / "results.json").read_text())
    assert len(data["runs"]) == 4
    inits = {r["student_init"] for r in data["runs"] if r["row"] != "teacher"}
    assert len(inits) == 1  # the three students start from the same weights
    # each run's metrics are those its run wrote (final.json), and each row of the one-seed table is its run's
    for r in data["runs"]:
        assert r["metrics"] == {k: v for k, v in json.loads((out / "runs" / r["name"] / "final.json").read_text())
                                .items() if k != "gpu_peak_mb"}
    assert {e["row"]: e["mAP"] for e in data["table"]} == {r["row"]: r["metrics"]["mAP"] for r in data["runs"]}
    assert (out / "runs" / "map.png").is_file()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert "4 runs (4 finished earlier)" in capsys.readouterr().err


def test_story_names_each_gain():
    from detkd.commands.demo import story

    table = [{"row": "teacher", "mAP": 0.5, "epochs": 4}, {"row": "baseline", "mAP": 0.25, "epochs": 3},
             {"row": "fgfi", "mAP": 0.335, "epochs": 3}, {"row": "global", "mAP": 0.24, "epochs": 3}]
    text = story(table)
    assert "student alone reaches mAP 0.250 (teacher 0.500)" in text
    assert "+ fgfi: 0.335, +8.5 points: better" in text
    assert "+ global: 0.240, -1.0 points: within seed-to-seed noise" in text
    table[3]["mAP"] = 0.21
    assert "+ global: 0.210, -4.0 points: worse" in story(table)


def test_story_ends_with_what_the_converged_benches_recommend(monkeypatch):
    from detkd.commands.demo import story
    from detkd.distill import recommended
    from detkd.distill.recommended import Recommendation

    table = [{"row": "baseline", "mAP": 0.25, "epochs": 3}, {"row": "fgfi", "mAP": 0.335, "epochs": 3}]
    monkeypatch.setattr(recommended, "RECOMMENDED", (Recommendation(("fcos",), "defeat", {}, "5 seeds: +4.0"),))
    last = story(table).splitlines()[-1]
    assert last.startswith("[demo] converged benches") and "recommend fcos: {name: defeat} (the evidence: " in last
    monkeypatch.setattr(recommended, "RECOMMENDED", ())
    assert "no method's gain is yet above its seed-to-seed spread" in story(table).splitlines()[-1]
