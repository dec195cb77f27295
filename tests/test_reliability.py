"""Reliability: real kills and resume, non-finite losses and weights, bad input, failing ranks, safe loading,
worker and disk hygiene.

The faults are real: ``python -m detkd.cli`` subprocesses kill themselves with SIGKILL (or stop with
SIGSTOP) at named points (:mod:`detkd.runtime.faults`), and the next run continues with ``--resume``.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from detkd.cli import main
from detkd.config import ConfigError, DataConfig, MethodConfig, load_config, to_dict
from detkd.data import DataError, build_dataset
from detkd.distill import build_distiller
from detkd.engine.logger import read_jsonl
from detkd.engine.trainer import DistillStep, NonFiniteLossError, fit
from detkd.models import build_detector
from detkd.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.engine_helpers import free_port, tiny_config, tiny_model, with_distill

REPO = Path(__file__).resolve().parents[1]
KILLED = -signal.SIGKILL

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="kills processes with POSIX signals")


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETKD_FAULT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **extra)
    return env


def detkd(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m detkd.cli ARGS --quiet`` in a subprocess (``env``: e.g. the fault to inject)."""
    return subprocess.run([sys.executable, "-m", "detkd.cli", *args, "--quiet"], env=_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def write_yaml(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def bank_of(ckpt: dict) -> dict:
    return ckpt["distillers"]["0._extra_state"]["bank"]


def assert_same_tensors(a, b, what: str, atol: float = 1e-6) -> None:
    """Nested containers of tensors are equal within ``atol`` (other values exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, what
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=what)
        else:
            assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]", atol)
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """An untrained RetinaNet teacher (FPN 48) saved as a detkd checkpoint."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, {"model": build_detector(tiny_model("retinanet", fpn=48)).state_dict()})
    return str(path)


def global_config(data_root: Path, teacher: str, out: Path, keep_last: int = 1):
    """2 epochs x 2 iterations of the global method (prototypes refreshed before each epoch), a checkpoint
    after every iteration, deterministic on CPU."""
    cfg = tiny_config(data_root, out, epochs=2, deterministic=True, checkpoint_every=1)
    cfg.train.keep_last = keep_last
    return with_distill(cfg, teacher, [MethodConfig("global", options={"k": 2})])


@pytest.fixture(scope="module")
def straight(data_root, teacher, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with (keeps epoch_1.pt too)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    fit(global_config(data_root, teacher, out, keep_last=2), progress=False)
    return out


# ----------------------------------------------------------------------------------------------------------
# Kill and resume


def test_killed_at_every_point_resumes_like_an_uninterrupted_run(data_root, teacher, straight, tmp_path):
    out = tmp_path / "run"
    cfg = write_yaml(global_config(data_root, teacher, out), tmp_path / "cfg.yaml")
    last = out / "last.pt"

    def position(ckpt: dict) -> tuple[int, int, int]:
        return ckpt["epoch"], ckpt["iteration"], ckpt["epoch_iteration"]

    # 1. killed in the prototype refresh before epoch 2: last.pt is the end of epoch 1, with its prototypes
    r = detkd("distill", str(cfg), DETKD_FAULT="prototype_refresh", DETKD_FAULT_AT="2")
    assert r.returncode == KILLED, r.stderr[-3000:]
    ckpt = load_checkpoint(last)
    assert position(ckpt) == (1, 2, 0)
    assert bank_of(ckpt)["refreshes"] == 1 and bank_of(ckpt)["entries"]
    assert_same_tensors(bank_of(ckpt), bank_of(load_checkpoint(straight / "epoch_1.pt")), "epoch-1 prototypes")

    # 2. resumed: the refresh is redone; killed after the first step of epoch 2 (its checkpoint written)
    r = detkd("distill", str(cfg), "--resume", DETKD_FAULT="train_step", DETKD_FAULT_AT="1")
    assert r.returncode == KILLED, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "1 epochs done" in r.stderr
    ckpt = load_checkpoint(last)
    assert position(ckpt) == (1, 3, 1) and bank_of(ckpt)["refreshes"] == 2

    # 3. resumed in the middle of epoch 2 (no second refresh), killed while evaluating epoch 2
    r = detkd("distill", str(cfg), "--resume", DETKD_FAULT="eval_batch")
    assert r.returncode == KILLED, r.stderr[-3000:]
    assert "1 of its 2 iterations" in r.stderr
    assert position(load_checkpoint(last)) == (1, 3, 1)

    # 4. resumed, killed while writing last.pt: its temporary file is complete, the rename never happened
    r = detkd("distill", str(cfg), "--resume", DETKD_FAULT="write:last.pt")
    assert r.returncode == KILLED, r.stderr[-3000:]
    partial = list(out.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    assert position(load_checkpoint(last)) == (1, 3, 1)

    # 5. resumed once more: the half-written file is removed, never loaded; the run finishes
    assert main(["distill", str(cfg), "--resume", "--quiet"]) == 0
    assert not list(out.glob(".*.tmp"))
    # bounded disk use: last, best and keep_last = 1 epoch checkpoint
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "epoch_2.pt", "final.json",
                                                     "last.pt", "metrics.jsonl", "tb"]
    records = read_jsonl(out / "metrics.jsonl")
    resumes = [i for i, r in enumerate(records) if r["kind"] == "resume"]
    assert len(resumes) == 4
    assert not any("proto_refresh_s" in r for r in records[resumes[-1]:])  # mid-epoch: prototypes restored

    # the same run as the uninterrupted one: weights, optimizer, scheduler, prototypes, RNG
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(last)
    assert position(a) == position(b) == (2, 4, 0)
    for key in ("model", "distillers", "optimizer", "scheduler", "scaler", "best"):
        assert_same_tensors(a[key], b[key], key)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["metrics"]["mAP"] == pytest.approx(b["metrics"]["mAP"], abs=1e-9)


def test_mid_epoch_resume_skips_exactly_the_trained_batches(data_root, tmp_path):
    """Resuming in the middle of an epoch continues with the next batch of the same shuffled order."""
    from detkd.engine import trainer

    cfg = tiny_config(data_root, tmp_path / "run", train_images=16)  # 4 batches of 4 per epoch
    seen: list[list[int]] = []
    original = trainer.DistillStep.forward

    def record(self, images, targets):
        seen.append([int(x) for x in torch.stack([img.sum() for img in images]).round().tolist()])
        return original(self, images, targets)

    def run(resume: bool) -> None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trainer.DistillStep, "forward", record)
            fit(cfg, resume=resume, progress=False)

    run(False)
    order = seen[:]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    # a checkpoint of the same run after 3 of the 4 batches, as checkpoint_every would write it
    ckpt.update(epoch=0, iteration=3, epoch_iteration=3, epoch_samples=12)
    save_checkpoint(tmp_path / "run" / "last.pt", ckpt)
    seen.clear()
    run(True)
    assert len(order) == 4 and seen == order[3:]


def test_resume_restores_the_grad_scaler(data_root, tmp_path, monkeypatch):
    """The AMP loss scaler's state continues across a resume. Without CUDA the trainer's scaler is disabled
    (and an enabled CPU GradScaler makes each backward ~17x slower here), so a disabled scaler stands in that
    keeps its own state: the number of updates it has seen."""
    real = torch.amp.GradScaler

    class CountingScaler(real):
        def __init__(self, *args, **kwargs):
            super().__init__("cuda", enabled=False)
            self.updates = 0

        def update(self, new_scale=None) -> None:
            super().update(new_scale)
            self.updates += 1

        def state_dict(self) -> dict:
            return {"updates": self.updates}

        def load_state_dict(self, state: dict) -> None:
            self.updates = state["updates"]

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    straight = tiny_config(data_root, tmp_path / "straight", epochs=2, deterministic=True)
    fit(straight, progress=False)
    half = copy.deepcopy(straight)
    half.output_dir, half.train.epochs = str(tmp_path / "halves"), 1
    fit(half, progress=False)
    assert load_checkpoint(tmp_path / "halves" / "last.pt")["scaler"] == {"updates": 2}
    half.train.epochs = 2
    fit(half, resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "halves" / "last.pt")
    assert a["scaler"] == b["scaler"] == {"updates": 4}
    assert_same_tensors(a["model"], b["model"], "model")


# ----------------------------------------------------------------------------------------------------------
# Non-finite losses and weights; loader workers end with the run


def _children() -> list:
    return [p for p in multiprocessing.active_children() if p.is_alive()]


def test_non_finite_distillation_term_is_named_and_stops_the_run(data_root, teacher, tmp_path, monkeypatch, capsys):
    from detkd.distill.fitnet import FitNet

    cfg = with_distill(tiny_config(data_root, tmp_path / "run", train_images=8), teacher, ["fitnet"])
    cfg.data.workers = 2
    fit(cfg, progress=False)
    assert not _children()  # the workers of the last epoch and of the evaluation are gone
    good = load_checkpoint(tmp_path / "run" / "last.pt")

    forward = FitNet.forward
    monkeypatch.setattr(FitNet, "forward", lambda self, t, s, tg: {k: v * float("nan")
                                                                    for k, v in forward(self, t, s, tg).items()})
    cfg2 = copy.deepcopy(cfg)
    cfg2.train.epochs, cfg2.train.max_bad_steps = 2, 2
    capsys.readouterr()
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive non-finite losses .* in fitnet_feat") as info:
        fit(cfg2, resume=True, progress=False)
        # the traceback in `info` holds the loader iterator: its workers must be gone all the same
    assert not _children(), "data loader workers outlived the failed run"
    assert "checkpoint in" in str(info.value) and "intact" in str(info.value)
    err = capsys.readouterr().err
    assert "skipped step: non-finite loss at iteration 2 in fitnet_feat (1 in a row)" in err
    intact = load_checkpoint(tmp_path / "run" / "last.pt")  # loadable, still the good epoch 1
    assert intact["epoch"] == 1
    assert_same_tensors(good["model"], intact["model"], "model", atol=0)


def test_weights_that_turn_non_finite_are_never_checkpointed(data_root, tmp_path, monkeypatch):
    """A NaN that reaches a BatchNorm running mean leaves the losses finite (training uses batch statistics),
    but every later evaluation and resume would be broken: the checkpoint is refused and the run stops."""
    cfg = tiny_config(data_root, tmp_path / "run")
    fit(cfg, progress=False)
    good = load_checkpoint(tmp_path / "run" / "last.pt")
    original = DistillStep.forward

    def poison(self, images, targets):
        out = original(self, images, targets)
        self.student.backbone.body.bn1.running_mean.data[0] = float("nan")  # .data: after autograd saved it
        return out

    monkeypatch.setattr(DistillStep, "forward", poison)
    cfg2 = copy.deepcopy(cfg)
    cfg2.train.epochs = 2
    with pytest.raises(NonFiniteLossError, match=r"backbone\.body\.bn1\.running_mean holds NaN/Inf"):
        fit(cfg2, resume=True, progress=False)
    intact = load_checkpoint(tmp_path / "run" / "last.pt")
    assert intact["epoch"] == 1
    assert_same_tensors(good["model"], intact["model"], "model", atol=0)
    assert not (tmp_path / "run" / "epoch_2.pt").exists()


# ----------------------------------------------------------------------------------------------------------
# Bad input


def _png(path: Path, size: int = 48, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def bad_coco(root: Path) -> Path:
    """A COCO set with most of what real annotation files get wrong (48 px images, 2 classes)."""
    images, anns = [], []
    for i in range(1, 13):
        images.append({"id": i, "file_name": f"{i}.png", "width": 48, "height": 48})
        _png(root / "train" / f"{i}.png", seed=i)
        anns.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [4, 4, 20, 24]})
    (root / "train" / "3.png").write_bytes(b"\x89PNG garbage, no image")  # no image at all
    (root / "train" / "4.png").write_bytes(b"")  # empty file
    (root / "train" / "5.png").unlink()  # missing
    (root / "train" / "6.png").write_bytes((root / "train" / "6.png").read_bytes()[:900])  # truncated: lazy
    images += [
        {"id": 7, "file_name": "7b.png", "width": 48, "height": 48},  # duplicate image id
        {"id": 20, "file_name": "20.png"},  # no size: read from the header
        {"id": "x", "file_name": "bad.png"},  # non-integer id
        {"id": 21, "file_name": "21.png", "width": -5, "height": 48},  # bad size
        "not an object",
    ]
    _png(root / "train" / "20.png", seed=20)
    anns += [
        {"id": 100, "image_id": 1, "category_id": 1},  # no bbox
        {"id": 101, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]},  # 3 numbers
        {"id": 102, "image_id": 1, "category_id": 1, "bbox": [1, "2", 3, 4]},  # not numeric
        {"id": 103, "image_id": 1, "category_id": 1, "bbox": [1, None, 3, 4]},
        {"id": 104, "image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5]},  # unknown category
        {"id": 105, "image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5]},  # unknown image
        {"id": 106, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]},  # of the duplicated image id
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [4, 4, 20, 24]},  # exact copy of annotation 1
        {"id": 2, "image_id": 8, "category_id": 1, "bbox": [30, 30, 10, 10]},  # id reused, another box: kept
        {"id": 107, "image_id": 8, "category_id": 1, "bbox": [10, 10, 0, 5]},  # degenerate
        {"id": 108, "image_id": 9, "category_id": 2, "bbox": [40, 40, 20, 20]},  # out of the image: clipped
        {"id": 109, "image_id": 9, "category_id": 2, "bbox": [60, 60, 5, 5]},  # entirely outside
        {"id": 110, "image_id": 20, "category_id": 1, "bbox": [5, 5, 10, 10]},
        "not an object",
    ]
    del anns[9]  # image 10 has no annotation: an empty image, kept as background
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "annotations" / "train.json").write_text(json.dumps(data))
    return root


