import glob
from contextlib import nullcontext

import pytest

from detkd.config import Config, ConfigError, config_from_dict, load_config


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_shipped_config_validates():
    # configs/bench/*.yaml are bench files (next test); the run configs they name are under configs/bench/*/
    bench_files = set(glob.glob("configs/bench/*.yaml"))
    files = [f for f in sorted(glob.glob("configs/*/*.yaml") + glob.glob("configs/bench/*/*.yaml"))
             if "_base" not in f and f not in bench_files]
    assert len(files) > 40
    for f in files:
        cfg = load_config(f)
        assert isinstance(cfg, Config)
        if cfg.distill is not None:
            assert cfg.distill.teacher.num_classes == cfg.model.num_classes
            assert cfg.distill.methods


def test_every_shipped_bench_plans_valid_runs(tmp_path):
    from detkd.bench import load_bench, plan_runs

    files = sorted(glob.glob("configs/bench/*.yaml"))
    assert len(files) == 14
    converged = {"configs/bench/converged_faster_rcnn.yaml", "configs/bench/converged_fcos.yaml"}
    two_x = {f"configs/bench/converged_{family}_2x.yaml": f"configs/bench/converged_{family}.yaml"
             for family in ("faster_rcnn", "fcos")}
    two_x_rows = {"configs/bench/converged_faster_rcnn_2x.yaml": {"gid", "mgd"},
                  "configs/bench/converged_fcos_2x.yaml": {"defeat", "pkd"}}
    fixed_budget = {"configs/bench/digits_faster_rcnn.yaml", "configs/bench/digits_fcos.yaml"}
    closer = "configs/bench/converged_fcos_r18.yaml"  # the converged FCOS bench with a ResNet-18 student
    # the cross-family bench takes the FCOS bench's teacher, which this checkout has not trained
    reused = {"configs/bench/digits_fcos_retinanet.yaml"}
    stand_in = tmp_path / "teacher.pt"
    stand_in.write_bytes(b"")
    for f in files:
        missing = "teacher_checkpoint: file not found.*train that teacher first"
        with pytest.raises(ConfigError, match=missing) if f in reused else nullcontext():
            load_bench(f)
        cfg, methods = load_bench(f, [f"teacher_checkpoint={stand_in}"] if f in reused else [])
        runs = plan_runs(cfg, methods)  # validates every run's config
        rows = {r.row for r in runs}
        if f in reused:  # FCOS teacher -> RetinaNet student, PKD against the student alone
            assert cfg.pretrain_epochs == 0 and rows == {"teacher", "baseline", "pkd", "pkd_unbalanced"}
            assert {r.raw["model"]["arch"] for r in runs if r.row != "teacher"} == {"retinanet"}
            assert runs[0].raw["model"]["arch"] == "fcos"
        elif f in converged:  # issue 19: digit-pretrained backbones, the published weights, 5 baseline seeds
            assert cfg.pretrain_backbones and cfg.pretrain_epochs == 0
            assert {"teacher", "baseline", "fgfi", "gid", "defeat", "fgd", "kd", "global", "global_conv3x3", "pkd",
                    "cwd", "mgd"} <= rows
            assert ("crosskd" in rows) == ("fcos" in f)
            assert all(r.raw["model"]["backbone_weights"].startswith("runs/pretrain/digits/") for r in runs)
            assert all(r.raw["model"]["norm"] == "frozen_bn" for r in runs)
            assert all(r.raw["distill"].get("balance", 0.0) == 0.0 for r in runs if r.command == "distill")
            assert sorted({r.seed for r in runs if r.row == "baseline"}) == [0, 1, 2, 3, 4]
            if "fcos" in f:  # why the global method trails DeFeat: one term or option changed per row
                methods = {r.row: r.raw["distill"]["methods"] for r in runs if r.seed == 0 and r.command == "distill"}
                opts = {row: ms[-1]["options"] for row, ms in methods.items()}
                assert opts["global_no_resp"] == {"max_images_per_class": 50, "use_resp": False}
                assert opts["global_defeat_feat"] == {"max_images_per_class": 50, "feat_loss": "defeat"}
                assert opts["global_whole_map_no_resp"] == {**opts["global_conv3x3_no_resp"], "feat_loss": "defeat"}
                relation_only = {"max_images_per_class": 50, "use_feat": False, "use_resp": False}
                assert opts["global_only_global"] == opts["defeat_relation"] == relation_only
                assert opts["global_only_global_a100"] == {**relation_only, "a_global": 100.0}
                assert [m["name"] for m in methods["defeat_relation"]] == ["defeat", "global"]
            continue
        elif f == closer:
            one_x, _ = load_bench("configs/bench/converged_fcos.yaml")
            assert (cfg.teacher_config, cfg.epochs) == (one_x.teacher_config, one_x.epochs) and cfg.pretrain_backbones
            assert {r.raw["model"]["backbone"] for r in runs if r.row != "teacher"} == {"resnet18"}
            assert all(r.raw["model"]["backbone_weights"].startswith("runs/pretrain/digits/") for r in runs)
            assert rows == {"teacher", "baseline", "defeat", "pkd", "global"}
        elif f in two_x:  # issue 19's "2x": a converged bench, doubled, for the baseline and its two leading rows
            one_x, _ = load_bench(two_x[f])
            assert cfg.epochs == 2 * one_x.epochs and rows == {"teacher", "baseline"} | two_x_rows[f]
            assert (cfg.student_config, cfg.teacher_config) == (one_x.student_config, one_x.teacher_config)
            assert all(r.raw["model"]["backbone_weights"].startswith("runs/pretrain/digits/") for r in runs)
        elif f in fixed_budget:  # the evidence benches: no warm start, the global method and its options
            assert cfg.pretrain_epochs == 0 and {"pretrain", "fair_budget"}.isdisjoint(rows)
            assert {"teacher", "baseline", "fgfi", "gid", "global", "pkd"} <= rows
            full = [label for label, m in methods.items() if not m.seeds]
            assert {"gid", "global"} <= set(full)
            assert all(r.raw["train"]["threads"] == 1 and r.raw["train"]["deterministic"] for r in runs)
        else:
            assert {"teacher", "baseline", "global", "fgd", "gid", "kd+prototypes"} <= rows
        assert len({r.seed for r in runs if r.seed >= 0}) == 3


