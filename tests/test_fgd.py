"""FGD: masks cell by cell, each loss term against an independent (pure Python / numpy) computation,
and where the gradients go."""

import math

import numpy as np
import pytest
import torch

from detkd.config import ConfigError, from_dict
from detkd.distill import REGISTRY
from detkd.distill.fgd import FGD, FGDOptions, background_mask, foreground_mask
from detkd.taps import Taps


def make_taps(features, boxes, image_sizes, arch="retinanet", level_names=None, batch_shape=None):
    level_names = level_names or [str(i) for i in range(len(features))]
    batch_shape = batch_shape or tuple(image_sizes[0])
    strides = [batch_shape[0] // f.shape[-2] for f in features]
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
    return Taps(arch=arch, features=features, level_names=level_names, strides=strides,
                image_sizes=image_sizes, batch_shape=batch_shape, targets=targets, num_classes=3)


def unit_options(**kw):
    return FGDOptions(alpha=1.0, beta=1.0, gamma=1.0, lam=1.0, **kw)


# ----------------------------------------------------------------------------------------------------------
# Masks


def test_foreground_mask_hand_drawn():
    # 8x8 image on a 4x4 grid (x * 4 / 8). Box A (0.5,0.5,2.5,2.5) -> grid [0.25, 1.25] -> cells 0..2 both
    # ways: 3x3 = 9 cells, 1/9. Box B (2,2,5,3) -> x [1, 2.5] -> cols 1..3, y [1, 1.5] -> rows 1..2: 1/6,
    # wins over A where they overlap. Box C (7,6,8,8) touches the right and bottom border: x [3.5, 4] ->
    # cols 3..4, y [3, 4] -> rows 3..4: counted 2x2 = 4 (the authors count past the border), 1/4 on the
    # only cell inside the grid (3, 3).
    boxes = [torch.tensor([[0.5, 0.5, 2.5, 2.5], [2.0, 2.0, 5.0, 3.0], [7.0, 6.0, 8.0, 8.0]]),
             torch.zeros((0, 4))]
    fg = foreground_mask(boxes, [(8, 8), (8, 8)], 4, 4)
    a, b, c = 1 / 9, 1 / 6, 1 / 4
    expected = torch.tensor([
        [a, a, a, 0],
        [a, b, b, b],
        [a, b, b, b],
        [0, 0, 0, c],
    ])
    torch.testing.assert_close(fg[0], expected)
    assert torch.equal(fg[1], torch.zeros(4, 4))  # an image without boxes is all background

    bg = background_mask(fg)
    expected_bg = (expected == 0).float() / 4  # 4 background cells in image 0
    torch.testing.assert_close(bg[0], expected_bg)
    torch.testing.assert_close(bg[1], torch.full((4, 4), 1 / 16))


def test_box_scale_padded_uses_batch_shape():
    # A 4-px wide image padded to 8: the authors' rule stretches x by the un-padded width (4), "padded" by 8.
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    t = torch.zeros(1, 2, 4, 4)
    for scale, cols in (("unpadded", 3), ("padded", 2)):
        fgd = FGD(unit_options(box_scale=scale), [2], [2], "retinanet")
        taps = make_taps([t], [box], [(8, 4)], batch_shape=(8, 8))
        frames = [taps.batch_shape] if scale == "padded" else taps.image_sizes
        fg = foreground_mask([box], frames, 4, 4)
        assert int((fg[0, 0] > 0).sum()) == cols  # columns covered in row 0
        # the distiller uses the same frames: its fg term is zero iff the covered cells agree
        s = t.clone()
        s[0, :, 0, cols - 1] = 1.0  # differs exactly on the last covered column
        out = fgd(taps, make_taps([s], [box], [(8, 4)], batch_shape=(8, 8)), taps.targets)
        assert out["fgd_fg"] > 0
        # exactly: the box covers 2 rows x cols columns, so the cell weighs 1 / (2 cols) (scale mask); a zero
        # teacher has uniform attention (both masks 1); 2 channels err by 1 -> 2 / (2 cols)
        torch.testing.assert_close(out["fgd_fg"], torch.tensor(1.0 / cols))
        s2 = t.clone()
        s2[0, :, 0, cols] = 1.0  # first column outside the box
        out2 = fgd(taps, make_taps([s2], [box], [(8, 4)], batch_shape=(8, 8)), taps.targets)
        assert out2["fgd_fg"] == 0


# ----------------------------------------------------------------------------------------------------------
# Loss terms against a pure-Python computation


def ref_attention(f, temp):
    """f: nested list [c][y][x]. Spatial (H*W softmax of mean_c |f| / temp) and channel attention."""
    c, h, w = len(f), len(f[0]), len(f[0][0])
    sp = [[sum(abs(f[k][y][x]) for k in range(c)) / c for x in range(w)] for y in range(h)]
    z = sum(math.exp(sp[y][x] / temp) for y in range(h) for x in range(w))
    spatial = [[h * w * math.exp(sp[y][x] / temp) / z for x in range(w)] for y in range(h)]
    ch = [sum(abs(f[k][y][x]) for y in range(h) for x in range(w)) / (h * w) for k in range(c)]
    zc = sum(math.exp(v / temp) for v in ch)
    channel = [c * math.exp(v / temp) / zc for v in ch]
    return spatial, channel


def test_terms_hand_computed_one_image():
    # 1 image 6x6, C = 2, 3x3 map (x * 3 / 6). Box (0,0,2,2) -> [0, 1] -> rows/cols 0..1: 4 cells at 1/4;
    # background: the 5 other cells at 1/5.
    t = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 3.0, -1.0], [2.0, 1.0, 0.0]],
                      [[0.5, 0.5, -0.5], [1.0, -1.0, 2.0], [0.0, 0.0, 1.5]]])
    s = torch.tensor([[[0.0, -1.0, 0.5], [1.0, 2.0, -1.0], [2.0, 0.0, 1.0]],
                      [[1.5, 0.5, 0.5], [1.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]])
    temp = 0.5
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    fgd = FGD(unit_options(temp=temp), [2], [2], "retinanet")
    out = fgd(make_taps([t[None]], [box], [(6, 6)]), make_taps([s[None]], [box], [(6, 6)]), [{"boxes": box}])

    tl, sl = t.tolist(), s.tolist()
    sp_t, ch_t = ref_attention(tl, temp)
    sp_s, ch_s = ref_attention(sl, temp)
    fg = [[0.25 if (y <= 1 and x <= 1) else 0.0 for x in range(3)] for y in range(3)]
    bg = [[0.0 if fg[y][x] else 0.2 for x in range(3)] for y in range(3)]
    fg_ref = bg_ref = glob_ref = 0.0
    for k in range(2):
        for y in range(3):
            for x in range(3):
                d2 = (sl[k][y][x] - tl[k][y][x]) ** 2
                fg_ref += fg[y][x] * sp_t[y][x] * ch_t[k] * d2
                bg_ref += bg[y][x] * sp_t[y][x] * ch_t[k] * d2
                glob_ref += d2  # fresh GC blocks are the identity (last conv zero)
    attn_ref = sum(abs(a - b) for a, b in zip(ch_s, ch_t))
    attn_ref += sum(abs(sp_s[y][x] - sp_t[y][x]) for y in range(3) for x in range(3))

    assert out["fgd_fg"].item() == pytest.approx(fg_ref, rel=1e-5)
    assert out["fgd_bg"].item() == pytest.approx(bg_ref, rel=1e-5)
    assert out["fgd_attn"].item() == pytest.approx(attn_ref, rel=1e-5)
    assert out["fgd_global"].item() == pytest.approx(glob_ref, rel=1e-5)

    # the family defaults weight the same terms (RetinaNet: 1e-3, 5e-4, 5e-4, 5e-6; temp 0.5)
    default = FGD(FGDOptions(), [2], [2], "retinanet")
    out_d = default(make_taps([t[None]], [box], [(6, 6)]), make_taps([s[None]], [box], [(6, 6)]),
                    [{"boxes": box}])
    assert out_d["fgd_fg"].item() == pytest.approx(1e-3 * fg_ref, rel=1e-5)
    assert out_d["fgd_bg"].item() == pytest.approx(5e-4 * bg_ref, rel=1e-5)
    assert out_d["fgd_attn"].item() == pytest.approx(5e-4 * attn_ref, rel=1e-5)
    assert out_d["fgd_global"].item() == pytest.approx(5e-6 * glob_ref, rel=1e-5)


def test_global_zero_init_is_sum_of_squares_over_batch():
    torch.manual_seed(0)
    t = torch.randn(2, 4, 5, 6)
    s = torch.randn(2, 4, 5, 6)
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros((0, 4))]
    fgd = FGD(unit_options(), [4], [4], "retinanet")
    out = fgd(make_taps([t], boxes, [(20, 24)] * 2), make_taps([s], boxes, [(20, 24)] * 2), [{"boxes": b}
                                                                                            for b in boxes])
    assert out["fgd_global"].item() == pytest.approx(((s - t) ** 2).sum().item() / 2, rel=1e-5)