def test_bad_input_is_skipped_counted_in_one_line_and_never_stops_an_epoch(tmp_path, capfd):
    root = bad_coco(tmp_path / "coco")
    data = DataConfig(format="coco", root=str(root), train_ann="annotations/train.json", train_images="train",
                      val_ann="annotations/train.json", val_images="train", batch_size=4, workers=2)
    model = tiny_model(fpn=16)
    model.num_classes = 2

    # the default policy: the first broken entry is an error that names it
    with pytest.raises(DataError, match=r"train\.json: images\[16\] is not an object"):
        build_dataset(data, "train", model)

    skip = copy.deepcopy(data)
    skip.bad_annotations, skip.bad_images, skip.bad_boxes = "skip", "skip", "repair"
    capfd.readouterr()
    ds = build_dataset(skip, "train", model)
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    for part in ("bad boxes (repair): 1 clipped, 1 dropped (non-positive width or height), 1 dropped (outside",
                 "bad images (skip): 3 of 12 skipped (1 empty file, 1 missing, 1 unreadable)",
                 "bad annotations (skip): 1 annotation entries that are not objects",
                 "1 annotation ids used twice (kept: different boxes)", "1 annotations of an unknown image id",
                 "2 annotations of images with a duplicate id", "4 annotations whose bbox is not 4 numbers",
                 "1 annotations with an unknown category id", "1 duplicate annotations (same id and box)",
                 "2 images with a duplicate id", "1 images with a bad width/height",
                 "1 images without an integer id or a file_name", "1 image entries that are not objects"):
        assert part in line, (part, line)
    assert sorted(int(i) for i in ds.image_ids) == [1, 2, 6, 8, 9, 10, 11, 12, 20]

    # a whole run on it, with two loader workers: the truncated image is met (and replaced) mid-epoch
    cfg = tiny_config(tmp_path, tmp_path / "run")
    cfg.data, cfg.model = skip, model
    cfg.data.bad_boxes = "drop"
    metrics = fit(cfg, progress=False)
    assert "mAP" in metrics and load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    assert "6.png (id 6): cannot decode image" in capfd.readouterr().err
    assert not _children()


