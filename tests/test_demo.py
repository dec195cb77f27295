"""`detkd demo --quick`: every stage runs, the table is printed, and a rerun reuses finished stages."""

import json

from detkd.cli import main


def test_quick_demo_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for run in ("teacher", "student", "fgfi", "global"):
        assert f"| {run}" in printed
        assert (out / ("student_" + run if run in ("fgfi", "global") else run) / "results.json").is_file()
    row = json.loads((out / "teacher" / "results.json").read_text())
    assert 0.0 <= row["mAP"] <= 1.0
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier") == 4
