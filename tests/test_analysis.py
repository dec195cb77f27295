"""``detkd analyze``: Fig. 1 relation discrepancies (hand-checked) and Fig. 3 detection grids, with their commands."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from PIL import Image

from detkd.cli import main
from detkd.commands.detections import (
    FP_COLOR,
    GAP,
    GT_COLOR,
    HEADER_H,
    TP_COLOR,
    detections_grid,
    draw_detections,
    grid_size,
    match_detections,
    parse_model_specs,
)
from detkd.commands.relations import (
    KINDS,
    RELATIONS,
    Bases,
    choose_bases,
    discrepancy,
    kmeans_bases,
    pool_discrepancies,
    relation_discrepancy,
    relations,
)
from detkd.config import ConfigError, to_dict
from detkd.models import build_detector
from detkd.runtime.checkpoint import CheckpointError
from tests.engine_helpers import random_global_pair, tiny_config, tiny_model

# ----------------------------------------------------------------------------------------------------------
# Relations and discrepancy (Fig. 1)


def _bases(t, s):
    return Bases(torch.tensor(t, dtype=torch.float32), torch.tensor(s, dtype=torch.float32),
                 torch.zeros(0, dtype=torch.int64))


def test_identical_spaces_give_zero_discrepancy_for_every_kind_and_relation():
    torch.manual_seed(0)
    ft = torch.randn(30, 8)
    fs = ft.clone()
    bases = choose_bases(ft, fs, 4, lam=10.0)
    assert set(bases) == set(KINDS)
    for kind, b in bases.items():
        assert torch.equal(b.teacher, b.student), kind  # same instances / same members in both spaces
    for r in RELATIONS:
        d = relation_discrepancy(ft, fs, bases, r, lam=10.0)
        for kind in KINDS:
            assert d[kind].shape[0] > 0
            torch.testing.assert_close(d[kind], torch.zeros_like(d[kind]), atol=1e-5, rtol=0)
    res = pool_discrepancies([ft, ft * 3], [fs, fs * 3], torch.tensor([1] * 15 + [2] * 15), 3)
    for r in RELATIONS:
        for kind in KINDS:
            v = res.values[r][kind]
            assert v.shape == res.levels.shape and float(v.abs().max()) < 1e-4


def test_cosine_discrepancy_hand_computed():
    # teacher bases e1, e2; student bases e1, 2 e2 (cosine ignores the length)
    bases = _bases([[1, 0], [0, 1]], [[1, 0], [0, 2]])
    ft = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    fs = torch.tensor([[3.0, 4.0], [0.0, 5.0]])
    rt, rs = relations(ft, fs, bases, "cosine")
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(rt, torch.tensor([[s, s], [1.0, 0.0]]))
    torch.testing.assert_close(rs, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    # |0.6 - 1/sqrt2| + |0.8 - 1/sqrt2| = 0.2; |0 - 1| + |1 - 0| = 2 (l1 over the bases)
    torch.testing.assert_close(discrepancy(rt, rs, "cosine"), torch.tensor([0.2, 2.0]))
    d = relation_discrepancy(ft, fs, {"x": bases}, "cosine")
    torch.testing.assert_close(d["x"], torch.tensor([0.2, 2.0]))


def test_projection_discrepancy_hand_computed():
    # one basis: p_t = <f^t, g^t> = 3, n_t = 1, p_s = <f^s, g^s> = 4, n_s = 4. Eq. 5 with lam = 1:
    # den = n_t n_s + lam (n_t + n_s) = 9, a = ((n_s + lam) p_t + lam p_s) / den = 19/9,
    # b = ((n_t + lam) p_s + lam p_t) / den = 11/9, so ||Lambda^s - Lambda^t||_2 = 8/9; lam = 0: a = 3, b = 1.
    bases = _bases([[1, 0]], [[2, 0]])
    ft, fs = torch.tensor([[3.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    rt, rs = relations(ft, fs, bases, "projection", lam=1.0)
    torch.testing.assert_close(rt, torch.tensor([[19 / 9]]))
    torch.testing.assert_close(rs, torch.tensor([[11 / 9]]))
    torch.testing.assert_close(discrepancy(rt, rs, "projection"), torch.tensor([8 / 9]))
    d = relation_discrepancy(ft, fs, {"x": bases}, "projection", lam=0.0)
    torch.testing.assert_close(d["x"], torch.tensor([2.0]))
    # two orthogonal bases, lam = 0 (decoupled): Lambda^t = (3, 4), Lambda^s = (4/4, 6/1) -> sqrt(4 + 4)
    bases = _bases([[1, 0], [0, 1]], [[2, 0], [0, 1]])
    d = relation_discrepancy(torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 6.0]]), {"x": bases}, "projection",
                             lam=0.0)
    torch.testing.assert_close(d["x"], torch.tensor([2 * math.sqrt(2)]))


def test_basis_instances_are_not_measured():
    torch.manual_seed(1)
    ft, fs = torch.randn(12, 5), torch.randn(12, 7)
    bases = choose_bases(ft, fs, 3, seed=4)
    assert bases["random"].instances.numel() == 3 and bases["kmeans"].instances.numel() == 0
    used = torch.cat([bases["prototypes"].instances, bases["random"].instances]).unique()
    d = relation_discrepancy(ft, fs, bases, "cosine")
    assert all(v.shape == (12 - used.numel(),) for v in d.values())
    d = relation_discrepancy(ft, fs, bases, "projection", exclude=torch.tensor([0, 1]))
    rt, rs = relations(ft[2:], fs[2:], bases["random"], "projection")
    torch.testing.assert_close(d["random"], (rs - rt).norm(dim=1))


def test_kmeans_centres_are_the_same_members_in_both_spaces():
    # clusters {0, 1} and {2, 3, 4} are obvious in the teacher space; the student centres average the same rows
    ft = torch.tensor([[0.0, 0.0], [0.2, 0.0], [10.0, 10.0], [10.0, 10.4], [10.2, 10.0]])
    fs = torch.tensor([[1.0], [3.0], [5.0], [7.0], [9.0]])
    b = kmeans_bases(ft, fs, 2)
    pairs = sorted(zip(b.teacher.tolist(), b.student.tolist()))
    torch.testing.assert_close(torch.tensor([p[0] for p in pairs]),
                               torch.tensor([[0.1, 0.0], [30.2 / 3, 30.4 / 3]]))
    torch.testing.assert_close(torch.tensor([p[1] for p in pairs]), torch.tensor([[2.0], [7.0]]))
    # clustering in the student space: {0, 1, 2} and {3, 4} there; the teacher centres follow
    fs = torch.tensor([[0.0], [0.5], [1.0], [20.0], [21.0]])
    b = kmeans_bases(ft, fs, 2, space="student")
    pairs = sorted(zip(b.student.tolist(), b.teacher.tolist()))
    torch.testing.assert_close(torch.tensor([p[0] for p in pairs]), torch.tensor([[0.5], [20.5]]))
    torch.testing.assert_close(torch.tensor([p[1] for p in pairs]),
                               torch.tensor([[10.2 / 3, 10.0 / 3], [10.1, 10.2]]))


def test_pool_skips_classes_with_too_few_instances():
    torch.manual_seed(2)
    labels = torch.tensor([1] * 12 + [2] * 2)
    ft, fs = [torch.randn(14, 4)], [torch.randn(14, 6)]
    res = pool_discrepancies(ft, fs, labels, 2)
    assert res.skipped == [(0, 2, 2)]
    assert (res.classes == 1).all() and (res.levels == 0).all()
    n = res.classes.numel()
    assert 12 - 4 <= n <= 12 - 2  # at most 2 PGM + 2 random instances left out
    assert all(res.values[r][k].shape == (n,) for r in RELATIONS for k in KINDS)


# ----------------------------------------------------------------------------------------------------------
# Drawing (Fig. 3)


def test_grid_size_and_cells():
    cell = 40
    cells = [[Image.new("RGB", (cell, cell), (10 * r, 50 + 60 * c, 0)) for c in range(3)] for r in range(2)]
    grid = detections_grid(cells, ["a", "b", "c"], cell)
    assert grid.size == grid_size(2, 3, cell) == (GAP + 3 * (cell + GAP), HEADER_H + 2 * (cell + GAP) + GAP)
    for r in range(2):
        for c in range(3):
            centre = (GAP + c * (cell + GAP) + cell // 2, HEADER_H + r * (cell + GAP) + cell // 2)
            assert grid.getpixel(centre) == (10 * r, 50 + 60 * c, 0)
    with pytest.raises(ValueError, match="row 0"):
        detections_grid([[cells[0][0]]], ["a", "b"], cell)


def test_draw_detections_outlines_boxes_in_their_colours():
    base = Image.new("RGB", (100, 100), (128, 128, 128))
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 12.0, 12.0]])
    out = draw_detections(base, boxes, torch.tensor([3, 4]), torch.tensor([0.9, 0.4]), class_names={3: "three"},
                          colors=[TP_COLOR, FP_COLOR], scale=2.0)
    assert out.size == base.size and base.getpixel((20, 40)) == (128, 128, 128)  # the input is not changed
    assert out.getpixel((20, 50)) == TP_COLOR  # left edge of box 0 at x = 10 * 2
    assert out.getpixel((40, 79)) == TP_COLOR  # bottom edge at y = 40 * 2 (the 2 px outline grows inwards)
    assert out.getpixel((40, 60)) == (128, 128, 128)  # inside the box: untouched
    assert out.getpixel((10, 18)) == FP_COLOR  # box 1 (5..12) * 2
    empty = draw_detections(base, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64))
    assert empty.tobytes() == base.tobytes()


def test_match_detections_greedy_by_score():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    gl = torch.tensor([1, 2])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0],
                          [40.0, 40.0, 50.0, 50.0]])
    labels = torch.tensor([1, 1, 1, 1])
    scores = torch.tensor([0.5, 0.9, 0.8, 0.7])
    # box 1 (higher score) takes gt 0, box 0 is a duplicate, box 2 has the wrong class, box 3 hits nothing
    assert match_detections(boxes, labels, scores, gt, gl).tolist() == [False, True, False, False]
    assert match_detections(boxes[:0], labels[:0], scores[:0], gt, gl).tolist() == []


def test_parse_model_specs_errors(tmp_path):
    ckpt = tmp_path / "a.pt"
    ckpt.write_bytes(b"x")
    assert parse_model_specs([f"student={ckpt}", f" global = {ckpt}"]) == [
        ("student", str(ckpt)), ("global", str(ckpt))]
    for bad in ("nolabel", f"={ckpt}", "a=", ""):
        with pytest.raises(ConfigError, match="LABEL=CHECKPOINT"):
            parse_model_specs([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_model_specs([f"a={ckpt}", f"a={ckpt}"])
    with pytest.raises(CheckpointError, match="not found"):
        parse_model_specs([f"a={tmp_path / 'missing.pt'}"])


# ----------------------------------------------------------------------------------------------------------
# The commands on a tiny random pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("analysis")
    cfg, cfg_path, student_cfg = random_global_pair(root, teacher_fpn=24, student_fpn=16, k=5, train_images=40)
    torch.manual_seed(3)
    torch.save(build_detector(student_cfg).state_dict(), root / "distilled.pt")
    return {"root": root, "cfg": cfg, "cfg_path": cfg_path}


def test_relations_command_writes_histograms_and_numbers(pair):
    out = pair["root"] / "relations"
    rc = main(["analyze", "relations", str(pair["cfg_path"]), "--checkpoint", str(pair["root"] / "student.pt"),
               "--out", str(out), "--k", "2"])
    assert rc == 0
    summary = json.loads((out / "relations.json").read_text())
    assert summary["k"] == 2 and summary["lam"] == 10.0 and summary["method"] == "global"
    assert summary["levels"] == ["0", "1", "2", "p6", "p7"]
    counts = set()
    for r in RELATIONS:
        for kind in KINDS:
            s = summary["overall"][r][kind]
            counts.add(s["count"])
    assert len(counts) == 1  # every kind and relation measures the same instances
    raw = torch.load(out / "relations.pt", weights_only=True)
    assert raw["levels"].shape[0] == counts.pop() > 0
    for r in RELATIONS:
        for kind in KINDS:
            # the summary describes the saved discrepancies (a discrepancy is a norm: >= 0 by construction)
            v = raw["values"][r][kind].double()
            s = summary["overall"][r][kind]
            assert (s["mean"], s["median"], s["p90"]) == (float(v.mean()), float(v.median()),
                                                          float(torch.quantile(v, 0.9)))
    with Image.open(out / "relations.png") as im:
        assert im.width > 600 and im.height > 300
        assert len(im.convert("RGB").getcolors(1 << 20)) > 10  # not a blank canvas


def test_relations_command_errors(pair, tmp_path, capsys):
    rc = main(["analyze", "relations", str(pair["cfg_path"]), "--checkpoint", str(tmp_path / "missing.pt"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    plain = tiny_config(pair["root"] / "data", tmp_path / "run", train_images=40)
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(to_dict(plain), sort_keys=False))
    rc = main(["analyze", "relations", str(path), "--checkpoint", str(pair["root"] / "student.pt"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "no distill section" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_detections_command_grid(pair, tmp_path):
    out = tmp_path / "fig3.png"
    root = pair["root"]
    rc = main(["analyze", "detections", str(pair["cfg_path"]), "--model", f"student={root / 'student.pt'}",
               "--model", f"distilled={root / 'distilled.pt'}", "--gt", "--images", "2", "--score", "0",
               "--cell", "64", "--out", str(out)])
    assert rc == 0
    listing = json.loads(out.with_suffix(".json").read_text())
    assert listing["columns"] == ["ground truth", "teacher", "student", "distilled"]
    assert len(listing["images"]) == 2
    with Image.open(out) as im:
        im = im.convert("RGB")
        assert im.size == grid_size(2, 4, 64)
        for r, entry in enumerate(listing["images"]):
            assert listing["detections"]["ground truth"][str(entry["image_id"])], "digits images hold digits"
            top = HEADER_H + r * (64 + GAP)
            gt_cell = im.crop((GAP, top, GAP + 64, top + 64))
            assert any(color == GT_COLOR for _, color in gt_cell.getcolors(64 * 64))  # boxes drawn
    for label in ("teacher", "student", "distilled"):
        for dets in listing["detections"][label].values():
            assert all(d["score"] >= 0 and isinstance(d["correct"], bool) for d in dets)


def test_detections_teacher_checkpoint_as_a_column(pair, tmp_path):
    """A checkpoint that does not fit the student model is loaded as the config's teacher model."""
    out = tmp_path / "t.png"
    rc = main(["analyze", "detections", str(pair["cfg_path"]), "--no-teacher", "--model",
               f"big={pair['root'] / 'teacher.pt'}", "--images", "1", "--cell", "48", "--out", str(out)])
    assert rc == 0
    assert json.loads(out.with_suffix(".json").read_text())["columns"] == ["big"]
    with Image.open(out) as im:
        assert im.size == grid_size(1, 1, 48)


def test_detections_command_errors(pair, tmp_path, capsys):
    cfg, root = str(pair["cfg_path"]), pair["root"]
    out = str(tmp_path / "x.png")
    rc = main(["analyze", "detections", cfg, "--model", "student", "--out", out])
    assert rc == 2 and "LABEL=CHECKPOINT" in capsys.readouterr().err
    rc = main(["analyze", "detections", cfg, "--model", f"s={tmp_path / 'none.pt'}", "--out", out])
    assert rc == 2 and "not found" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pt"
    torch.save(build_detector(tiny_model("retinanet", fpn=8)).state_dict(), wrong)
    rc = main(["analyze", "detections", cfg, "--model", f"w={wrong}", "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and "--model w" in err and "fits neither" in err
    rc = main(["analyze", "detections", cfg, "--no-teacher", "--out", out])
    assert rc == 2 and "no model" in capsys.readouterr().err
    rc = main(["analyze", "detections", cfg, "--model", f"s={root / 'student.pt'}", "--out", str(tmp_path / "x.jpg")])
    assert rc == 2 and ".png" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
