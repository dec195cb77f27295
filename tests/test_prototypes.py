"""Prototype generators, the prototype bank, and Alg. 2's refresh with real tiny torchvision detectors."""

from __future__ import annotations

import pytest
import torch

from detkd.config import ModelConfig
from detkd.data.common import DetectionDataset
from detkd.distill import build_distiller
from detkd.distill.base import DistillContext
from detkd.distill.global_kd.pool import PrototypeBank, PrototypeOptions, _priority
from detkd.distill.global_kd.prototypes import (
    GENERATORS,
    generate,
    instance_features,
    instance_features_levels,
    kmeans,
)
from detkd.models import build_detector, feature_channels
from detkd.taps import Taps, tap_student, tap_teacher, transform_batch


def clusters(n_per: int = 10, centres=((0.0, 0.0), (10.0, 0.0), (0.0, 10.0)), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor(c) + 0.1 * torch.randn(n_per, 2, generator=g) for c in centres])


# ----------------------------------------------------------------------------------------------------------
# Generators


@pytest.mark.parametrize("method", GENERATORS)
def test_every_generator_returns_k_valid_indices(method):
    g = torch.Generator().manual_seed(1)
    ft, fs, areas = torch.randn(40, 6, generator=g), torch.randn(40, 4, generator=g), torch.rand(40, generator=g)
    idx = generate(ft, fs, 5, method, areas=areas, lam=1.0)
    assert idx.dtype == torch.int64 and ((idx >= 0) & (idx < 40)).all()
    if method.startswith("dbscan"):
        assert 1 <= idx.numel() <= 5
    else:
        assert idx.numel() == 5
    if method != "pgm":
        assert idx.unique().numel() == idx.numel()
    assert torch.equal(idx, generate(ft, fs, 5, method, areas=areas.clone(), lam=1.0))  # deterministic


@pytest.mark.parametrize("method", ["kmeans_teacher", "kmeans_student", "dbscan_teacher", "dbscan_student"])
def test_clustering_generators_pick_one_instance_per_separated_cluster(method):
    x = clusters()
    other = torch.randn(30, 3)  # the space not used by the method
    ft, fs = (x, other) if method.endswith("teacher") else (other, x)
    idx = generate(ft, fs, 3 if method.startswith("kmeans") else 10, method, dbscan_min_samples=3)
    assert sorted((idx // 10).tolist()) == [0, 1, 2]  # instance i belongs to cluster i // 10


def test_kmeans_centres_on_separated_clusters():
    centres, assign = kmeans(clusters(), 3, seed=3)
    got = sorted(tuple(round(v) for v in c.tolist()) for c in centres)
    assert got == [(0, 0), (0, 10), (10, 0)]
    assert assign.unique().numel() == 3


def test_ambiguous_picks_the_smallest_boxes_and_needs_areas():
    areas = torch.tensor([50.0, 3.0, 9.0, 1.0, 70.0, 2.0])
    idx = generate(torch.randn(6, 2), torch.randn(6, 2), 3, "ambiguous", areas=areas)
    assert idx.tolist() == [3, 5, 1]
    with pytest.raises(ValueError, match="areas"):
        generate(torch.randn(6, 2), torch.randn(6, 2), 3, "ambiguous")


def test_ambiguous_is_deterministic_on_tied_areas_and_ignores_the_features():
    # tied areas: the earlier instance wins (a stable order), the same pick every call, whatever the features
    areas = torch.tensor([4.0, 1.0, 4.0, 1.0, 9.0, 1.0, 4.0])
    picks = [generate(torch.randn(7, 3), torch.randn(7, 2), 4, "ambiguous", areas=areas, seed=s) for s in range(3)]
    assert all(p.tolist() == [1, 3, 5, 0] for p in picks)


def test_generator_edge_cases():
    assert generate(torch.randn(3, 2), torch.randn(3, 2), 5, "kmeans_teacher").tolist() == [0, 1, 2]
    assert generate(torch.zeros(0, 2), torch.zeros(0, 2), 5, "pgm").numel() == 0
    with pytest.raises(ValueError, match="generator"):
        generate(torch.randn(3, 2), torch.randn(3, 2), 2, "nope")
    with pytest.raises(ValueError, match="student features"):
        generate(torch.randn(3, 2), torch.randn(4, 2), 2, "random")


def test_random_depends_on_seed():
    x = torch.randn(50, 2)
    a, b = generate(x, x, 5, "random", seed=0), generate(x, x, 5, "random", seed=1)
    assert torch.equal(a, generate(x, x, 5, "random", seed=0)) and not torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# Bank from precomputed features


def test_build_from_features_per_level_per_class():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 1, 1, 1, 3, 3, 3, 1])
    feats_t = [torch.randn(8, 5, generator=g) for _ in range(2)]
    feats_s = [torch.randn(8, 3, generator=g) for _ in range(2)]
    bank = PrototypeBank(PrototypeOptions(k=2, lam=1.0, generator="pgm", allow_repeats=False))
    assert bank.is_empty()
    bank.build_from_features(feats_t, feats_s, labels)
    assert bank.num_levels == 2 and not bank.is_empty() and bank.refreshes == 1
    for lv in range(2):
        assert bank.get(lv, 2) is None
        for c in (1, 3):
            p = bank.get(lv, c)
            assert p.indices.numel() == 2 and (labels[p.indices] == c).all()
            assert torch.equal(p.teacher, feats_t[lv][p.indices]) and torch.equal(p.student, feats_s[lv][p.indices])
        t, s = bank.all_classes(lv)
        assert t.shape == (4, 5) and s.shape == (4, 3)
    restored = PrototypeBank()
    restored.load_state(bank.state())
    assert torch.equal(restored.get(1, 3).student, bank.get(1, 3).student)
    with pytest.raises(ValueError, match="labels"):
        bank.build_from_features(feats_t, feats_s, labels[:5])


