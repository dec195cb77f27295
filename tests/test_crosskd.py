"""CrossKD (detkd/distill/crosskd.py) and the head taps it uses, and the FCOS -> RetinaNet pkd configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from detkd.config import ConfigError, ModelConfig
from detkd.distill import build_distiller
from detkd.distill.crosskd import align_scale, crosskd_losses
from detkd.taps import TapRequest, tap_student, tap_teacher, transform_batch
from detkd.taps.head_walk import head_blocks, head_tail, run_head

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# The loss against a loop reference written from the formulas (module docstring)


def ref_losses(zs, zt, bs, bt, matched, beta, kind):
    """Plain-Python CrossKD terms: sum over kept locations and classes 1..C of BCE(p_s, p_t) |p_s - p_t|^beta,
    box loss weighted by the teacher's max class score, both divided by the number of positives."""
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    cls = box = 0.0
    npos = max(1, sum(1 for row in matched for m in row if m >= 0))
    for n in range(len(zs)):
        for a in range(len(zs[n])):
            if matched[n][a] == -2:
                continue
            best = 0.0
            for c in range(1, len(zs[n][a])):
                ps, pt = sig(zs[n][a][c]), sig(zt[n][a][c])
                bce = -(pt * math.log(ps) + (1 - pt) * math.log(1 - ps))
                cls += bce * abs(ps - pt) ** beta
                best = max(best, pt)
            s, t = bs[n][a], bt[n][a]
            if kind == "l1":
                d = sum(abs(x - y) for x, y in zip(s, t))
            else:
                iw = max(0.0, min(s[2], t[2]) - max(s[0], t[0]))
                ih = max(0.0, min(s[3], t[3]) - max(s[1], t[1]))
                inter = iw * ih
                union = (s[2] - s[0]) * (s[3] - s[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
                iou = inter / union
                if kind == "iou":
                    d = -math.log(max(iou, 1e-6))
                else:
                    hull = (max(s[2], t[2]) - min(s[0], t[0])) * (max(s[3], t[3]) - min(s[1], t[1]))
                    d = 1 - (iou - (hull - union) / hull)
            box += best * d
    return cls / npos, box / npos


@pytest.mark.parametrize("kind", ["giou", "iou", "l1"])
def test_losses_match_loop_reference(kind):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    xy = torch.rand(2, 3, 2, generator=g) * 10
    bs = torch.cat([xy, xy + 1 + torch.rand(2, 3, 2, generator=g) * 5], dim=-1)
    bt = torch.cat([xy + 0.5, xy + 2 + torch.rand(2, 3, 2, generator=g) * 5], dim=-1)
    matched = torch.tensor([[0, -1, -2], [-1, 1, -1]])
    cls, box = crosskd_losses(zs, zt, bs, bt, matched, beta=1.5, box_loss=kind)
    rc, rb = ref_losses(zs.tolist(), zt.tolist(), bs.tolist(), bt.tolist(), matched.tolist(), 1.5, kind)
    assert cls.item() == pytest.approx(rc, rel=1e-5)
    assert box.item() == pytest.approx(rb, rel=1e-5)


def test_hand_values():
    # equal logits give zero classification loss; identical boxes zero box loss
    z = torch.tensor([[[0.0, 2.0, -1.0]]])
    b = torch.tensor([[[0.0, 0.0, 4.0, 4.0]]])
    cls, box = crosskd_losses(z, z, b, b, torch.tensor([[0]]), box_loss="giou")
    assert cls.item() == pytest.approx(0.0, abs=1e-7) and box.item() == pytest.approx(0.0, abs=1e-6)
    # one class, p_s = 0.5, p_t = sigmoid(ln 3) = 0.75, beta 1: BCE = ln 2, |diff| = 0.25; one positive
    zs, zt = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[0.0, math.log(3.0)]]])
    # boxes [0,0,2,2] vs [0,0,4,2]: IoU 1/2, hull = union, GIoU loss 1/2, weighted by p_t = 0.75
    cls, box = crosskd_losses(zs, zt, torch.tensor([[[0.0, 0, 2, 2]]]), torch.tensor([[[0.0, 0, 4, 2]]]),
                              torch.tensor([[0]]), box_loss="giou")
    assert cls.item() == pytest.approx(math.log(2) * 0.25, rel=1e-6)
    assert box.item() == pytest.approx(0.75 * 0.5, rel=1e-6)


