"""The configs are installed with the package: a wheel holds them, and an installed detkd (no clone) runs
``detkd train`` on a shipped config by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from detkd.config import list_shipped_configs, load_config, resolve_config_path

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("voc/tv_faster_rcnn_r50_v2_mobilenet_pkd")
    assert cfg.model.torchvision == "fasterrcnn_mobilenet_v3_large_fpn"
    assert cfg.distill.teacher.torchvision == "fasterrcnn_resnet50_fpn_v2"
    assert resolve_config_path("configs/digits/fcos_r18_student.yaml").is_file()
    assert "custom_coco/tv_faster_rcnn_r50_v2_mobilenet_pkd.yaml" in list_shipped_configs()
    assert not any(Path(n).name.startswith("_") for n in list_shipped_configs())

    # the README's recipe: a shipped config by name, the class count overridden for student and teacher
    cfg = load_config("custom_coco/tv_faster_rcnn_r50_v2_mobilenet_pkd",
                      ["data.root=data/my_data", "model.num_classes=5", "distill.teacher.num_classes=5"])
    assert (cfg.model.num_classes, cfg.distill.teacher.num_classes) == (5, 5)
    assert cfg.distill.teacher_checkpoint == "runs/my_data/tv_faster_rcnn_r50_v2/best.pt"
    # a user's own file may take a shipped config as its base
    (tmp_path / "mine.yaml").write_text("base: custom_coco/tv_faster_rcnn_mobilenet\nmodel:\n  num_classes: 7\n")
    mine = load_config(tmp_path / "mine.yaml")
    assert mine.model.torchvision == "fasterrcnn_mobilenet_v3_large_fpn" and mine.model.num_classes == 7


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_installed_wheel_trains_a_shipped_config_by_name(tmp_path):
    # build from the tracked and new files only (no run folders), install into a bare folder, run from elsewhere
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl"), str(src)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "whl").glob("detkd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
    assert [n for n in sorted(names) if n.startswith("detkd/configs/")] == [f"detkd/{s}" for s in shipped]
    # pyproject.toml lists the packages: a new subpackage must be added there
    packages = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "detkd").rglob("__init__.py"))
    assert [p for p in packages if p not in names] == []
    assert "detkd/data/mnist_5k.npz" in names  # the digits glyphs ship with the package
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "OMP_NUM_THREADS": "1"}
    overrides = ["output_dir=run", "data.root=data", "data.workers=0", "data.batch_size=2", "train.epochs=1",
                 "data.digits.train_images=4", "data.digits.val_images=2", "data.digits.image_size=64",
                 "model.min_size=64", "model.max_size=64", "train.threads=1"]
    code = "import sys, detkd.cli; print(detkd.cli.__file__, file=sys.stderr); sys.exit(detkd.cli.main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "train", "digits/retinanet_r18_student", "--quiet",
                           *overrides], cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(tmp_path / "site") in done.stderr  # the installed copy ran, not the clone
    assert (work / "run" / "last.pt").is_file() and '"mAP"' in done.stdout
