"""The teacher cache (detkd.engine.teacher_cache): exact reuse, invalidation, corrupt files, a full disk."""

from __future__ import annotations

import copy
import errno
import json
from pathlib import Path

import pytest
import torch

from detkd.config import ModelConfig
from detkd.distill import REGISTRY, build_distiller
from detkd.engine.step import DistillStep
from detkd.engine.teacher_cache import TeacherCache, image_keys
from detkd.models import build_detector, feature_channels
from detkd.taps import transform_batch

torch.set_num_threads(1)

METHODS = sorted(REGISTRY)
CASES = [(arch, m) for arch in ("faster_rcnn", "retinanet") for m in METHODS if arch in REGISTRY[m].archs]


def pair(arch: str, teacher_seed: int = 1):
    common = dict(arch=arch, backbone="resnet18", num_classes=3, min_size=64, max_size=64, norm="bn",
                  box_batch_size_per_image=32, rpn_batch_size_per_image=32, rpn_pre_nms_top_n_train=100,
                  rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=30)
    torch.manual_seed(0)
    student = build_detector(ModelConfig(fpn_channels=32, **common)).train()
    torch.manual_seed(teacher_seed)
    teacher = build_detector(ModelConfig(fpn_channels=48, **common)).eval().requires_grad_(False)
    return student, teacher


def batch(n: int = 4, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(n)]
    targets = []
    for i in range(n):
        x, y = 4.0 + 3 * i, 6.0 + 2 * i
        targets.append({"boxes": torch.tensor([[x, y, x + 26.0, y + 30.0], [30.0, 20.0, 60.0, 58.0]]),
                        "labels": torch.tensor([1 + i % 3, 2])})
    return images, targets


def make_step(arch: str, method: str, teacher_seed: int = 1) -> DistillStep:
    student, teacher = pair(arch, teacher_seed)
    d = build_distiller(method, {}, feature_channels(teacher), feature_channels(student), arch)
    return DistillStep(student, torch.nn.ModuleList([d]), [1.0], teacher)


def losses(step: DistillStep, images, targets) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # the RPN / RoI samplers draw random numbers: the same draws on both sides
    for d in step.distillers:  # MGD seeds its masks from its call count: the same masks on both sides
        if isinstance(getattr(d, "calls", None), torch.Tensor):
            d.calls.zero_()
    det, kd = step(images, targets)
    return {k: v.detach() for k, v in {**det, **kd}.items()}


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: {a[k]} != {b[k]}"


@pytest.mark.parametrize("arch,method", CASES)
def test_cached_teacher_gives_bit_identical_losses(arch, method, tmp_path):
    """Every method, both families: the same losses from the live teacher, from the cache in memory (the
    batch again, and its images in another order) and from the files of another run (a new cache)."""
    step = make_step(arch, method)
    images, targets = batch()
    order = [2, 0, 3, 1]
    shuffled = ([images[i] for i in order], [targets[i] for i in order])
    live, live_shuffled = losses(step, images, targets), losses(step, *shuffled)

    step.cache = TeacherCache(step.teacher, step.request, folder=tmp_path)
    assert_equal(losses(step, images, targets), live)  # fills the cache
    assert step.cache.misses == 4 and step.cache.hits == 0
    assert_equal(losses(step, images, targets), live)
    assert_equal(losses(step, *shuffled), live_shuffled)
    assert step.cache.hits == 8 and step.cache.misses == 4

    step.cache = TeacherCache(step.teacher, step.request, folder=tmp_path)  # another run: the files
    assert_equal(losses(step, *shuffled), live_shuffled)
    assert step.cache.disk_reads == 4 and step.cache.misses == 0