def test_unknown_key_is_named(tmp_path):
    p = write(tmp_path, "c.yaml", "model:\n  fpn_chanels: 64\n")
    with pytest.raises(ConfigError, match=r"unknown key model\.fpn_chanels"):
        load_config(p)


def test_wrong_type_is_named(tmp_path):
    p = write(tmp_path, "c.yaml", "train:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        load_config(p)
    p = write(tmp_path, "d.yaml", "model:\n  arch: yolo\n")
    with pytest.raises(ConfigError, match=r"model\.arch: 'yolo' is not one of"):
        load_config(p)


def test_bad_yaml_and_missing_file(tmp_path):
    p = write(tmp_path, "c.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_and_presets(tmp_path):
    p = write(tmp_path, "c.yaml", "train:\n  preset: 2x\n")
    cfg = load_config(p, ["model.fpn_channels=64", "train.milestones=[1, 2]", "data.root=/x"])
    assert cfg.model.fpn_channels == 64
    assert cfg.data.root == "/x"
    assert cfg.train.epochs == 24 and cfg.train.milestones == [16, 22]  # the preset wins over milestones
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(p, ["model.fpn_channels"])


def test_int_widens_to_float_but_bool_is_not_int():
    cfg = config_from_dict({"train": {"lr": 1}})
    assert isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match="train.epochs"):
        config_from_dict({"train": {"epochs": True}})


def test_base_chain_and_teacher_config(tmp_path):
    write(tmp_path, "base.yaml", "model:\n  backbone: resnet50\n  fpn_channels: 64\ntrain:\n  epochs: 3\n")
    write(tmp_path, "teacher.yaml", "base: base.yaml\nmodel:\n  backbone: resnet101\n")
    p = write(tmp_path, "kd.yaml", "base: base.yaml\nmodel:\n  backbone: resnet18\n"
              "distill:\n  teacher_config: teacher.yaml\n  teacher:\n    fpn_channels: 128\n"
              "  teacher_checkpoint: t.pt\n  methods: [fgfi, {name: kd, weight: 2.0, temperature: 4.0}]\n")
    cfg = load_config(p)
    assert cfg.model.backbone == "resnet18" and cfg.model.fpn_channels == 64 and cfg.train.epochs == 3
    assert cfg.distill.teacher.backbone == "resnet101" and cfg.distill.teacher.fpn_channels == 128
    assert [m.name for m in cfg.distill.methods] == ["fgfi", "kd"]
    assert cfg.distill.methods[1].weight == 2.0 and cfg.distill.methods[1].options == {"temperature": 4.0}


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_value_checks_name_the_key():
    with pytest.raises(ConfigError, match="model.num_classes"):
        config_from_dict({"model": {"num_classes": 0}})
    with pytest.raises(ConfigError, match="distill.teacher.num_classes"):
        config_from_dict({"model": {"num_classes": 10}, "distill": {"teacher": {"num_classes": 20}}})
    with pytest.raises(ConfigError, match=r"distill.methods\[0\].weight"):
        config_from_dict({"distill": {"methods": [{"name": "kd", "weight": -1}]}})