# ----------------------------------------------------------------------------------------------------------
# Bad configuration: fails at start-up, naming the value


@pytest.mark.parametrize(("method", "options", "message"), [
    ("global", {"k": -3}, r"distill\.methods\[1\]\.options\.k: must be >= 1, got -3"),
    ("global", {"lam": -1.0}, r"distill\.methods\[1\]\.options\.lam: must be >= 0, got -1\.0"),
    ("global", {"k": 0}, r"distill\.methods\[1\]\.options\.k: must be >= 1, got 0"),
    ("kd", {"temperature": 0.0}, r"distill\.methods\[1\]\.options\.temperature: must be > 0, got 0\.0"),
    ("fgd", {"alpha": -2e-5}, r"distill\.methods\[1\]\.options\.alpha: must be >= 0"),
    ("rkd", {"angle_weight": float("nan")}, r"distill\.methods\[1\]\.options\.angle_weight: must be a finite number"),
    ("gid", {"nms_iou": 1.5}, r"distill\.methods\[1\]\.options\.nms_iou: must be in \(0, 1\], got 1\.5"),
    ("fgfi", {"anchor_sizes": [32.0, -8.0]}, r"distill\.methods\[1\]\.options\.anchor_sizes\[1\]: must be >= 0"),
])
def test_bad_method_options_are_named(method, options, message):
    with pytest.raises(ConfigError, match=message):
        build_distiller(method, options, [48] * 5, [32] * 5, "retinanet", where="distill.methods[1]")


