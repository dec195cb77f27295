"""The recommendations `detkd methods` prints: valid configs for the families they name, marked in the list."""

import re

import pytest
import yaml

from detkd.cli import main
from detkd.distill import REGISTRY, build_distiller
from detkd.distill import recommended as rec_mod
from detkd.distill.recommended import Recommendation, as_config

LEVELS = {"faster_rcnn": 5, "retinanet": 5, "fcos": 5}


@pytest.mark.parametrize("rec", rec_mod.RECOMMENDED + rec_mod.BEST_OPTIONS,
                         ids=lambda r: f"{r.method}-{'-'.join(r.archs)}")
def test_each_recommendation_builds_for_the_families_it_names(rec):
    assert rec.method in REGISTRY
    # it says what it rests on: the seeds and the paired gain's interval
    assert re.search(r"\d seeds", rec.evidence) and re.search(r"\[[+-]\d", rec.evidence), rec.evidence
    for arch in rec.archs:
        # the options must pass the same validation a config's distill.methods entry does
        build_distiller(rec.method, dict(rec.options), [16] * LEVELS[arch], [8] * LEVELS[arch], arch)


def test_as_config_is_the_yaml_entry_a_user_pastes():
    rec = Recommendation(("faster_rcnn",), "global", {"adapter": "conv3x3", "use_resp": False, "a_feat": 0.5})
    entry = yaml.safe_load(as_config(rec))
    assert entry == {"name": "global", "adapter": "conv3x3", "use_resp": False, "a_feat": 0.5}


def test_methods_marks_exactly_the_recommended_methods(capsys, monkeypatch):
    recs = (Recommendation(("fcos", "retinanet"), "defeat", {}, "converged FCOS bench, 5 seeds: +4.0"),
            Recommendation(("faster_rcnn",), "fgfi", {}, "converged Faster R-CNN bench, 5 seeds: +2.0"))
    monkeypatch.setattr(rec_mod, "RECOMMENDED", recs)
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    marked = {line.split()[0] for line in lines if len(line.split()) > 1 and line.split()[1] == "*"}
    assert marked == {"defeat", "fgfi"}
    assert "    fcos, retinanet: {name: defeat}" in lines and "    faster_rcnn: {name: fgfi}" in lines
    assert main(["methods", "defeat"]) == 0
    out = capsys.readouterr().out
    assert "recommended for fcos, retinanet: {name: defeat}" in out and "5 seeds: +4.0" in out
    assert main(["methods", "gid"]) == 0
    assert "recommended" not in capsys.readouterr().out


def test_methods_says_when_nothing_is_recommended(capsys, monkeypatch):
    monkeypatch.setattr(rec_mod, "RECOMMENDED", ())
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "No method is recommended yet" in out and " * " not in out


def test_listing_into_a_closed_pipe_is_not_an_error():
    # `detkd methods | head -3`: the reader leaves early; no BrokenPipeError traceback, exit 0
    import subprocess
    import sys

    cmd = f"{sys.executable} -m detkd.cli methods global | head -n 2"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith("global:")


def test_methods_prints_the_best_options_of_a_method_that_is_not_recommended(capsys, monkeypatch):
    best = (Recommendation(("fcos", "retinanet"), "global", {"adapter": "conv3x3", "use_resp": False},
                           "converged FCOS bench, 3 seeds: +4.0 [+2.2, +5.8]"),)
    monkeypatch.setattr(rec_mod, "BEST_OPTIONS", best)
    assert main(["methods", "global"]) == 0
    out = capsys.readouterr().out
    assert "best options found for fcos, retinanet: {name: global, adapter: conv3x3, use_resp: false}" in out
    assert "3 seeds: +4.0 [+2.2, +5.8]" in out
    assert main(["methods", "defeat"]) == 0
    assert "best options found" not in capsys.readouterr().out