def test_instance_features_roi_align_and_crop_mean():
    f = torch.arange(16.0).view(1, 1, 4, 4)
    taps = Taps(arch="retinanet", features=[f], level_names=["0"], strides=[8], image_sizes=[(32, 32)],
                batch_shape=(32, 32), targets=[], num_classes=1)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 8.0], [9.0, 9.0, 10.0, 10.0]])]
    crop = instance_features(taps, boxes, 0, "crop_mean")
    assert crop[:, 0].tolist() == [0.5, 5.0]  # cells (0, 0), (0, 1); cell (1, 1) alone
    const = Taps(arch="retinanet", features=[torch.full((1, 2, 4, 4), 3.0)], level_names=["0"], strides=[8],
                 image_sizes=[(32, 32)], batch_shape=(32, 32), targets=[], num_classes=1)
    assert torch.allclose(instance_features(const, boxes, 0, "roi_align"), torch.full((2, 2), 3.0))
    with pytest.raises(ValueError, match="extraction"):
        instance_features(taps, boxes, 0, "nope")


@pytest.mark.parametrize("extraction", ["roi_align", "crop_mean"])
def test_instance_features_levels_equal_the_per_level_features(extraction):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(3, 4, 16 // 2**i, 16 // 2**i, generator=g) for i in range(3)]
    taps = Taps(arch="retinanet", features=feats, level_names=["0", "1", "2"], strides=[4, 8, 16],
                image_sizes=[(64, 64)] * 3, batch_shape=(64, 64), targets=[], num_classes=1)
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 30.0], [10.0, 5.0, 60.0, 40.0]]), torch.zeros((0, 4)),
             torch.tensor([[30.0, 30.0, 64.0, 64.0]])]
    got = instance_features_levels(taps, boxes, extraction)
    assert len(got) == 3
    for lv in range(3):
        want = instance_features(taps, boxes, lv, extraction)
        assert got[lv].shape == (3, 4)
        torch.testing.assert_close(got[lv], want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Alg. 2 with real tiny detectors


def tiny(arch: str, backbone: str = "resnet18") -> ModelConfig:
    return ModelConfig(arch=arch, backbone=backbone, num_classes=3, fpn_channels=32, min_size=64, max_size=64)


def toy_loader(seed: int = 0) -> list:
    """Two batches of two 64 px images; image ids 0..3, some boxes ignored, class 3 only in image 3."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    boxes = [
        [[4.0, 4.0, 30.0, 30.0], [20.0, 10.0, 60.0, 50.0]],
        [[0.0, 0.0, 40.0, 40.0], [8.0, 30.0, 24.0, 62.0], [2.0, 2.0, 10.0, 10.0]],
        [[10.0, 10.0, 50.0, 40.0]],
        [[5.0, 5.0, 60.0, 60.0], [30.0, 30.0, 50.0, 50.0]],
    ]
    labels = [[1, 2], [1, 2, 1], [2], [3, 1]]
    ignore = [[False, False], [False, False, True], [False], [False, False]]
    for start in (0, 2):
        images, targets = [], []
        for i in range(start, start + 2):
            images.append(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g))
            targets.append({"boxes": torch.tensor(boxes[i]), "labels": torch.tensor(labels[i]),
                            "ignore": torch.tensor(ignore[i]), "image_id": torch.tensor(i)})
        batches.append((images, targets))
    return batches


class CountingLoader:
    def __init__(self, batches):
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the test machine is shared: several intra-op threads only contend with each other here
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def detectors():
    torch.manual_seed(0)
    teacher = build_detector(tiny("retinanet", "resnet34"))
    student = build_detector(tiny("retinanet"))
    return teacher, student


def backbone_calls(model) -> list[int]:
    calls = [0]
    model.backbone.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_refresh_caches_the_teacher_and_follows_the_student():
    torch.manual_seed(0)
    teacher = build_detector(tiny("retinanet", "resnet34"))
    student = build_detector(tiny("retinanet"))
    t_calls, s_calls = backbone_calls(teacher), backbone_calls(student)
    loader = CountingLoader(toy_loader())
    logs = []
    d = build_distiller("global", {"k": 2, "lam": 1.0}, feature_channels(teacher), feature_channels(student),
                        "retinanet")
    ctx = DistillContext(teacher=teacher, student=student, loader=loader, device=torch.device("cpu"),
                         epoch=0, epochs=3, log=logs.append)
    d.on_epoch_start(ctx)
    assert t_calls[0] == 2 and s_calls[0] == 2 and student.training
    assert logs and logs[0]["proto_instances"] == 7.0 and logs[0]["proto_refresh_s"] > 0  # 8 boxes, 1 ignored
    assert d.bank.num_levels == 5
    first = {c: d.bank.get(0, c) for c in (1, 2, 3)}
    assert first[3].indices.numel() == 2 and torch.equal(first[3].teacher[0], first[3].teacher[1])  # one instance
    # the student changes: prototypes' student vectors follow it, the teacher is not run again
    with torch.no_grad():
        for p in student.backbone.fpn.parameters():
            p.mul_(1.5)
    ctx.epoch = 1
    d.on_epoch_start(ctx)
    # passes: the first refresh reads the targets once to plan, then the batches it needs; later ones once
    assert t_calls[0] == 2 and s_calls[0] == 4 and loader.passes == 3
    again = d.bank.get(0, 1)
    assert not torch.allclose(again.student, first[1].student)
    # the teacher side of the same instances is unchanged (same selection -> same teacher vectors)
    if torch.equal(again.indices, first[1].indices):
        assert torch.equal(again.teacher, first[1].teacher)
    # refresh_every = 2 skips odd epochs
    d.opts.refresh_every = 2
    ctx.epoch = 3
    d.on_epoch_start(ctx)
    assert loader.passes == 3


def test_bank_caps_images_per_class_and_drops_small_boxes(detectors):
    teacher, student = detectors
    ctx = DistillContext(teacher=teacher, student=student, loader=toy_loader(), device=torch.device("cpu"),
                         epoch=0, epochs=1)
    bank = PrototypeBank(PrototypeOptions(k=3, lam=1.0, generator="random", min_box=20.0, max_images_per_class=1))
    stats = bank.refresh(ctx)
    cache = bank._teacher_cache
    for c in (1, 2, 3):
        assert cache["keys"][cache["labels"] == c][:, 0].unique().numel() == 1  # one image per class
    kept = cache["keys"].tolist()
    assert [1, 1] not in kept  # the 16 x 32 box of image 1 is below min_box
    assert stats["proto_instances"] == len(kept)


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet", "fcos"])
def test_global_end_to_end_gradients_reach_student_only(arch):
    torch.manual_seed(0)
    teacher = build_detector(tiny(arch, "resnet34")).eval()
    student = build_detector(tiny(arch))
    for p in teacher.parameters():
        p.requires_grad_(False)
    d = build_distiller("global", {"k": 2, "lam": 1.0}, feature_channels(teacher), feature_channels(student), arch)
    batches = toy_loader()
    d.on_epoch_start(DistillContext(teacher=teacher, student=student, loader=batches, device=torch.device("cpu"),
                                    epoch=0, epochs=1))
    images, targets = batches[1]
    image_list, tgts = transform_batch(student, images, targets)
    losses, s_taps = tap_student(student, image_list, tgts)
    t_taps = tap_teacher(teacher, image_list, tgts, d.request(), s_taps)
    out = d(t_taps, s_taps, tgts)
    assert set(out) == {"loss_global", "loss_local_feat", "loss_local_resp"}
    assert 0.0 <= d.stats["sigma_min"] <= d.stats["sigma_mean"] <= 1.0 and d.stats["proto_covered"] == 1.0
    # the "+prototypes" variants on the same batch, with the same prototypes
    variants = {}
    for name in ("defeat_proto", "kd_proto", "rkd_proto"):
        v = build_distiller(name, {"k": 2, "lam": 1.0}, feature_channels(teacher), feature_channels(student), arch)
        v.set_extra_state(d.get_extra_state())
        variants[name] = v
        out.update(v(t_taps, s_taps, tgts))
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.fpn.parameters())
    assert all(p.grad is not None for p in d.adapters.parameters())
    assert all(p.grad is not None for p in variants["defeat_proto"].adapters.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def images_seen(model) -> list[int]:
    """Images through ``model``'s backbone, counted by a forward hook."""
    seen = [0]
    model.backbone.register_forward_hook(lambda m, inp, out: seen.__setitem__(0, seen[0] + inp[0].shape[0]))
    return seen


def expected_keys(cap: int, seed: int = 0) -> list[list[int]]:
    """The toy loader's (image id, box index) kept by the cap, by brute force over the non-ignored boxes."""
    kept_labels = {0: [1, 2], 1: [1, 2], 2: [2], 3: [3, 1]}  # image 1's third box is ignored
    keep = set()
    for c in (1, 2, 3):
        images = sorted((_priority(seed, i, c), i) for i, labs in kept_labels.items() if c in labs)
        keep |= {(i, c) for _, i in images[:cap]}
    return sorted([i, j] for i, labs in kept_labels.items() for j, c in enumerate(labs) if (i, c) in keep)


@pytest.mark.parametrize("cap", [1, 2])
def test_images_without_a_kept_instance_are_not_forwarded(cap):
    torch.manual_seed(0)
    teacher, student = build_detector(tiny("retinanet", "resnet34")), build_detector(tiny("retinanet"))
    t_seen, s_seen = images_seen(teacher), images_seen(student)
    ctx = DistillContext(teacher=teacher, student=student, loader=toy_loader(), device=torch.device("cpu"),
                         epoch=0, epochs=2)
    bank = PrototypeBank(PrototypeOptions(k=2, lam=1.0, max_images_per_class=cap))
    stats = bank.refresh(ctx)
    keys = bank._teacher_cache["keys"].tolist()
    assert keys == expected_keys(cap)
    needed = len({i for i, _ in keys})
    assert needed < 4 and stats["proto_images"] == needed
    assert t_seen[0] == needed and s_seen[0] == needed  # the other images never reached a detector
    bank.refresh(ctx)  # cached teacher: the student sees the same images again, the teacher nothing
    assert t_seen[0] == needed and s_seen[0] == 2 * needed
    assert bank._teacher_cache["keys"].tolist() == keys


class CountingDataset(DetectionDataset):
    """A detkd data set that counts the items it decodes."""

    loaded: list[int]

    def __getitem__(self, i):
        self.loaded.append(i)
        return super().__getitem__(i)


def test_dataloader_over_a_dataset_decodes_only_the_needed_images(tmp_path):
    """With a DataLoader over a detkd data set the plan comes from the annotations: the images without a
    kept instance are not even decoded, and the bank equals the one built from the same batches as a list."""
    from PIL import Image

    from detkd.data import build_loader
    from detkd.data.common import ImageRecord
    from detkd.data.transforms import eval_transforms

    batches = toy_loader()
    records = []
    for images, targets in batches:
        for im, t in zip(images, targets):
            path = tmp_path / f"{int(t['image_id'])}.png"
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(path)
            records.append(ImageRecord(int(t["image_id"]), path, 64, 64, "toy", t["boxes"].tolist(),
                                       t["labels"].tolist(), t["ignore"].tolist(), [0.0] * len(t["labels"])))
    model_cfg = tiny("retinanet")
    ds = CountingDataset(records, [{"id": c, "name": str(c)} for c in (1, 2, 3)], eval_transforms(model_cfg))
    ds.loaded = []
    torch.manual_seed(0)
    teacher, student = build_detector(tiny("retinanet", "resnet34")), build_detector(model_cfg)
    s_seen = images_seen(student)
    banks = []
    for loader in (build_loader(ds, 2, 0, shuffle=False), batches):
        bank = PrototypeBank(PrototypeOptions(k=2, lam=1.0, max_images_per_class=1))
        bank.refresh(DistillContext(teacher=teacher, student=student, loader=loader, device=torch.device("cpu"),
                                    epoch=0, epochs=1))
        banks.append(bank)
    keys = banks[0]._teacher_cache["keys"].tolist()
    needed = sorted({i for i, _ in keys})
    assert keys == expected_keys(1) and len(needed) < 4
    assert sorted(ds.loaded) == needed and s_seen[0] == 2 * len(needed)  # data set indices = image ids here
    for lv in range(banks[0].num_levels):
        for c in (1, 2, 3):
            a, b = banks[0].get(lv, c), banks[1].get(lv, c)
            assert torch.equal(a.indices, b.indices)
            # other batch composition: conv numerics differ in the last digits
            torch.testing.assert_close(a.teacher, b.teacher, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(a.student, b.student, rtol=1e-4, atol=1e-4)