@pytest.mark.parametrize("arch,method", [("faster_rcnn", "gid"), ("retinanet", "crosskd")])
def test_gradients_through_the_cached_teacher_are_identical(arch, method):
    images, targets = batch()
    grads = []
    for cached in (False, True):
        step = make_step(arch, method)
        if cached:
            step.cache = TeacherCache(step.teacher, step.request)
            losses(step, images, targets)
        torch.manual_seed(123)
        det, kd = step(images, targets)
        sum({**det, **kd}.values()).backward()
        grads.append([p.grad.clone() for p in step.parameters() if p.grad is not None])
        if cached:
            assert step.cache.hits == 4
    assert len(grads[0]) == len(grads[1]) and all(torch.equal(a, b) for a, b in zip(*grads))


def test_half_precision_cache_stays_within_its_tolerance():
    """cache_dtype float16 (features and head features rounded, head outputs kept in float32): every
    method, both families, within 1e-3 relative of the live teacher (the largest seen: 7e-5)."""
    for arch, method in CASES:
        step = make_step(arch, method)
        images, targets = batch()
        live = losses(step, images, targets)
        step.cache = TeacherCache(step.teacher, step.request, dtype="float16")
        losses(step, images, targets)
        cached = losses(step, images, targets)
        assert step.cache.hits == 4
        for k in live:
            torch.testing.assert_close(cached[k], live[k], rtol=1e-3, atol=1e-7, msg=f"{arch} {method} {k}")


def test_a_changed_teacher_never_reads_the_old_entries(tmp_path):
    step = make_step("retinanet", "kd")
    images, targets = batch()
    step.cache = TeacherCache(step.teacher, step.request, folder=tmp_path)
    losses(step, images, targets)
    old_namespace = step.cache.namespace

    other = make_step("retinanet", "kd", teacher_seed=2)  # same architecture, other weights
    live = losses(other, images, targets)
    other.cache = TeacherCache(other.teacher, other.request, folder=tmp_path)
    assert other.cache.namespace != old_namespace
    assert_equal(losses(other, images, targets), live)
    assert other.cache.disk_reads == 0 and other.cache.misses == 4

    # one changed tensor is enough
    with torch.no_grad():
        next(other.teacher.parameters()).view(-1)[0] += 1e-6
    assert TeacherCache(other.teacher, other.request, folder=tmp_path).namespace != other.cache.namespace


def test_the_key_holds_the_batch_size_the_padded_shape_and_the_flip():
    _, teacher = pair("retinanet")
    images, _ = batch()
    il4, _ = transform_batch(teacher, images)
    il2, _ = transform_batch(teacher, images[:2])
    flipped, _ = transform_batch(teacher, [images[0].flip(-1)] + images[1:])
    k4, k2, kf = (image_keys(x, "ns") for x in (il4, il2, flipped))
    assert k4[0] != k2[0]  # batch size: other kernels, other bits
    assert kf[0] != k4[0] and kf[1:] == k4[1:]
    assert image_keys(il4, "other teacher") != k4
    # a 32 x 64 image padded to 32 x 64 with its like, or to 64 x 64 next to a square one
    wide = [torch.rand(3, 32, 64), torch.rand(3, 32, 64), torch.rand(3, 64, 64)]
    low, _ = transform_batch(teacher, wide[:2])
    high, _ = transform_batch(teacher, [wide[0], wide[2]])
    assert tuple(low.tensors.shape[-2:]) == (32, 64) and tuple(high.tensors.shape[-2:]) == (64, 64)
    assert image_keys(low, "ns")[0] != image_keys(high, "ns")[0]


def test_a_corrupt_or_truncated_file_is_recomputed_never_used(tmp_path, capsys):
    step = make_step("faster_rcnn", "fgfi")
    images, targets = batch()
    live = losses(step, images, targets)
    step.cache = TeacherCache(step.teacher, step.request, folder=tmp_path)
    losses(step, images, targets)
    files = sorted(Path(step.cache.folder).glob("*/*.pt"))
    assert len(files) == 4
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(files[1].read_bytes())  # one bit of the tensor data changed, the zip still opens
    entry = torch.load(files[1], weights_only=True)["entry"]
    raw = entry["features.0"].reshape(-1)[:4].contiguous().view(torch.uint8).numpy().tobytes()
    at = bytes(flipped).find(raw)
    assert at > 0
    flipped[at] ^= 1
    files[1].write_bytes(bytes(flipped))

    step.cache = TeacherCache(step.teacher, step.request, folder=tmp_path)
    assert_equal(losses(step, images, targets), live)
    assert step.cache.rebuilt == 2 and step.cache.disk_reads == 2 and step.cache.misses == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and "digest mismatch" in err
    step.cache = TeacherCache(step.teacher, step.request, folder=tmp_path)  # rewritten: all good again
    assert_equal(losses(step, images, targets), live)
    assert step.cache.disk_reads == 4 and step.cache.rebuilt == 0


