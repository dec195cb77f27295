"""detkd pretrain: backbones pre-trained as digit classifiers, loaded by model.backbone_weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import detkd.engine.pretrain as pretrain_mod
from detkd.cli import main
from detkd.config import ConfigError, ModelConfig
from detkd.data.digits import load_mnist, split_pools
from detkd.engine.pretrain import PretrainOptions, digit_crops, pretrain_backbone
from detkd.models import build_detector
from detkd.runtime.checkpoint import CheckpointError, load_checkpoint

torch.set_num_threads(1)

TINY = dict(epochs=2, images=24, val_images=12, batch_size=12, size=32, scale_min=0.9, scale_max=1.1)


def tiny(**kw) -> PretrainOptions:
    return PretrainOptions(**{**TINY, **kw})


def test_crops_hold_one_digit_of_the_split_they_are_drawn_from():
    images, digits = digit_crops(50, tiny(), "train", stream=0)
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8
    assert digits.min() >= 0 and digits.max() <= 9
    # the same seed stream draws the same crops; another stream other crops
    again, again_digits = digit_crops(50, tiny(), "train", stream=0)
    assert np.array_equal(images, again) and np.array_equal(digits, again_digits)
    assert not np.array_equal(images, digit_crops(50, tiny(), "train", stream=1)[0])
    # train and val pools never share a source digit (the val crops are the detection val split's digits)
    pools = split_pools(load_mnist()[1])
    for d in range(10):
        assert not set(pools["train"][d]) & set(pools["val"][d])


def test_weights_load_into_a_detector_key_for_key(tmp_path):
    path = pretrain_backbone("resnet18", tmp_path, tiny(), progress=False)
    saved = load_checkpoint(path)["model"]
    assert not any(k.startswith("fc.") for k in saved)  # the classifier head is left out
    meta = json.loads((tmp_path / "resnet18.json").read_text())
    assert meta["backbone"] == "resnet18" and len(meta["val_top1"]) == 2
    assert 0.0 <= meta["val_top1"][-1] <= 1.0
    assert not (tmp_path / "resnet18.partial.pt").exists()

    for arch in ("faster_rcnn", "fcos"):
        cfg = ModelConfig(arch=arch, backbone="resnet18", num_classes=3, fpn_channels=32, min_size=64,
                          max_size=64, norm="frozen_bn", trainable_layers=3, backbone_weights=str(path))
        body = build_detector(cfg).backbone.body.state_dict()
        trunk_keys = {k for k in saved if not k.endswith("num_batches_tracked")}
        # every trunk tensor the detector's body has comes from the file, value for value
        shared = trunk_keys & set(body)
        assert shared == {k for k in body if not k.endswith("num_batches_tracked")}
        for k in shared:
            assert torch.equal(body[k], saved[k]), k
        # the stages the detector's body does not return (none for ResNet) are the only keys left over
        assert trunk_keys - set(body) == set()


def test_a_finished_file_is_reused_and_other_options_are_refused(tmp_path):
    path = pretrain_backbone("resnet18", tmp_path, tiny(), progress=False)
    stamp = path.stat().st_mtime_ns
    assert pretrain_backbone("resnet18", tmp_path, tiny(), progress=False) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not trained again
    with pytest.raises(CheckpointError, match="other options"):
        pretrain_backbone("resnet18", tmp_path, tiny(lr=0.01), progress=False)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    whole = load_checkpoint(pretrain_backbone("resnet18", tmp_path / "whole", tiny(), progress=False))["model"]

    real_save = pretrain_mod.save_checkpoint
    calls = []

    def save_then_die(path, state):
        real_save(path, state)
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's state was written

    monkeypatch.setattr(pretrain_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_backbone("resnet18", tmp_path / "killed", tiny(), progress=False)
    assert (tmp_path / "killed" / "resnet18.partial.pt").is_file()
    assert not (tmp_path / "killed" / "resnet18.pt").exists()
    resumed = load_checkpoint(pretrain_backbone("resnet18", tmp_path / "killed", tiny(), progress=False))["model"]
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k


def test_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet19'"):
        pretrain_backbone("resnet19", "unused", tiny())
    with pytest.raises(ConfigError, match=r"pretrain.epochs: must be >= 1, got 0"):
        pretrain_backbone("resnet18", "unused", tiny(epochs=0))
    with pytest.raises(ConfigError, match="pretrain.scale_max: a digit of 56 px does not fit a 32 px crop"):
        pretrain_backbone("resnet18", "unused", tiny(scale_max=2.0))


def test_cli_writes_the_weights_and_rejects_unknown_options(tmp_path, capsys):
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    assert main(["pretrain", "resnet18", "--out", str(tmp_path), "--quiet", *sets]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "resnet18.pt")
    assert main(["pretrain", "resnet18", "--out", str(tmp_path), "--set", "epoch=3"]) == 2
    assert "unknown key pretrain.epoch" in capsys.readouterr().err


def test_the_bench_step_pretrains_only_a_missing_pretrain_file(tmp_path):
    from detkd.engine.pretrain import ensure_backbone_weights

    target = tmp_path / "pre" / "resnet18.pt"
    assert ensure_backbone_weights("resnet18", str(target), tiny(), progress=False) is True
    assert target.is_file() and json.loads((tmp_path / "pre" / "resnet18.json").read_text())["options"]["images"] == 24
    assert ensure_backbone_weights("resnet18", str(target), tiny(), progress=False) is False  # there now
    assert ensure_backbone_weights("resnet18", "none", tiny(), progress=False) is False
    # a file not named as detkd pretrain names its output is the user's: never trained into
    assert ensure_backbone_weights("resnet18", str(tmp_path / "mine.pt"), tiny(), progress=False) is False
    assert not (tmp_path / "mine.pt").exists()


def test_batchnorm_statistics_follow_the_data_on_mobilenet(tmp_path):
    # torchvision's MobileNetV3 BatchNorm momentum (0.01) leaves the running statistics near their initial
    # values after a short pre-training: eval-mode accuracy was chance and frozen-BN detectors inherited them
    model = pretrain_mod.classifier("mobilenet_v3_large")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 for m in bns)
    opts = tiny(epochs=1, images=240, batch_size=12)  # 20 steps
    path = pretrain_backbone("mobilenet_v3_large", tmp_path, opts, progress=False)
    trained = pretrain_mod.classifier("mobilenet_v3_large")
    trained.load_state_dict(load_checkpoint(path)["model"], strict=False)
    first = trained.features[0][1]  # the stem's BatchNorm: its input is one conv of the image
    x = pretrain_mod.to_input(digit_crops(48, opts, "train", stream=0)[0])
    with torch.no_grad():
        z = trained.features[0][0](x)
    batch_var = z.var(dim=(0, 2, 3))
    # 20 steps at 0.1 bring the running variance ~88% of the way from 1 to the data's; at 0.01, 18%
    moved = (first.running_var - 1.0) / (batch_var - 1.0)
    assert float(moved.median()) > 0.6