def ref_gc_block(block, f):
    """numpy GC block: f (C, H, W) -> f + W2 relu(LN(W1 ctx + b1)) + b2, ctx = sum softmax(wk f + bk) f."""
    c, h, w = f.shape
    wk = block.context.weight.detach().numpy().reshape(c)
    bk = block.context.bias.detach().numpy()[0]
    logits = np.einsum("c,chw->hw", wk, f) + bk
    p = np.exp(logits - logits.max())
    p /= p.sum()
    ctx = np.einsum("chw,hw->c", f, p)
    conv1, ln, _, conv2 = block.transform
    z = conv1.weight.detach().numpy()[:, :, 0, 0] @ ctx + conv1.bias.detach().numpy()
    z = (z - z.mean()) / np.sqrt(z.var() + ln.eps)
    z = z * ln.weight.detach().numpy().reshape(-1) + ln.bias.detach().numpy().reshape(-1)
    z = np.maximum(z, 0)
    add = conv2.weight.detach().numpy()[:, :, 0, 0] @ z + conv2.bias.detach().numpy()
    return f + add[:, None, None]


def test_global_term_with_trained_blocks_matches_numpy():
    torch.manual_seed(1)
    fgd = FGD(unit_options(), [4], [4], "retinanet")
    level = fgd.level_modules[0]
    assert level.gc_student.transform[0].out_channels == 2  # bottleneck C / 2, as the authors
    with torch.no_grad():
        for p in list(level.gc_student.parameters()) + list(level.gc_teacher.parameters()):
            p.copy_(torch.randn_like(p) * 0.5)
    t = torch.randn(2, 4, 3, 5)
    s = torch.randn(2, 4, 3, 5)
    boxes = [torch.zeros((0, 4))] * 2
    out = fgd(make_taps([t], boxes, [(12, 20)] * 2), make_taps([s], boxes, [(12, 20)] * 2),
              [{"boxes": b} for b in boxes])
    ref = sum(((ref_gc_block(level.gc_student, s[i].double().numpy())
                - ref_gc_block(level.gc_teacher, t[i].double().numpy())) ** 2).sum() for i in range(2)) / 2
    assert out["fgd_global"].item() == pytest.approx(ref, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Gradients, levels, options


def test_gradients_reach_student_align_and_both_gc_blocks_not_teacher():
    torch.manual_seed(2)
    t = torch.randn(2, 4, 4, 4, requires_grad=True)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    boxes = [torch.tensor([[2.0, 2.0, 9.0, 7.0]]), torch.zeros((0, 4))]
    fgd = FGD(unit_options(), [4], [3], "retinanet")
    out = fgd(make_taps([t], boxes, [(16, 16)] * 2), make_taps([s], boxes, [(16, 16)] * 2),
              [{"boxes": b} for b in boxes])
    assert set(out) == {"fgd_fg", "fgd_bg", "fgd_attn", "fgd_global"}
    sum(out.values()).backward()
    level = fgd.level_modules[0]
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert level.align.weight.grad.abs().sum() > 0
    # zero-initialised last convs: their weights are what moves first in both blocks
    assert level.gc_student.transform[-1].weight.grad.abs().sum() > 0
    assert level.gc_teacher.transform[-1].weight.grad.abs().sum() > 0
    assert t.grad is None  # teacher features are detached


def test_faster_rcnn_distils_p2_to_p5_not_pool():
    torch.manual_seed(3)
    names = ["0", "1", "2", "3", "pool"]
    sizes = [16, 8, 4, 2, 1]
    t = [torch.randn(1, 4, n, n) for n in sizes]
    s = [torch.randn(1, 4, n, n, requires_grad=True) for n in sizes]
    box = [torch.tensor([[4.0, 4.0, 40.0, 30.0]])]
    fgd = FGD(FGDOptions(), [4] * 5, [4] * 5, "faster_rcnn")
    assert fgd.levels == [0, 1, 2, 3] and len(fgd.level_modules) == 4
    assert fgd.alpha == 5e-5 and fgd.lam == 5e-7
    out = fgd(make_taps(t, box, [(64, 64)], "faster_rcnn", names),
              make_taps(s, box, [(64, 64)], "faster_rcnn", names), [{"boxes": box[0]}])
    sum(out.values()).backward()
    assert s[4].grad is None and s[3].grad is not None
    assert all(s[i].grad.abs().sum() > 0 for i in range(4))  # each of P2-P5 is distilled


def test_fcos_defaults_and_option_override():
    fgd = FGD(FGDOptions(alpha=2.0), [8] * 5, [8] * 5, "fcos")
    assert (fgd.temp, fgd.alpha, fgd.beta, fgd.gamma, fgd.lam) == (0.8, 2.0, 8e-4, 8e-4, 8e-6)


def build_distiller(name, options, teacher_channels, student_channels, arch):
    # what detkd.distill.base.build_distiller does, without importing every other method module
    cls = REGISTRY[name]
    return cls(from_dict(cls.Options, options, "distill.options"), teacher_channels, student_channels, arch)


def test_registry_and_bad_input():
    assert REGISTRY["fgd"] is FGD
    d = build_distiller("fgd", {"temp": 1.0, "levels": [0]}, [4, 4], [2, 2], "retinanet")
    assert isinstance(d, FGD) and d.levels == [0] and d.temp == 1.0
    assert isinstance(d.level_modules[0].align, torch.nn.Conv2d)
    with pytest.raises(ConfigError, match="box_scale"):
        build_distiller("fgd", {"box_scale": "both"}, [4], [4], "retinanet")
    with pytest.raises(ConfigError, match="levels"):
        build_distiller("fgd", {"levels": [3]}, [4], [4], "retinanet")
    with pytest.raises(ConfigError, match="temp"):
        build_distiller("fgd", {"temp": 0.0}, [4], [4], "retinanet")
    fgd = FGD(unit_options(), [4], [4], "retinanet")
    box = [torch.zeros((0, 4))]
    with pytest.raises(ValueError, match="differ in size"):
        fgd(make_taps([torch.zeros(1, 4, 4, 4)], box, [(16, 16)]),
            make_taps([torch.zeros(1, 4, 2, 2)], box, [(16, 16)]), [{"boxes": box[0]}])


# ----------------------------------------------------------------------------------------------------------
# One step with real (tiny, random) torchvision detectors


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_one_step_on_real_detectors(arch):
    from tests.engine_helpers import real_pair_taps

    student, teacher, fgd, det_losses, t_taps, s_taps, tt = real_pair_taps(
        arch, 48, lambda t, s: build_distiller("fgd", {}, t, s, arch))
    out = fgd(t_taps, s_taps, tt)
    assert all(torch.isfinite(v) and v > 0 for v in out.values()), out
    (sum(det_losses.values()) + sum(out.values())).backward()
    assert all(p.grad is not None for p in fgd.parameters())
    assert len(fgd.level_modules) == (4 if arch == "faster_rcnn" else 5)
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