def test_a_full_disk_stops_writing_and_changes_no_result(tmp_path, monkeypatch, capsys):
    step = make_step("retinanet", "fgfi")
    images, targets = batch()
    live = losses(step, images, targets)
    step.cache = TeacherCache(step.teacher, step.request, folder=tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("detkd.engine.teacher_cache.os.replace", full)
    assert_equal(losses(step, images, targets), live)
    assert "No space left on device" in step.cache.write_off
    assert "results are unaffected" in capsys.readouterr().err
    assert not list(Path(step.cache.folder).rglob("*.pt")) and not list(Path(step.cache.folder).rglob("*.tmp"))
    assert_equal(losses(step, images, targets), live)  # the memory share still serves
    assert step.cache.hits == 4


def test_limits_bound_memory_and_disk(tmp_path):
    step = make_step("retinanet", "fgfi")
    images, targets = batch()
    live = losses(step, images, targets)
    step.cache = TeacherCache(step.teacher, step.request, memory_mb=0, folder=tmp_path, disk_mb=0)
    assert_equal(losses(step, images, targets), live)
    assert_equal(losses(step, images, targets), live)
    assert step.cache.hits == 0 and not step.cache.memory and step.cache.write_off


def test_cache_config_keys_are_checked():
    from detkd.config import ConfigError, config_from_dict

    raw = {"distill": {"teacher_checkpoint": "t.pt", "methods": ["fgfi"], "cache_memory_mb": -1}}
    with pytest.raises(ConfigError, match="distill.cache_memory_mb must be >= 0, got -1"):
        config_from_dict(copy.deepcopy(raw))
    raw["distill"] = {"teacher_checkpoint": "t.pt", "methods": ["fgfi"], "teacher_dtype": "float64"}
    with pytest.raises(ConfigError, match="distill.teacher_dtype"):
        config_from_dict(raw)


# ----------------------------------------------------------------------------------------------------------
# End to end: `detkd distill` with the cache off, on, and on again reading the first run's files


@pytest.mark.parametrize("arch,methods", [
    ("faster_rcnn", ["fgfi", "gid", {"name": "global", "max_images_per_class": 4}]),
    ("retinanet", ["kd", "crosskd", "defeat_proto"]),
])
def test_distilled_runs_match_with_the_cache_off_and_on(arch, methods, tmp_path, capsys):
    from detkd.config import MethodConfig
    from detkd.engine.logger import read_jsonl
    from detkd.engine.trainer import fit
    from detkd.runtime.checkpoint import save_checkpoint
    from tests.engine_helpers import tiny_config, tiny_model, with_distill

    torch.manual_seed(1)
    teacher_path = tmp_path / "teacher.pt"
    save_checkpoint(teacher_path, {"model": build_detector(tiny_model(arch, fpn=48)).state_dict()})
    mcfg = [MethodConfig(m) if isinstance(m, str) else
            MethodConfig(m["name"], options={k: v for k, v in m.items() if k != "name"}) for m in methods]
    base = tiny_config(tmp_path / "data", tmp_path / "run", arch=arch, epochs=2, train_images=8)
    base.data.hflip = 0.0  # the digits benches: every epoch feeds the same inputs
    base = with_distill(base, str(teacher_path), mcfg)
    results = {}
    for name, on in (("off", False), ("on", True), ("again", True)):
        cfg = copy.deepcopy(base)
        cfg.output_dir = str(tmp_path / name)
        cfg.distill.teacher_cache = on
        cfg.distill.cache_dir = str(tmp_path / "cache")
        metrics = fit(cfg, progress=False)
        train = [{k: v for k, v in r.items() if not k.endswith("_s") and k != "time"}  # not the timings
                 for r in read_jsonl(Path(cfg.output_dir) / "metrics.jsonl") if r["kind"] == "train"]
        results[name] = (train, {k: v for k, v in metrics.items() if not k.endswith("_s")})
        err = capsys.readouterr().err
        if name == "on":  # epoch 1 fills the cache (8 images), epoch 2 reads it from memory
            assert "teacher cache: 8 of 16 images reused (50%)" in err
        if name == "again":  # another run of the same teacher: the files
            assert "teacher cache: 16 of 16 images reused (100%)" in err and "8 read from disk" in err
    assert len(results["off"][0]) == 4
    assert results["on"] == results["off"] and results["again"] == results["off"]


def test_teacher_dtype_sets_the_precision_of_the_live_teacher():
    from detkd.engine.teacher_cache import live_teacher
    from detkd.taps import TapRequest

    _, teacher = pair("retinanet")
    images, targets = batch()
    il, tt = transform_batch(teacher, images, targets)
    req = TapRequest(features=True, dense_outputs=True)
    full = live_teacher(teacher, il, tt, req, None)
    bf16 = live_teacher(teacher, il, tt, req, None, torch.bfloat16)
    assert bf16.features[0].dtype == torch.float32 and bf16.cls_logits.dtype == torch.float32  # cast back
    assert not torch.equal(bf16.features[0], full.features[0])
    torch.testing.assert_close(bf16.features[0], full.features[0], rtol=0.1, atol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under train.amp: float32 switches it off
        assert live_teacher(teacher, il, tt, req, None).features[0].dtype == torch.bfloat16
        forced = live_teacher(teacher, il, tt, req, None, torch.float32)
    assert torch.equal(forced.features[0], full.features[0])


def test_bench_rows_share_one_cache_folder_and_older_runs_stay_valid(tmp_path):
    from detkd.bench import load_bench, plan_runs
    from detkd.bench.run import _check_unchanged, result_path

    cfg, methods = load_bench(Path(__file__).resolve().parents[1] / "configs/bench/digits_faster_rcnn.yaml",
                              [f"output_dir={tmp_path}", "teacher_checkpoint="])
    runs = [r for r in plan_runs(cfg, methods, only=["fgfi", "gid"]) if r.command == "distill"]
    assert runs and {r.raw["distill"]["cache_dir"] for r in runs} == {str(tmp_path / "teacher_cache")}
    # a row that finished before the cache existed is the same run: the cache keys change no result
    old = copy.deepcopy(runs[0].raw)
    del old["distill"]["cache_dir"]
    result_path(runs[0], tmp_path).parent.mkdir(parents=True)
    result_path(runs[0], tmp_path).write_text(json.dumps({"config": old}))
    _check_unchanged([runs[0]], tmp_path)
    old["distill"]["cache_dtype"] = "float16"  # this one does change the numbers
    result_path(runs[0], tmp_path).write_text(json.dumps({"config": old}))
    with pytest.raises(Exception, match="another config"):
        _check_unchanged([runs[0]], tmp_path)


def test_on_cuda_large_entries_turn_the_cache_off(capsys):
    step = make_step("retinanet", "fgfi")
    cache = TeacherCache(step.teacher, step.request)
    small = {"features.0": torch.zeros(1024)}
    big = {"features.0": torch.zeros(5 * 2**20)}  # 20 MB
    assert cache.worth_it(big, torch.device("cpu")) and cache.worth_it(small, torch.device("cuda"))
    assert not cache.worth_it(big, torch.device("cuda")) and not cache.enabled
    assert "20 MB per image" in capsys.readouterr().err