def test_teacher_checkpoint_of_another_model_fails_before_training(data_root, teacher, tmp_path, capsys):
    torch.manual_seed(0)
    other = tiny_model("retinanet", fpn=48)
    other.num_classes = 20
    twenty = tmp_path / "twenty.pt"
    save_checkpoint(twenty, {"model": build_detector(other).state_dict()})
    frcnn = tmp_path / "frcnn.pt"
    save_checkpoint(frcnn, build_detector(tiny_model("faster_rcnn", fpn=48)).state_dict())  # a plain state dict

    cfg = with_distill(tiny_config(data_root, tmp_path / "run"), str(twenty), ["fitnet"])
    path = write_yaml(cfg, tmp_path / "cfg.yaml")
    assert main(["distill", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"distill.teacher_checkpoint: checkpoint {twenty} does not fit distill.teacher: it has 20 classes, "
            "distill.teacher.num_classes is 10") in err
    cfg.distill.teacher_checkpoint = str(frcnn)
    with pytest.raises(CheckpointError, match=r"it has a faster_rcnn detector, distill\.teacher\.arch is retinanet"):
        fit(cfg, progress=False)
    cfg.distill.teacher_checkpoint = teacher
    cfg.distill.teacher.fpn_channels = 64
    with pytest.raises(CheckpointError, match=r"it has 48 FPN channels, distill\.teacher\.fpn_channels is 64"):
        fit(cfg, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
    for bad, message in (("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0, got -1"),
                         ("train.dist_timeout_s=0", "train.dist_timeout_s must be >= 1, got 0"),
                         ("data.bad_annotations=ignore", "data.bad_annotations: 'ignore' is not one of")):
        with pytest.raises(ConfigError, match=message):
            load_config(path, [bad])


# ----------------------------------------------------------------------------------------------------------
# Safe loading and paths


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_in_a_checkpoint_or_yaml_never_runs(data_root, tmp_path):
    marker = tmp_path / "executed"
    out = tmp_path / "run"
    out.mkdir()
    with (out / "last.pt").open("wb") as f:  # what a malicious file shared as "last.pt" would hold
        pickle.dump({"model": Payload(marker), "epoch": 1}, f)
    cfg = tiny_config(data_root, out)
    with pytest.raises(CheckpointError, match="weights_only"):
        fit(cfg, resume=True, progress=False)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(out / "last.pt")
    assert not marker.exists()
    # a YAML tag that would construct a Python object
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"output_dir: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert not marker.exists()


def test_config_paths_resolve_without_surprises(tmp_path, monkeypatch):
    """``base`` and ``distill.teacher_config`` are relative to the file naming them; data.root, output_dir and
    checkpoints to the current directory (like command-line paths), after ``~`` expansion."""
    folder = tmp_path / "configs" / "sub"
    folder.mkdir(parents=True)
    (folder.parent / "base.yaml").write_text("model:\n  num_classes: 3\n")
    (folder.parent / "teacher.yaml").write_text("model:\n  num_classes: 3\n  backbone: resnet50\n")
    (folder / "run.yaml").write_text(
        "base: ../base.yaml\ndata:\n  root: data/x\noutput_dir: ~/runs/x\n"
        "distill:\n  teacher_config: ../teacher.yaml\n  teacher_checkpoint: runs/t/best.pt\n  methods: [kd]\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(Path("..") / "configs" / "sub" / "run.yaml")
    assert cfg.model.num_classes == 3 and cfg.distill.teacher.backbone == "resnet50"
    assert cfg.distill.teacher_config == str((folder.parent / "teacher.yaml").resolve())
    assert cfg.data.root == "data/x" and cfg.distill.teacher_checkpoint == "runs/t/best.pt"
    assert cfg.output_dir == str(tmp_path / "home" / "runs" / "x")


# ----------------------------------------------------------------------------------------------------------
# Distributed: a rank that dies or hangs


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "T"
    except OSError:
        return False


@pytest.mark.parametrize("failure", ["kill", "stop"])
def test_a_failing_rank_makes_the_others_exit_instead_of_hanging(failure, data_root, teacher, straight, tmp_path):
    """Two gloo ranks started by hand (no torchrun agent that would clean up). Rank 1 dies (SIGKILL) or hangs
    (SIGSTOP: alive, sockets open) after its second / first step; rank 0 must fail with a clear error: at once
    for a dead peer, after train.dist_timeout_s for a silent one."""
    timeout_s = 8
    if failure == "kill":  # distillation with prototype refreshes on both ranks
        cfg, command, fault = global_config(data_root, teacher, tmp_path / "run"), "distill", {"DETKD_FAULT_AT": "2"}
    else:
        cfg, command, fault = tiny_config(data_root, tmp_path / "run"), "train", {"DETKD_FAULT_ACTION": "stop"}
    path = write_yaml(cfg, tmp_path / "cfg.yaml")
    common = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = []
    for rank in (0, 1):
        extra = dict(DETKD_FAULT="train_step", **fault) if rank == 1 else {}
        log = (tmp_path / f"rank{rank}.log").open("w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "detkd.cli", command, str(path), f"train.dist_timeout_s={timeout_s}", "--quiet"],
            env=_env(RANK=str(rank), LOCAL_RANK=str(rank), **common, **extra), cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT))
    rank0, rank1 = procs
    try:
        deadline = time.monotonic() + 240
        while rank1.poll() is None and not _stopped(rank1.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        failed_at = time.monotonic()
        assert rank1.returncode == KILLED if failure == "kill" else _stopped(rank1.pid)
        rank0.wait(timeout=timeout_s + 60)
        waited = time.monotonic() - failed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log0 = (tmp_path / "rank0.log").read_text()
    assert rank0.returncode == 1, log0[-3000:]
    assert "detkd: error: rank 0 of 2: a collective operation failed" in log0, log0[-3000:]
    assert "train.dist_timeout_s = 8 s" in log0 and "Traceback" not in log0
    if failure == "stop":
        assert timeout_s - 1 <= waited <= timeout_s + 30, waited  # the timeout, not an accident, ended it
        return
    assert waited < 30, waited
    # the refreshes under DDP: every rank agreed (no warning), and on the same prototypes as one process
    assert "differs from rank 0" not in log0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    one = bank_of(load_checkpoint(straight / "epoch_1.pt"))
    two = bank_of(ckpt)
    assert set(one["entries"]) == set(two["entries"])
    for key, entry in one["entries"].items():
        assert torch.equal(entry["indices"], two["entries"][key]["indices"]), key
        for name in ("teacher", "student"):
            torch.testing.assert_close(entry[name], two["entries"][key][name], rtol=1e-4, atol=1e-4)


def test_label_zero_detections_never_reach_the_evaluation():
    """RetinaNet / FCOS can output their never-positive index 0 early in training; a long run once stopped in
    its evaluation on it ("category_id = 0 is not a category")."""
    from detkd.engine.evaluate import detect

    class Fixed(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 9.0, 9.0]]),
                     "labels": torch.tensor([0, 3]), "scores": torch.tensor([0.9, 0.5])} for _ in images]

    target = {"image_id": torch.tensor(7), "orig_size": torch.tensor([32, 32])}
    dets = detect(Fixed(), [([torch.zeros(3, 32, 32, dtype=torch.uint8)], [target])], torch.device("cpu"),
                   progress=False)
    assert [(d["image_id"], d["category_id"]) for d in dets] == [(7, 3)]
