"""`detkd demo --quick`: every run of the demo bench finishes, the table is printed, and a rerun skips them."""

import json

from detkd.cli import main


def test_quick_demo_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("teacher", "student, pre-trained", "student baseline", "+ fgfi", "+ global", "fair budget"):
        assert row in printed
    data = json.loads((out / "runs" / "results.json").read_text())
    assert len(data["runs"]) == 6
    assert all(0.0 <= r["metrics"]["mAP"] <= 1.0 for r in data["runs"])
    assert (out / "runs" / "map.png").is_file()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert "6 runs (6 finished earlier)" in capsys.readouterr().err