def test_align_scale_gives_the_teacher_statistics():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4, generator=g) * 5 + 2, torch.randn(2, 3, 4, 4, generator=g) * 0.3 - 1
    out = align_scale(s, t)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), t.mean(dim=(0, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3)), t.std(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# The head taps: the layer-by-layer walk and the teacher's tail


def tiny(arch: str, fpn: int, seed: int, norm: str = "none"):
    from detkd.models import build_detector

    torch.manual_seed(seed)
    return build_detector(ModelConfig(arch=arch, backbone="resnet18", num_classes=3, min_size=64, max_size=64,
                                      fpn_channels=fpn, head_norm=norm))


@pytest.mark.parametrize("arch,norm", [("retinanet", "none"), ("retinanet", "gn"), ("fcos", "none")])
def test_teacher_tail_on_its_own_features_reproduces_its_outputs(arch, norm):
    model = tiny(arch, 32, 0, norm if arch == "retinanet" else "none").eval()
    assert len(head_blocks(model.head.classification_head)) == 4
    with torch.no_grad():
        feats = list(model.backbone(torch.rand(2, 3, 64, 64)).values())
        ref = model.head(feats)
        for layer in range(5):
            out, cls_mid, reg_mid = run_head(model, feats, layer)
            tail = head_tail(model, layer)(cls_mid, reg_mid)
            assert set(out) == set(ref) == set(tail)
            for k in ref:
                assert torch.equal(out[k], ref[k]), (layer, k)  # the walk is the head's own forward
                assert torch.equal(tail[k], ref[k]), (layer, k)  # the tail continues it exactly


def pair_taps(arch: str, teacher_fpn: int, options: dict | None = None):
    student, teacher = tiny(arch, 32, 0).train(), tiny(arch, teacher_fpn, 1).eval().requires_grad_(False)
    method = build_distiller("crosskd", options or {}, [teacher_fpn] * 5, [32] * 5, arch)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    image_list, tt = transform_batch(student, images, targets)
    det, s_taps = tap_student(student, image_list, tt, method.request())
    t_taps = tap_teacher(teacher, image_list, tt, method.request(), s_taps)
    return student, teacher, method, det, t_taps, s_taps, tt


@pytest.mark.parametrize("arch,teacher_fpn,align", [("retinanet", 48, False), ("retinanet", 32, True),
                                                     ("fcos", 64, False), ("fcos", 64, True)])
def test_gradients_reach_student_features_not_teacher_nor_student_head_tail(arch, teacher_fpn, align):
    student, teacher, method, det, t_taps, s_taps, tt = pair_taps(arch, teacher_fpn, {"align_scale": align})
    # the walk leaves the student's detection losses as torchvision computes them from the same outputs
    ref = student.head(s_taps.features)
    torch.testing.assert_close(s_taps.cls_logits, ref["cls_logits"], rtol=0, atol=0)
    for f in s_taps.head_cls_features + s_taps.head_reg_features:
        f.retain_grad()
    out = method(t_taps, s_taps, tt)
    assert set(out) == {"crosskd_cls", "crosskd_box"} and all(torch.isfinite(v) for v in out.values())
    assert out["crosskd_cls"] > 0
    sum(out.values()).backward()

    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    # every level's features are in the graph; a 1 x 1 level may sit entirely below the teacher's ReLU
    for feats in (s_taps.head_cls_features, s_taps.head_reg_features):
        assert all(f.grad is not None for f in feats)
        assert feats[0].grad.abs().sum() > 0 and sum(f.grad.abs().sum() for f in feats) > 0
    k = method.cross_at
    for sub in (student.head.classification_head, student.head.regression_head):
        blocks = head_blocks(sub)
        for j, (body, _) in enumerate(blocks):
            grads = [p.grad for m in body for p in m.parameters()]
            if j < k:  # blocks up to cross_at feed the cross head: they learn from it
                assert all(g is not None and g.abs().sum() > 0 for g in grads), (j, k)
            else:  # the student's own remaining layers and predictors: detection loss only
                assert all(g is None for g in grads), (j, k)
    predictors = [student.head.classification_head.cls_logits, student.head.regression_head.bbox_reg]
    assert all(p.grad is None for m in predictors for p in m.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    adapters = list(method.parameters())
    assert (len(adapters) > 0) == (teacher_fpn != 32)
    assert all(p.grad is not None for p in adapters)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_cross_head_fed_the_teachers_own_features_reproduces_the_teacher(arch):
    """The cross head is the teacher's tail: fed the teacher's own head features at ``cross_at`` it predicts
    exactly what the teacher predicts, so both terms vanish; fed the student's, they do not. FCOS with the L1
    box distance: its IoU loss is not 0 on identical boxes of zero area (ltrb all 0 after the head's ReLU,
    most locations of a random FCOS), where IoU = 0 / eps is clamped to eps."""
    options = {"box_loss": "l1"} if arch == "fcos" else {}
    student, teacher, method, det, t_taps, s_taps, tt = pair_taps(arch, 32, options)  # equal widths: no adapter
    out = method(t_taps, s_taps, tt)
    assert out["crosskd_cls"] > 0 and out["crosskd_box"] > 0
    s_taps.head_cls_features, s_taps.head_reg_features = t_taps.head_cls_features, t_taps.head_reg_features
    out = method(t_taps, s_taps, tt)
    torch.testing.assert_close(out["crosskd_cls"], torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["crosskd_box"], torch.tensor(0.0), atol=1e-4, rtol=0)


def test_defaults_follow_the_authors_per_head_type():
    r = build_distiller("crosskd", {}, [32] * 5, [32] * 5, "retinanet")
    f = build_distiller("crosskd", {}, [32] * 5, [32] * 5, "fcos")
    assert (r.cross_at, r.cls_weight, r.box_weight, r.box_loss) == (3, 1.0, 1.0, "giou")
    assert (f.cross_at, f.cls_weight, f.box_weight, f.box_loss) == (2, 0.4, 0.75, "iou")
    with pytest.raises(ConfigError, match=r"distill\.options\.cross_at: must be in \[0, 4\], got 5"):
        build_distiller("crosskd", {"cross_at": 5}, [32] * 5, [32] * 5, "retinanet")


# ----------------------------------------------------------------------------------------------------------
# The real training loop, refusals, and the FCOS -> RetinaNet pkd config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("digits")


def teacher_fpn(arch: str) -> int:
    return 64 if arch == "fcos" else 48  # FCOS's GroupNorm(32) head needs a multiple of 32


def save_teacher(path: Path, arch: str, fpn: int | None = None) -> str:
    from detkd.models import build_detector
    from detkd.runtime.checkpoint import save_checkpoint
    from tests.engine_helpers import tiny_model

    torch.manual_seed(1)
    fpn = fpn or teacher_fpn(arch)
    save_checkpoint(path, {"model": build_detector(tiny_model(arch, fpn=fpn)).state_dict()})
    return str(path)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_crosskd_runs_through_the_training_loop(arch, data_root, tmp_path):
    from detkd.engine.logger import read_jsonl
    from detkd.engine.trainer import fit
    from tests.engine_helpers import tiny_config, with_distill

    teacher = save_teacher(tmp_path / "teacher.pt", arch)
    cfg = with_distill(tiny_config(data_root, tmp_path / "run", arch=arch, train_images=4), teacher,
                       ["crosskd"], teacher_fpn=teacher_fpn(arch))  # student FPN 32: adapters on
    cfg.data.batch_size = 2  # 2 steps
    metrics = fit(cfg, progress=False)
    assert "mAP" in metrics
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 2
    assert all(math.isfinite(r["crosskd_cls"]) and r["crosskd_cls"] > 0 for r in train)
    assert all(math.isfinite(r["crosskd_box"]) and r["crosskd_box"] >= 0 for r in train)


@pytest.mark.parametrize("teacher_arch,student_arch,why", [
    ("faster_rcnn", "faster_rcnn", r"crosskd.*does not support faster_rcnn students.*same RetinaNet or FCOS "
                                   r"head; the pair is teacher faster_rcnn resnet18 / student faster_rcnn"),
    ("fcos", "retinanet", r"crosskd.*teacher's head layers on the student's head features.*same head type; "
                          r"the pair is teacher fcos resnet18 / student retinanet resnet18"),
    ("faster_rcnn", "retinanet", r"crosskd.*same head type; the pair is teacher faster_rcnn"),
])
def test_refuses_pairs_it_cannot_work_on(teacher_arch, student_arch, why, data_root, tmp_path):
    from detkd.engine.assemble import build_models
    from tests.engine_helpers import tiny_config, tiny_model, with_distill

    teacher = save_teacher(tmp_path / "teacher.pt", teacher_arch)
    cfg = with_distill(tiny_config(data_root, tmp_path / "run", arch=student_arch), teacher, ["crosskd"])
    cfg.distill.teacher = tiny_model(teacher_arch, fpn=teacher_fpn(teacher_arch))
    with pytest.raises(ConfigError, match=why):
        build_models(cfg, torch.device("cpu"))


@pytest.mark.parametrize("name", ["digits/fcos_r34_retinanet_r18_pkd.yaml", "voc/fcos_r101_retinanet_r50_pkd.yaml",
                                  "coco/fcos_r101_retinanet_r50_pkd.yaml", "digits/retinanet_r34_r18_crosskd.yaml"])
def test_new_configs_load(name):
    from detkd.config import load_config

    cfg = load_config(REPO / "configs" / name)
    method = cfg.distill.methods[0].name
    assert method == ("crosskd" if "crosskd" in name else "pkd")
    assert (cfg.distill.teacher.arch, cfg.model.arch) == (("retinanet" if method == "crosskd" else "fcos"),
                                                          "retinanet")


def test_fcos_to_retinanet_pkd_config_pairs_and_trains(data_root, tmp_path):
    """The digits config on 4 tiny images (resized to the config's 96 px), a random FCOS R18 teacher of the
    config's layout (FPN 128): it pairs with the RetinaNet R18 (FPN 32) student level by level and pkd
    trains for two steps."""
    from detkd.config import load_config
    from detkd.engine.assemble import build_models
    from detkd.engine.logger import read_jsonl
    from detkd.engine.trainer import fit
    from tests.engine_helpers import tiny_config

    cfg = load_config(REPO / "configs" / "digits" / "fcos_r34_retinanet_r18_pkd.yaml")
    tiny = tiny_config(data_root, tmp_path / "run", train_images=4)
    cfg.data, cfg.output_dir, cfg.train = tiny.data, tiny.output_dir, tiny.train  # tiny data, SGD schedule
    cfg.data.batch_size = 2
    assert cfg.distill.methods[0].options == {"levels": [0, 1, 2, 3]} and cfg.model.min_size == 96
    cfg.distill.teacher_checkpoint = save_teacher(tmp_path / "fcos.pt", "fcos", fpn=128)
    cfg.distill.teacher.backbone = "resnet18"  # a smaller random teacher of the same layout, for speed
    _, teacher, step = build_models(cfg, torch.device("cpu"))
    assert step.pairs is None  # P3-P7 on both sides: passed whole, level i with level i
    assert teacher.__class__.__name__ == "FCOS" and step.student.__class__.__name__ == "RetinaNet"
    fit(cfg, progress=False)
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["pkd_feat"]) and r["pkd_feat"] > 0 for r in train)


def test_merge_keeps_the_head_layer():
    a = TapRequest(features=True)
    b = TapRequest(features=False, dense_outputs=True, head_layer=0)
    merged = a.merge(b)
    assert merged.head_layer == 0 and merged.dense_outputs and merged.features
    assert TapRequest().merge(TapRequest()).head_layer == -1


def test_methods_listing_shows_crosskd(capsys):
    from detkd.cli import main

    assert main(["methods", "crosskd"]) == 0
    out = capsys.readouterr().out
    assert "cross_at" in out and "box_loss" in out and "align_scale" in out


