"""End-to-end: training, evaluation, checkpoints and resume, non-finite losses, distillation, export, CLI, DDP."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from detkd.cli import main
from detkd.config import ConfigError, MethodConfig, to_dict
from detkd.engine.evaluate import evaluate_checkpoint
from detkd.engine.logger import read_jsonl
from detkd.engine.trainer import DistillStep, NonFiniteLossError, fit
from detkd.models import build_detector
from detkd.runtime.checkpoint import load_checkpoint, save_checkpoint
from tests.engine_helpers import free_port, tiny_config, tiny_model, with_distill

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Untrained teachers saved as detkd checkpoints: the mechanics of distillation need no good teacher."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for arch in ("retinanet", "faster_rcnn", "fcos"):
        torch.manual_seed(1)
        model = build_detector(tiny_model(arch, fpn=64 if arch == "fcos" else 48))
        path = root / f"{arch}.pt"
        save_checkpoint(path, {"model": model.state_dict()})
        out[arch] = str(path)
    return out


def write_yaml(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "fcos"])
def test_train_each_family_writes_checkpoints_logs_and_metrics(arch, data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run", arch=arch)
    metrics = fit(cfg, progress=False)
    keys = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl", "VOC07_AP50",
            "VOC_AP50")
    assert set(metrics) == {*keys, "eval_s", "epoch"} and metrics["epoch"] == 1  # the evaluation after epoch 1
    out = Path(cfg.output_dir)
    # the returned metrics are those of the saved weights, and the file detkd bench reads holds them
    again = evaluate_checkpoint(cfg, str(out / "last.pt"), progress=False)
    assert {k: again[k] for k in keys} == {k: metrics[k] for k in keys}
    assert json.loads((out / "final.json").read_text()) == metrics
    assert {"last.pt", "best.pt", "epoch_1.pt", "config.yaml", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert any(r["kind"] == "eval" for r in records)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["model"]["arch"] == arch
    # a second run into the same directory must not overwrite the first
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(cfg, progress=False)


def test_resume_equals_uninterrupted_run(data_root, tmp_path):
    straight = tiny_config(data_root, tmp_path / "straight", epochs=2, deterministic=True)
    fit(straight, progress=False)
    first_half = copy.deepcopy(straight)
    first_half.output_dir = str(tmp_path / "halves")
    first_half.train.epochs = 1  # the multistep schedule here does not depend on the epoch count
    fit(first_half, progress=False)
    second_half = copy.deepcopy(first_half)
    second_half.train.epochs = 2
    fit(second_half, resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "halves" / "last.pt")
    assert a["iteration"] == b["iteration"] == 4
    for k, v in a["model"].items():
        torch.testing.assert_close(v, b["model"][k], rtol=0, atol=1e-6, msg=k)


def test_non_finite_losses_are_skipped_then_stop_the_run(data_root, tmp_path, monkeypatch):
    cfg = tiny_config(data_root, tmp_path / "run", epochs=1, train_images=16)
    fit(cfg, progress=False)
    good = load_checkpoint(tmp_path / "run" / "last.pt")

    original = DistillStep.forward
    calls = {"n": 0}

    def first_step_nan(self, images, targets):
        det, kd = original(self, images, targets)
        calls["n"] += 1
        if calls["n"] == 1:
            det = {**det, "classification": det["classification"] * float("nan")}
        return det, kd

    monkeypatch.setattr(DistillStep, "forward", first_step_nan)
    cfg2 = copy.deepcopy(cfg)
    cfg2.train.epochs = 2
    fit(cfg2, resume=True, progress=False)  # one bad step is skipped, the run finishes
    skips = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "skip"]
    assert len(skips) == 1 and skips[0]["terms"] == ["classification"]
    after_two = load_checkpoint(tmp_path / "run" / "last.pt")
    assert after_two["epoch"] == 2

    def always_nan(self, images, targets):
        det, kd = original(self, images, targets)
        return {k: v * float("nan") for k, v in det.items()}, kd

    monkeypatch.setattr(DistillStep, "forward", always_nan)
    cfg3 = copy.deepcopy(cfg)
    cfg3.train.epochs = 3
    cfg3.train.max_bad_steps = 2
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite losses"):
        fit(cfg3, resume=True, progress=False)
    intact = load_checkpoint(tmp_path / "run" / "last.pt")
    assert intact["epoch"] == 2 and good["epoch"] == 1
    for k, v in after_two["model"].items():
        assert torch.equal(v, intact["model"][k])


METHODS = ["fitnet", "fgfi", "defeat", "kd", "rkd", "fgd", "gid", "global"]


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
@pytest.mark.parametrize("method", METHODS)
def test_distill_runs_end_to_end(arch, method, data_root, teachers, tmp_path):
    cfg = with_distill(tiny_config(data_root, tmp_path / "run", arch=arch, train_images=4), teachers[arch],
                       [method])
    teacher_before = load_checkpoint(teachers[arch])["model"]
    metrics = fit(cfg, progress=False)
    assert "mAP" in metrics
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    det_keys = {"classification", "bbox_regression", "loss_classifier", "loss_box_reg", "loss_objectness",
                "loss_rpn_box_reg", "loss", "kind", "epoch", "iteration", "lr", "img_per_s"}
    kd_keys = {k for k in train[-1] if k not in det_keys and "/" not in k}
    assert kd_keys, f"no distillation term logged for {method}"
    assert all(torch.isfinite(torch.tensor(train[-1][k])) for k in kd_keys)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    student_keys = set(build_detector(cfg.model).state_dict())
    assert set(ckpt["model"]) == student_keys  # adapters are not part of the student
    if method == "global":
        assert any(r["kind"] == "distill" and "proto_refresh_s" in r for r in records)
    # the teacher checkpoint on disk is untouched
    assert all(torch.equal(v, load_checkpoint(teachers[arch])["model"][k]) for k, v in teacher_before.items())


def test_combined_methods_with_weights_and_decay(data_root, teachers, tmp_path):
    cfg = with_distill(tiny_config(data_root, tmp_path / "run", epochs=2, train_images=4), teachers["retinanet"],
                       ["defeat", MethodConfig("kd", weight=2.0, options={"temperature": 4.0})])
    cfg.distill.decay = True
    cfg.distill.student_init = "inherit"
    fit(cfg, progress=False)
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert {"defeat_fg", "defeat_bg", "kd_cls"} <= set(train[-1])


def test_balance_scales_by_hand():
    from detkd.engine.step import balance_scales

    det = {"a": torch.tensor(0.6), "b": torch.tensor(0.4)}  # detection loss 1.0
    outputs = [{"feat": torch.tensor(150.0), "bg": torch.tensor(50.0)}, {"kd": torch.tensor(0.25)}]
    # weighted terms 300, 100 and 0.5 against a cap of 0.5 x 1.0: 0.5 / 300, 0.5 / 100, unchanged
    scales = balance_scales(det, outputs, [2.0, 2.0], 0.5)
    assert scales[0] == pytest.approx({"feat": 0.5 / 300, "bg": 0.005})
    assert scales[1] == {"kd": 1.0}
    assert balance_scales(det, [{"x": torch.tensor(0.0)}], [1.0], 1.0) == [{"x": 1.0}]  # nothing to balance


def test_balance_caps_each_method_on_the_first_step_and_survives_resume(data_root, teachers, tmp_path):
    cfg = with_distill(tiny_config(data_root, tmp_path / "run", epochs=1, train_images=8), teachers["retinanet"],
                       ["fitnet", "kd"])
    cfg.distill.balance = 0.5
    fit(cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    fitnet_scale, kd_scale = ckpt["balance_scales"]
    assert 0.0 < fitnet_scale["fitnet_feat"] < 1.0  # random features: FitNet's term is far above detection
    first = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"][0]
    det = first["classification"] + first["bbox_regression"]
    assert first["fitnet_feat"] == pytest.approx(0.5 * det, rel=1e-3)  # capped to the limit on that step
    assert kd_scale["kd_cls"] == 1.0 or first["kd_cls"] == pytest.approx(0.5 * det, rel=1e-3)

    # resumed runs keep the factors of the first step instead of measuring new ones
    cfg2 = copy.deepcopy(cfg)
    cfg2.train.epochs = 2
    fit(cfg2, resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["balance_scales"] == [fitnet_scale, kd_scale]

    bad = copy.deepcopy(cfg)
    bad.distill.balance = -1.0
    with pytest.raises(ConfigError, match="distill.balance must be >= 0"):
        from detkd.config import validate

        validate(bad)


def test_incompatible_pair_fails_before_training(data_root, teachers, tmp_path):
    cfg = with_distill(tiny_config(data_root, tmp_path / "run"), teachers["faster_rcnn"], ["fitnet"])
    cfg.distill.teacher.min_size = 96
    with pytest.raises(ConfigError, match="min_size"):
        fit(cfg, progress=False)
    cfg = with_distill(tiny_config(data_root, tmp_path / "run2"), teachers["retinanet"], ["no_such_method"])
    with pytest.raises(ConfigError, match="unknown method 'no_such_method'"):
        fit(cfg, progress=False)
    cfg = with_distill(tiny_config(data_root, tmp_path / "run3"), teachers["faster_rcnn"], ["fitnet", "kd"])
    cfg.distill.teacher.arch = "faster_rcnn"  # the checkpoint is a Faster R-CNN, the student a RetinaNet
    # the features pair by stride (P3-P6), but kd compares dense head outputs, which a Faster R-CNN lacks
    with pytest.raises(ConfigError, match=r"distill.methods\[1\] \(kd\): needs the dense per-anchor head "
                                          r"outputs.*teacher faster_rcnn resnet18 / student retinanet resnet18"):
        fit(cfg, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_export_loads_without_detkd_and_gives_same_detections(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run", arch="faster_rcnn")
    fit(cfg, progress=False)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exp"), "--torchscript"]) == 0
    assert {"student.pt", "model.json", "build_model.py", "student.torchscript.pt"} <= {
        p.name for p in (tmp_path / "exp").iterdir()}

    torch.manual_seed(0)
    image = torch.rand(3, 64, 64)
    torch.save(image, tmp_path / "image.pt")
    model = build_detector(cfg.model)
    model.load_state_dict(load_checkpoint(tmp_path / "run" / "best.pt")["model"])
    model.eval()
    with torch.no_grad():
        expected = model([image])[0]

    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(tmp_path / 'exp')!r})\n"
        "from build_model import load_exported\n"
        f"m = load_exported({str(tmp_path / 'exp')!r})\n"
        f"img = torch.load({str(tmp_path / 'image.pt')!r})\n"
        "with torch.no_grad():\n    out = m([img])[0]\n"
        "assert not any(k.startswith('detkd') for k in sys.modules), 'detkd was imported'\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
    got = torch.load(tmp_path / "out.pt")
    for k in ("boxes", "labels", "scores"):
        torch.testing.assert_close(got[k], expected[k])

    # detkd eval works on the exported student too
    cfg_path = write_yaml(cfg, tmp_path / "cfg.yaml")
    assert main(["eval", str(cfg_path), "--checkpoint", str(tmp_path / "exp" / "student.pt"), "--quiet",
                 "--json", str(tmp_path / "m.json")]) == 0
    assert "mAP" in json.loads((tmp_path / "m.json").read_text())


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  fpn_chanels: 64\n")
    assert main(["train", str(bad)]) == 2
    assert "unknown key model.fpn_chanels" in capsys.readouterr().err
    assert main(["eval", str(bad), "--checkpoint", "x.pt"]) == 2
    good = tmp_path / "good.yaml"
    good.write_text(f"data:\n  root: {tmp_path / 'nothing'}\n  format: coco\n")
    assert main(["train", str(good), "train.epochs=1"]) == 2
    assert "annotation" in capsys.readouterr().err.lower()


def test_ddp_two_processes_train_and_evaluate_like_one(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "ddp", train_images=8)
    cfg.data.batch_size = 2
    cfg_path = write_yaml(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    def run() -> list[str]:  # a fresh port per launch
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "detkd.cli"]

    def launch(*args: str) -> subprocess.CompletedProcess:
        # One retry on a fresh port: a port free when chosen can be taken before torchrun binds it. The first
        # failure's stderr is kept in a warning (and in the assertion) so that a real fault is never hidden.
        tries = []
        for _ in range(2):
            done = subprocess.run([*run(), *args], env=env, timeout=300, capture_output=True, text=True)
            if done.returncode == 0:
                break
            tries.append(f"{args[0]} under torchrun, exit {done.returncode}:\n{done.stdout[-2000:]}\n"
                         f"{done.stderr[-5000:]}")
            warnings.warn(tries[-1], stacklevel=2)
        assert done.returncode == 0, "\n----\n".join(tries)
        return done

    done = launch("train", str(cfg_path), "--quiet")
    assert done.stdout.count('"mAP"') == 1  # the result is printed by rank 0 only
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["iteration"] == 2  # 8 images / (2 ranks x 2 per rank)
    done = launch("eval", str(cfg_path), "--checkpoint", str(tmp_path / "ddp" / "last.pt"), "--quiet",
                  "--json", str(tmp_path / "two.json"))
    assert done.stdout.count("mAP") == 1
    assert main(["eval", str(cfg_path), "--checkpoint", str(tmp_path / "ddp" / "last.pt"), "--quiet",
                 "--json", str(tmp_path / "one.json")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    for k in ("mAP", "AP50", "VOC_AP50"):
        assert two[k] == pytest.approx(one[k], abs=1e-9)


@pytest.mark.parametrize("config", ["retinanet_r34_r18_fgd.yaml", "faster_rcnn_r34_r18_gid.yaml",
                                    "faster_rcnn_r34_r18_global_authors.yaml"])
def test_shipped_digits_configs_distill_from_the_command_line(config, tmp_path):
    """The shipped digits configs as a user runs them, shrunk by overrides (teacher: an untrained checkpoint)."""
    arch = "retinanet" if config.startswith("retinanet") else "faster_rcnn"
    from detkd.config import load_config

    teacher_cfg = load_config(REPO / "configs" / "digits" / config).distill.teacher
    save_checkpoint(tmp_path / "teacher.pt", {"model": build_detector(teacher_cfg).state_dict()})
    overrides = [f"distill.teacher_checkpoint={tmp_path / 'teacher.pt'}", f"output_dir={tmp_path / 'run'}",
                 f"data.root={tmp_path / 'data'}", "data.digits.train_images=8", "data.digits.val_images=4",
                 "data.workers=0", "train.epochs=1", "data.batch_size=4"]
    assert main(["distill", str(REPO / "configs" / "digits" / config), *overrides, "--quiet"]) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["model"]["arch"] == arch
