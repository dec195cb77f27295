import pickle

import pytest
import torch

from detkd.config import TrainConfig
from detkd.engine.schedule import lr_factor
from detkd.runtime.checkpoint import CheckpointError, load_checkpoint, rotate_epoch_checkpoints, save_checkpoint
from detkd.runtime.rng import rng_state, set_rng_state


def test_checkpoint_round_trip_and_atomic_replace(tmp_path):
    p = tmp_path / "last.pt"
    save_checkpoint(p, {"model": {"w": torch.ones(2)}, "epoch": 1})
    save_checkpoint(p, {"model": {"w": torch.zeros(2)}, "epoch": 2})
    obj = load_checkpoint(p)
    assert obj["epoch"] == 2 and torch.equal(obj["model"]["w"], torch.zeros(2))
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]  # no temp files left behind


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with p.open("wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(p)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "half.pt"
    save_checkpoint(p, {"model": {"w": torch.ones(1000)}})
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rotation_keeps_newest(tmp_path):
    for e in range(1, 6):
        (tmp_path / f"epoch_{e}.pt").write_bytes(b"x")
    (tmp_path / "last.pt").write_bytes(b"x")
    rotate_epoch_checkpoints(tmp_path, 2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["epoch_4.pt", "epoch_5.pt", "last.pt"]


def test_lr_schedule_warmup_multistep_cosine():
    cfg = TrainConfig(epochs=4, warmup_iters=10, warmup_factor=0.1, schedule="multistep", milestones=[2, 3], gamma=0.1)
    assert lr_factor(0, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(5, 10, cfg) == pytest.approx(0.1 * 0.5 + 0.5)
    assert lr_factor(10, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(20, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(35, 10, cfg) == pytest.approx(0.01)
    cos = TrainConfig(epochs=2, warmup_iters=0, schedule="cosine")
    assert lr_factor(0, 10, cos) == pytest.approx(1.0)
    assert lr_factor(10, 10, cos) == pytest.approx(0.5)
    assert lr_factor(20, 10, cos) == pytest.approx(0.0, abs=1e-12)


def test_rng_state_round_trip_through_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint(tmp_path / "r.pt", {"rng": state})
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_progress_prints_plain_lines_when_not_a_terminal(capsys):
    from detkd.engine.logger import Progress

    bar = Progress(20, "epoch 1/1")
    for _ in range(20):
        bar.update(8, loss=0.5)
    bar.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch 1/1")]
    assert len(lines) == 10 and "20/20" in lines[-1] and "img/s" in lines[-1] and "eta 0s" in lines[-1]
