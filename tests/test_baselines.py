"""The classic baseline distillers (fitnet, fgfi, defeat, kd, rkd) on hand-made taps.

Synthetic taps: a batch of two 64x64 images, a two-level pyramid (8x8 at stride 8, 4x4 at stride 16),
four channels unless a test says otherwise. Image 0 holds the boxes, image 1 none unless said otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detkd.config import ConfigError
from detkd.distill import REGISTRY, build_distiller
from detkd.distill.global_kd.base import PrototypeDistiller
from detkd.distill.masks import box_mask, box_masks, grid_anchors, imitation_masks, level_anchors
from detkd.distill.rkd import rkd_angle_loss, rkd_distance_loss
from detkd.taps import Taps
from tests.engine_helpers import real_pair_taps

SHAPES = [(8, 8), (4, 4)]
STRIDES = [8, 16]
NUM_CLASSES = 3


def make_taps(arch: str, channels: int = 4, boxes: list[list[list[float]]] | None = None, grad: bool = False,
              seed: int = 0, features: list[torch.Tensor] | None = None) -> Taps:
    """Taps of a two-image batch; ``grad`` makes every float tensor a leaf that requires grad."""
    g = torch.Generator().manual_seed(seed)
    if boxes is None:
        boxes = [[[8.0, 8.0, 24.0, 24.0], [30.0, 20.0, 60.0, 50.0], [2.0, 34.0, 20.0, 62.0]], []]
    targets = [
        {"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
         "labels": torch.arange(len(b), dtype=torch.int64) % NUM_CLASSES + 1}
        for b in boxes
    ]
    if features is None:
        features = [torch.randn(2, channels, h, w, generator=g) for h, w in SHAPES]
    features = [f.clone().requires_grad_(grad) for f in features]
    taps = Taps(arch=arch, features=features, level_names=["0", "1"], strides=list(STRIDES),
                image_sizes=[(64, 64), (64, 64)], batch_shape=(64, 64), targets=targets,
                num_classes=NUM_CLASSES)
    if arch == "faster_rcnn":
        taps.rois = [torch.tensor([[0.0, 0, 20, 20], [30, 30, 60, 60], [5, 5, 40, 40]]),
                     torch.tensor([[0.0, 0, 30, 30], [10, 10, 50, 50]])]
        taps.roi_labels = [torch.tensor([1, 0, 0]), torch.tensor([2, 0])]
        taps.class_logits = torch.randn(5, NUM_CLASSES + 1, generator=g).requires_grad_(grad)
    else:
        anchors = torch.cat([grid_anchors(h, w, s, [2.0 * s], [1.0]) for (h, w), s in zip(SHAPES, STRIDES)])
        taps.anchors = [anchors, anchors]
        taps.num_anchors_per_level = [64, 16]
        taps.cls_logits = torch.randn(2, 80, NUM_CLASSES + 1, generator=g).requires_grad_(grad)
        matched = torch.full((2, 80), -1, dtype=torch.int64)
        matched[0, 3], matched[0, 70], matched[1, 10] = 0, 1, -2
        taps.matched_idxs = list(matched)
    return taps


def build(name: str, arch: str = "retinanet", options: dict | None = None, teacher_channels: int = 4,
          student_channels: int = 4):
    return build_distiller(name, options or {}, [teacher_channels] * 2, [student_channels] * 2, arch)


def set_identity(distiller) -> None:
    """1x1 adapters become the identity map (equal widths)."""
    with torch.no_grad():
        for seq in distiller.adapters:
            conv = seq[0]
            conv.weight.zero_()
            conv.weight[:, :, 0, 0] = torch.eye(conv.weight.shape[0])
            conv.bias.zero_()


def const_features(values: list[float], channels: int = 4) -> list[torch.Tensor]:
    return [torch.full((2, channels, h, w), v) for (h, w), v in zip(SHAPES, values)]


def kl_reference(zs: torch.Tensor, zt: torch.Tensor, T: float) -> torch.Tensor:
    """Per-row KL(softmax(zt/T) || softmax(zs/T)) * T^2, written out with probabilities."""
    ps = torch.softmax(zs.double() / T, dim=1)
    pt = torch.softmax(zt.double() / T, dim=1)
    return (pt * torch.log(pt / ps)).sum(dim=1) * T * T


ALL = ["fitnet", "fgfi", "defeat", "kd", "rkd"]


# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def test_grid_anchors_match_torchvision_anchor_generator():
    sizes, ratios = ((32,), (64,)), ((0.5, 1.0, 2.0),) * 2
    gen = AnchorGenerator(sizes, ratios)
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    feats = [torch.zeros(1, 4, h, w) for h, w in SHAPES]
    expected = gen(images, feats)[0]
    taps = make_taps("faster_rcnn")
    ours = torch.cat([a.reshape(-1, 4) for a in level_anchors(taps, 0, [32, 64], [0.5, 1.0, 2.0])])
    torch.testing.assert_close(ours, expected)
    default = torch.cat([a.reshape(-1, 4) for a in level_anchors(taps, 0)])  # 8 x stride = 64, 128
    gen = AnchorGenerator(((64,), (128,)), ratios)
    torch.testing.assert_close(default, gen(images, feats)[0])


def test_box_masks_cover_overlapped_cells():
    taps = make_taps("retinanet", boxes=[[[8.0, 8.0, 24.0, 24.0]], [[0.0, 0.0, 3.0, 3.0]]])
    m0, m1 = box_masks(taps, [t["boxes"] for t in taps.targets])
    expected0 = torch.zeros(8, 8)
    expected0[1:3, 1:3] = 1  # x, y in [8, 24) -> cells 1, 2
    assert torch.equal(m0[0, 0], expected0)
    expected1 = torch.zeros(4, 4)
    expected1[0:2, 0:2] = 1  # [0.5, 1.5] on stride 16 -> cells 0, 1
    assert torch.equal(m1[0, 0], expected1)
    assert m0[1, 0].sum() == 1 and m0[1, 0, 0, 0] == 1  # a box smaller than a cell marks its cell
    line = box_mask(torch.tensor([[8.0, 8.0, 8.0, 12.0]]), 8, 8, 8)  # zero width on a cell border
    assert line.sum() == 1 and line[1, 1] == 1


def test_imitation_mask_threshold_is_relative_to_each_box_over_all_levels():
    taps = make_taps("retinanet")  # one square anchor per location: 16 px on stride 8, 32 px on stride 16
    anchors = level_anchors(taps, 0)
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [16.0, 16.0, 48.0, 48.0]])
    m0, m1 = imitation_masks(anchors, SHAPES, boxes, factor=0.5)
    # box 0 equals the level-0 anchor at cell (2, 2) (anchors are centred on cell corners); its neighbours
    # reach IoU 1/3 < 0.5. Box 1 equals the level-1 anchor at (2, 2); level-0 anchors reach only 0.25
    expected0 = torch.zeros(8, 8)
    expected0[2, 2] = 1
    expected1 = torch.zeros(4, 4)
    expected1[2, 2] = 1
    assert torch.equal(m0, expected0) and torch.equal(m1, expected1)
    m0, m1 = imitation_masks(anchors, SHAPES, boxes, factor=0.3)  # now the 1/3 neighbours of box 0 join
    assert m0.sum() == 5 and m1.sum() == 5
    empty = imitation_masks(anchors, SHAPES, torch.zeros(0, 4))
    assert all(m.sum() == 0 for m in empty)


# ----------------------------------------------------------------------------------------------------------
# (1) Values on hand-made cases


def test_fitnet_value():
    d = build("fitnet", options={"weight": 2.0})
    set_identity(d)
    student = make_taps("retinanet", features=const_features([0.0, 0.0]))
    teacher = make_taps("retinanet", features=const_features([1.0, 2.0]))
    out = d(teacher, student, student.targets)
    assert set(out) == {"fitnet_feat"}
    torch.testing.assert_close(out["fitnet_feat"], torch.tensor(2.0 * (1.0 + 4.0) / 2))  # levels averaged
    s, t = make_taps("retinanet", seed=1), make_taps("retinanet", seed=2)
    expected = sum(((fs - ft) ** 2).mean() for fs, ft in zip(s.features, t.features)) / 2 * 2.0
    torch.testing.assert_close(d(t, s, s.targets)["fitnet_feat"], expected)


def test_fgfi_value_one_stage():
    d = build("fgfi", options={"weight": 1.0, "adapter": "conv1x1"})
    set_identity(d)
    boxes = [[[8.0, 8.0, 24.0, 24.0]], [[16.0, 16.0, 48.0, 48.0]]]
    student = make_taps("retinanet", boxes=boxes, features=const_features([0.0, 0.0]))
    teacher = make_taps("retinanet", boxes=boxes, features=const_features([1.0, 3.0]))
    out = d(teacher, student, student.targets)
    # mask: image 0 level 0 cell (2, 2) and image 1 level 1 cell (2, 2) -> N_p = 2;
    # squared error summed over the 4 channels: 4 * 1 and 4 * 9 -> (4 + 36) / (2 * 2)
    torch.testing.assert_close(out["fgfi_feat"], torch.tensor(10.0))
    assert build("fgfi").opts.weight == 0.01  # the FGFI authors' default lambda


def test_fgfi_faster_rcnn_uses_generated_rpn_anchors():
    d = build("fgfi", "faster_rcnn", {"weight": 1.0, "adapter": "conv1x1", "anchor_sizes": [16, 32],
                                      "aspect_ratios": [1.0]})
    set_identity(d)
    boxes = [[[8.0, 8.0, 24.0, 24.0]], []]
    student = make_taps("faster_rcnn", boxes=boxes, features=const_features([0.0, 0.0]))
    teacher = make_taps("faster_rcnn", boxes=boxes, features=const_features([2.0, 5.0]))
    # same anchors as the one-stage case: only level-0 cell (2, 2) of image 0 -> 4 * 4 / 2
    torch.testing.assert_close(d(teacher, student, student.targets)["fgfi_feat"], torch.tensor(8.0))


def test_defeat_value_features_and_rois():
    d = build("defeat", "faster_rcnn", {"adapter": "identity"})
    boxes = [[[8.0, 8.0, 24.0, 24.0]], []]
    student = make_taps("faster_rcnn", boxes=boxes, features=const_features([0.0, 0.0]))
    teacher = make_taps("faster_rcnn", boxes=boxes, features=const_features([3.0, 3.0]))
    teacher.features[0][0, :, 1:3, 1:3] = 1.0  # the box's cells on each level (see test_box_masks)
    teacher.features[1][0, :, 0:2, 0:2] = 1.0
    zs = torch.zeros(5, NUM_CLASSES + 1)
    zt = torch.zeros(5, NUM_CLASSES + 1)
    zt[0, 0] = math.log(3.0)  # positive RoI: p_t = (1/2, 1/6, 1/6, 1/6) against uniform
    zt[1, 1] = math.log(3.0)  # negative RoI, same distribution; the other negatives agree with the student
    student.class_logits, teacher.class_logits = zs, zt
    out = d(teacher, student, student.targets)
    assert set(out) == {"defeat_fg", "defeat_bg", "defeat_roi_fg", "defeat_roi_bg"}
    # foreground cells err by 1, background cells by 3: half-MSE 0.5 and 4.5, weights 3 and 12
    torch.testing.assert_close(out["defeat_fg"], torch.tensor(3.0 * 0.5))
    torch.testing.assert_close(out["defeat_bg"], torch.tensor(12.0 * 4.5))
    kl = 0.5 * math.log(4.0 / 3.0)  # 1/2 ln 2 + 3 * 1/6 ln(2/3)
    pos = kl / 2  # two positive RoIs (labels 1 and 2), one of them agreeing
    neg = kl / 3  # three negative RoIs
    torch.testing.assert_close(out["defeat_roi_fg"], torch.tensor(2.0 * pos))
    torch.testing.assert_close(out["defeat_roi_bg"], torch.tensor(2.0 * neg))


def test_defeat_one_stage_is_feature_only():
    d = build("defeat", "retinanet")
    assert not d.request().roi_outputs
    s, t = make_taps("retinanet", seed=1), make_taps("retinanet", seed=2)
    assert set(d(t, s, s.targets)) == {"defeat_fg", "defeat_bg"}
    assert build("defeat", "faster_rcnn").request().roi_outputs
    assert not build("defeat", "faster_rcnn", {"roi": False}).request().roi_outputs


def test_kd_value_faster_rcnn():
    d = build("kd", "faster_rcnn", {"temperature": 2.0})
    assert d.request().roi_outputs and not d.request().features
    s, t = make_taps("faster_rcnn", seed=1), make_taps("faster_rcnn", seed=2)
    ref = kl_reference(s.class_logits, t.class_logits, 2.0)
    torch.testing.assert_close(d(t, s, s.targets)["kd_cls"], ref.mean().float())
    d = build("kd", "faster_rcnn", {"temperature": 2.0, "samples": "positive"})
    torch.testing.assert_close(d(t, s, s.targets)["kd_cls"], ref[[0, 3]].mean().float())
    d = build("kd", "faster_rcnn", {"temperature": 2.0, "class_reduction": "mean", "weight": 3.0})
    torch.testing.assert_close(d(t, s, s.targets)["kd_cls"], 3.0 * ref.mean().float() / (NUM_CLASSES + 1))


def test_kd_value_one_stage_positive_anchors():
    d = build("kd", "retinanet", {"temperature": 1.0})
    assert d.request().dense_outputs
    s, t = make_taps("retinanet"), make_taps("retinanet")
    s.cls_logits = torch.zeros(2, 80, NUM_CLASSES + 1)
    t.cls_logits = torch.full((2, 80, NUM_CLASSES + 1), 5.0)  # far off everywhere but where set below
    t.cls_logits[:, :, 0] = -30.0  # column 0 is never a class: ignored
    t.cls_logits[0, 3, 1:] = 0.0  # positive anchor 0 agrees with the student
    t.cls_logits[0, 70, 1:] = 0.0
    t.cls_logits[0, 70, 2] = math.log(4.0)  # p_t = 0.8 against 0.5 on one class
    out = d(t, s, s.targets)
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    torch.testing.assert_close(out["kd_cls"], torch.tensor(kl / 2))  # two positives (matched >= 0)
    d = build("kd", "retinanet", {"temperature": 1.0, "samples": "all"})
    assert d(t, s, s.targets)["kd_cls"] > 1.0  # the far-off background anchors now count
    # exactly: all 2 x 80 anchors count (the ignored -2 one too), each summing classes 1..3 against p_s = 0.5
    p = 1 / (1 + math.exp(-5.0))
    far = 3 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))  # the teacher's logit 5 everywhere
    expected = (158 * far + 0.0 + kl) / 160  # + anchor (0, 3), which agrees, and anchor (0, 70) from above
    torch.testing.assert_close(d(t, s, s.targets)["kd_cls"], torch.tensor(expected))


def test_rkd_losses_hand_values():
    t = torch.tensor([[0.0], [1.0], [2.0]])
    s = torch.tensor([[0.0], [1.0], [3.0]])
    # teacher distances 1, 2, 1 / mean 4/3; student 1, 3, 2 / mean 2: errors .25, 0, .25 -> 0.5 x^2
    torch.testing.assert_close(rkd_distance_loss(s, t), torch.tensor(2 * 0.5 * 0.25**2 / 3))
    s2 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # right angle at instance 1, 45 deg at 0 and 2
    # teacher cosines at instances 0, 1, 2: 1, -1, 1; student: 1/sqrt 2, 0, 1/sqrt 2
    small = 0.5 * (1 - 1 / math.sqrt(2)) ** 2
    expected = (2 * 0.5 + 4 * small) / 6  # |1| error is past the Huber knee: 1 - 0.5
    torch.testing.assert_close(rkd_angle_loss(s2, t), torch.tensor(expected))
    assert rkd_distance_loss(s[:1], t[:1]) == 0 and rkd_angle_loss(s[:2], t[:2]) == 0


def test_rkd_distiller_relations_are_scale_invariant():
    d = build("rkd")
    t = make_taps("retinanet", seed=3)
    s = make_taps("retinanet", features=[2.0 * f for f in t.features])  # same relations, twice the scale
    out = d(t, s, s.targets)
    assert set(out) == {"rkd_distance", "rkd_angle"}
    assert out["rkd_distance"].abs() < 1e-5 and out["rkd_angle"].abs() < 1e-5
    s = make_taps("retinanet", seed=4)
    out = d(t, s, s.targets)
    assert out["rkd_distance"] > 0 and out["rkd_angle"] > 0
    # per image: only image 0 has boxes (3 of them), so the batch and image scopes agree
    out_img = build("rkd", options={"scope": "image"})(t, s, s.targets)
    torch.testing.assert_close(out_img["rkd_distance"], out["rkd_distance"])
    torch.testing.assert_close(out_img["rkd_angle"], out["rkd_angle"])
    assert set(build("rkd", options={"angle_weight": 0.0})(t, s, s.targets)) == {"rkd_distance"}


# ----------------------------------------------------------------------------------------------------------
# (2) Gradients reach the student and the adapters, never the teacher


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_gradients_reach_student_and_adapters_only(name, arch):
    # fgfi on Faster R-CNN: anchors that fit 64 px images, so every level has near-object locations
    options = {"anchor_sizes": [16, 32]} if (name, arch) == ("fgfi", "faster_rcnn") else {}
    d = build(name, arch, options)
    teacher = make_taps(arch, grad=True, seed=1)  # teacher leaves that WOULD receive gradients
    student = make_taps(arch, grad=True, seed=2)
    out = d(teacher, student, student.targets)
    total = sum(out.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    if name == "kd":
        logits = student.class_logits if arch == "faster_rcnn" else student.cls_logits
        assert logits.grad is not None and logits.grad.abs().sum() > 0
    elif name == "rkd":  # the synthetic boxes all pool from level 0
        assert student.features[0].grad.abs().sum() > 0
    else:
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student.features)
    for p in d.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    teacher_logits = teacher.class_logits if arch == "faster_rcnn" else teacher.cls_logits
    assert all(t.grad is None for t in teacher.features + [teacher_logits])


# ----------------------------------------------------------------------------------------------------------
# (3) Empty images


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_no_boxes_gives_finite_zero_box_terms(name, arch):
    d = build(name, arch)
    teacher = make_taps(arch, boxes=[[], []], seed=1)
    student = make_taps(arch, boxes=[[], []], grad=True, seed=2)
    if arch == "retinanet":
        student.matched_idxs = [torch.full((80,), -1), torch.full((80,), -1)]  # no box, no positive
    out = d(teacher, student, student.targets)
    assert all(torch.isfinite(v) for v in out.values())
    box_terms = {"fgfi_feat", "defeat_fg", "rkd_distance", "rkd_angle"}
    if arch == "retinanet":
        box_terms.add("kd_cls")
    for key in box_terms & set(out):
        assert out[key] == 0, key
    sum(out.values()).backward()  # still a graph: DDP sees every parameter used
    assert all(p.grad is not None for p in d.parameters())


# ----------------------------------------------------------------------------------------------------------
# (4) Different teacher and student widths


@pytest.mark.parametrize("name", ["fitnet", "fgfi", "defeat", "rkd"])
def test_different_widths_go_through_adapters(name):
    d = build(name, "faster_rcnn", teacher_channels=6, student_channels=4)
    teacher = make_taps("faster_rcnn", channels=6, seed=1)
    student = make_taps("faster_rcnn", channels=4, grad=True, seed=2)
    out = d(teacher, student, student.targets)
    sum(out.values()).backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert all(f.grad is not None for f in student.features)
    feature_keys = [k for k in out if "roi" not in k]  # defeat's RoI KD compares logits, not features
    assert all(out[k] > 0 for k in feature_keys), out
    # what is compared is the adapted student: adapters that copy the 4 student channels into the first 4 of
    # the teacher's 6, against a teacher that is the student padded with two zero channels, give 0 (RKD
    # compares relations, which the zero channels do not change)
    with torch.no_grad():
        for seq in getattr(d, "adapters", []):
            conv = seq[0]
            conv.weight.zero_()
            conv.weight[:4, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = torch.eye(4)
            conv.bias.zero_()
    padded = make_taps("faster_rcnn", channels=6, grad=True,
                       features=[torch.cat([f.detach(), torch.zeros_like(f[:, :2])], dim=1) for f in student.features])
    out = d(padded, student, student.targets)
    for k in feature_keys:
        torch.testing.assert_close(out[k], torch.tensor(0.0), atol=1e-5, rtol=0, msg=k)
    sum(out.values()).backward()
    assert all(f.grad is None for f in padded.features)  # never into the teacher


def test_identity_adapter_needs_equal_widths():
    with pytest.raises(ConfigError, match="identity.*level 0.*4.*6"):
        build("fitnet", options={"adapter": "identity"}, teacher_channels=6, student_channels=4)


def test_pyramid_mismatch_is_a_clear_error():
    d = build("fitnet")
    teacher, student = make_taps("retinanet", seed=1), make_taps("retinanet", seed=2)
    teacher.features = teacher.features[:1]
    with pytest.raises(ValueError, match="fitnet: teacher has 1 pyramid levels.*student 2"):
        d(teacher, student, student.targets)
    with pytest.raises(ConfigError, match="student has 3 pyramid levels, teacher 2"):
        build_distiller("defeat", {}, [4, 4], [4, 4, 4], "retinanet")


# ----------------------------------------------------------------------------------------------------------
# (5) Options through the registry


def test_build_distiller_options():
    d = build_distiller("kd", {"temperature": 4}, [4, 4], [4, 4], "retinanet")
    assert d.opts.temperature == 4.0 and isinstance(d.opts.temperature, float)
    with pytest.raises(ConfigError, match="distill.options.temprature"):
        build_distiller("kd", {"temprature": 4}, [4, 4], [4, 4], "retinanet")
    with pytest.raises(ConfigError, match=r"distill\.options\.temperature: must be > 0"):
        build_distiller("kd", {"temperature": 0}, [4, 4], [4, 4], "retinanet")
    with pytest.raises(ConfigError, match="distill.options.scope"):
        build_distiller("rkd", {"scope": "everything"}, [4, 4], [4, 4], "fcos")
    with pytest.raises(ConfigError, match=r"distill\.options\.factor: must be in \(0, 1\], got 1\.5"):
        build_distiller("fgfi", {"factor": 1.5}, [4, 4], [4, 4], "fcos")


def test_declared_ranges_are_enforced_with_one_wording():
    """A range declared on an options field (opt) is checked by build_distiller, naming the config entry, and
    by the distiller itself when built directly, naming the method; the same words for every method."""
    where = "distill.methods[0]"
    cases = [("rkd", "max_instances", 2, "must be >= 3, got 2"),
             ("gid", "resp_iou", 0.0, "must be in (0, 1], got 0.0"),
             ("mgd", "mask_ratio", 1.0, "must be in [0, 1), got 1.0"),
             ("global", "refresh_every", 0, "must be >= 1, got 0"),
             ("fgd", "gc_ratio", 4.5, "must be in (0, 4], got 4.5"),
             ("kd", "temperature", -1.0, "must be > 0, got -1.0")]
    for method, option, value, words in cases:
        with pytest.raises(ConfigError) as e:
            build_distiller(method, {option: value}, [4] * 5, [4] * 5, "retinanet", where=where)
        assert str(e.value) == f"{where}.options.{option}: {words}", method
        cls = REGISTRY[method]
        with pytest.raises(ConfigError) as e:
            cls(cls.Options(**{option: value}), [4] * 5, [4] * 5, "retinanet")
        assert str(e.value) == f"{method}.options.{option}: {words}", method
    # list elements one by one; X | None options only when set
    with pytest.raises(ConfigError, match=r"^distill\.options\.levels\[1\]: must be >= 0, got -1$"):
        build_distiller("pkd", {"levels": [0, -1]}, [4] * 5, [4] * 5, "retinanet")
    with pytest.raises(ConfigError, match=r"^distill\.options\.max_candidates: must be >= 1, got 0$"):
        build_distiller("global", {"max_candidates": 0}, [4], [4], "retinanet")
    assert build_distiller("global", {"max_candidates": None}, [4], [4], "retinanet").opts.max_candidates is None
    # the bounds themselves are accepted
    build_distiller("mgd", {"mask_ratio": 0.0}, [4] * 5, [4] * 5, "retinanet")
    build_distiller("gid", {"resp_iou": 1.0, "nms_iou": 1.0}, [4] * 5, [4] * 5, "retinanet")


def _outside(rng) -> float:
    """A value just outside a declared range."""
    if rng.ge is not None:
        return rng.ge - 1
    if rng.gt is not None:
        return rng.gt
    return rng.le + 1 if rng.le is not None else rng.lt


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_numeric_option_declares_its_range(name):
    """Every int / float option (also X | None and lists of them) of every registered method declares a range
    with opt(), or says it has none (opt(..., unbounded=True)), so a new option cannot skip the check; and
    each declared range is enforced with the common wording."""
    import dataclasses
    import typing

    from detkd.distill.base import is_numeric, option_range

    opts_cls = REGISTRY[name].Options
    hints = typing.get_type_hints(opts_cls)
    numeric = [f for f in dataclasses.fields(opts_cls) if is_numeric(hints[f.name])]
    assert numeric, name
    undeclared = [f.name for f in numeric if option_range(f) is None]
    assert undeclared == [], f"{name}: numeric options without opt(): {undeclared}"
    for f in numeric:
        rng = option_range(f)
        if not rng.bounded:
            continue
        bad = _outside(rng)
        tp = hints[f.name]
        is_list = typing.get_origin(tp) is list
        item = typing.get_args(tp)[0] if is_list else tp
        got = float(bad) if float in (item, *typing.get_args(item)) else bad
        with pytest.raises(ConfigError) as e:
            build_distiller(name, {f.name: [bad] if is_list else bad}, [4] * 5, [4] * 5, "retinanet", where="m")
        key = f"m.options.{f.name}" + ("[0]" if is_list else "")
        assert str(e.value) == f"{key}: must be {rng}, got {got}", (name, f.name)


def test_opt_needs_a_bound_or_unbounded():
    from detkd.distill.base import opt

    with pytest.raises(TypeError, match="unbounded"):
        opt(1.0)
    with pytest.raises(TypeError, match="unbounded"):
        opt(1.0, ge=0, unbounded=True)


# ----------------------------------------------------------------------------------------------------------
# One training step with real (tiny, random) torchvision detectors


@pytest.fixture(scope="module")
def detectors():
    from detkd.config import ModelConfig
    from detkd.models import build_detector, feature_channels

    torch.manual_seed(0)
    out = {}
    for arch in ("faster_rcnn", "retinanet", "fcos"):
        common = dict(arch=arch, backbone="resnet18", num_classes=NUM_CLASSES, min_size=64, max_size=64,
                      box_batch_size_per_image=64, rpn_batch_size_per_image=64)
        student = build_detector(ModelConfig(fpn_channels=32, **common))
        teacher = build_detector(ModelConfig(fpn_channels=64, **common))  # wider: adapters map 32 -> 64
        teacher.eval().requires_grad_(False)
        out[arch] = (teacher, student, feature_channels(teacher), feature_channels(student))
    return out


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet", "fcos"])
def test_one_step_on_real_detectors(detectors, arch):
    """Every baseline on one real batch: taps of both detectors, the merged request, one backward."""
    from detkd.taps import tap_student, tap_teacher, transform_batch

    teacher, student, tc, sc = detectors[arch]
    student.train()
    student.zero_grad(set_to_none=True)
    distillers = {name: build_distiller(name, {}, tc, sc, arch) for name in ALL}
    request = distillers["fitnet"].request()
    for d in distillers.values():
        request = request.merge(d.request())
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0], [33.0, 2.0, 50.0, 20.0]]),
         "labels": torch.tensor([1, 2, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an empty image
    ]
    image_list, tt = transform_batch(student, images, targets)
    det_losses, s_taps = tap_student(student, image_list, tt)
    t_taps = tap_teacher(teacher, image_list, tt, request, s_taps)
    total = sum(det_losses.values())
    for name, d in distillers.items():
        out = d(t_taps, s_taps, tt)
        assert out and all(k.startswith(name) for k in out), (name, out)
        assert all(torch.isfinite(v) for v in out.values()), (name, out)
        total = total + sum(out.values())
    total.backward()
    for name, d in distillers.items():
        # every adapter is in the graph (DDP); fgfi's on levels without near-object locations get zeros
        grads = [p.grad for p in d.parameters()]
        assert all(g is not None for g in grads) and (not grads or sum(g.abs().sum() for g in grads) > 0), name
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_every_parameter_gets_a_gradient_so_ddp_need_not_search(arch):
    """DDP runs with ``find_unused_parameters`` only for a distiller that declares ``unused_parameters``; a
    method that declares none must reach every parameter of its own and of the student in one step."""
    for name, cls in sorted(REGISTRY.items()):
        if arch not in cls.archs or cls.unused_parameters or issubclass(cls, PrototypeDistiller):
            continue  # the prototype methods: tests/test_global.py, DDP in tests/test_reliability.py
        student, _, method, det, t_taps, s_taps, tt = real_pair_taps(
            arch, 48, lambda t, s, name=name: build_distiller(name, {}, t, s, arch))
        sum([*method(t_taps, s_taps, tt).values(), *det.values()]).backward()
        for module in (method, student):
            missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
            assert missing == [], f"{name}: {missing[:3]}"
