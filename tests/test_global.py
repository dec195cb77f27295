"""RDM of the global-knowledge method (Eq. 6-9) and the Table 4 "+prototypes" variants.

Hand cases use constant feature maps: RoIAlign of any box then returns the constant, so the pooled instance
features are known 2-D vectors. The running example (lam = 1, K = 2):

    teacher prototypes (1, 0), (0, 1); student prototypes (1, 0), (0, 2)
    teacher instance (2, 1), student instance (1, 1)
    step 1: p_t = 2, p_s = 1, n_t = n_s = 1, den = 2 * 2 - 1 = 3 -> a = (2*2 + 1)/3 = 5/3, b = (1*2 + 2)/3 = 4/3
            residuals r_t = (1/3, 1), r_s = (-1/3, 1)
    step 2: p_t = 1, p_s = 2, n_t = 1, n_s = 4, den = 2 * 5 - 1 = 9 -> a = (1*5 + 2)/9 = 7/9, b = (2*2 + 1)/9 = 5/9
    Lambda^t = (5/3, 7/9), Lambda^s = (4/3, 5/9), ||diff||^2 = 1/9 + 4/81 = 13/81, sigma = 1 - sqrt(13)/9
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from detkd.config import ConfigError
from detkd.distill import build_distiller
from detkd.distill.base import DistillContext
from detkd.distill.global_kd.pgm import project
from detkd.distill.global_kd.terms import cosine_all_terms, cosine_max_sigma, paper_global_terms, paper_sigma
from detkd.taps import Taps

PT = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
PS = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
LAM_T = torch.tensor([5 / 3, 7 / 9])
LAM_S = torch.tensor([4 / 3, 5 / 9])
SQ = 13 / 81
SIGMA = 1 - math.sqrt(13) / 9
NUM_CLASSES = 3


def constant_taps(arch: str, vec_per_image: list[list[float]], boxes: list[list[list[float]]],
                  labels: list[list[int]], grad: bool = False, size: int = 32, stride: int = 8) -> Taps:
    """One pyramid level, a map per image that is the constant ``vec`` everywhere."""
    h = size // stride
    maps = torch.stack([torch.tensor(v).view(-1, 1, 1).expand(-1, h, h) for v in vec_per_image]).clone()
    maps.requires_grad_(grad)
    targets = [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(lab)}
               for b, lab in zip(boxes, labels)]
    return Taps(arch=arch, features=[maps], level_names=["0"], strides=[stride],
                image_sizes=[(size, size)] * len(boxes), batch_shape=(size, size), targets=targets,
                num_classes=NUM_CLASSES)


def bank_state(entries: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]], levels: int = 1) -> dict:
    return {"bank": {"version": 1, "num_levels": levels, "refreshes": 1, "entries": {
        f"{lv}/{c}": {"indices": torch.arange(t.shape[0]), "teacher": t, "student": s}
        for (lv, c), (t, s) in entries.items()}}, "refreshed_epoch": 0}


def make(name: str, arch: str = "retinanet", channels: int = 2, **options):
    return build_distiller(name, options, [channels], [channels], arch)


BOX = [[4.0, 4.0, 20.0, 20.0]]


# ----------------------------------------------------------------------------------------------------------
# The terms on their own


def test_projection_matches_hand_computation():
    lt, ls = project(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]]), PT, PS, 1.0)
    assert torch.allclose(lt[0], LAM_T) and torch.allclose(ls[0], LAM_S)


def test_paper_sigma_is_clamped_and_detached():
    lt = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5 / 3, 7 / 9]])
    ls = torch.tensor([[0.0, 0.0], [3.0, 0.0], [4 / 3, 5 / 9]], requires_grad=True)
    s = paper_sigma(lt, ls)
    assert torch.allclose(s, torch.tensor([1.0, 0.0, SIGMA]))
    assert not s.requires_grad


def test_paper_global_term_hand_value():
    groups = [(torch.tensor([0]), LAM_T[None], LAM_S[None], None)]
    total = paper_global_terms(groups, torch.tensor([SIGMA]))
    assert math.isclose(float(total), SIGMA * SQ / 2, rel_tol=1e-6)  # sum sigma ||d||^2 / K_c


def test_cosine_max_sigma_and_cosine_all_hand_values():
    ft, fs = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    eye = torch.eye(2)
    s = cosine_max_sigma(ft, fs, eye, eye)
    assert math.isclose(float(s), 1 - (1 - 1 / math.sqrt(2)), rel_tol=1e-6)
    # rows: teacher (1, 0), student (0.7071, 0.7071); smooth-L1 (beta 1) 0.5 d^2 each, mean over the row
    d1, d2 = 1 - 1 / math.sqrt(2), 1 / math.sqrt(2)
    expected = 0.5 * (0.5 * d1**2 + 0.5 * d2**2) / 2  # sigma 0.5 times the row mean
    assert math.isclose(float(cosine_all_terms(ft, fs, eye, eye, torch.tensor([0.5]))), expected, rel_tol=1e-6)
    # not clamped: opposite directions give a negative weight, as in the authors' code
    s = cosine_max_sigma(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]]), eye[:1], eye[:1])
    assert math.isclose(float(s), -1.0, rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The distiller on hand cases


def test_global_loss_through_the_distiller_hand_value_and_gradients():
    d = make("global", lam=1.0, use_feat=False, use_resp=False)
    d.set_extra_state(bank_state({(0, 1): (PT, PS)}))
    teacher = constant_taps("retinanet", [[2.0, 1.0]], [BOX], [[1]])
    student = constant_taps("retinanet", [[1.0, 1.0]], [BOX], [[1]], grad=True)
    out = d(teacher, student, student.targets)
    assert set(out) == {"loss_global"}
    # Eq. 6: 1 / (2 N K) sum sigma ||d||^2 with N = 1, K = 2
    assert math.isclose(out["loss_global"].item(), SIGMA * SQ / 4, rel_tol=1e-5)
    assert math.isclose(d.stats["sigma_mean"], SIGMA, rel_tol=1e-5)
    out["loss_global"].backward()
    grad = student.features[0].grad.sum(dim=(0, 2, 3))
    # sigma is a constant: the gradient is that of sigma * ||Lambda^s(f) - Lambda^t||^2 / 4 with sigma fixed
    f = torch.tensor([[1.0, 1.0]], requires_grad=True)
    _, ls = project(torch.tensor([[2.0, 1.0]]), f, PT, PS, 1.0)
    (SIGMA * ((ls - LAM_T) ** 2).sum() / 4).backward()
    assert torch.allclose(grad, f.grad[0], rtol=1e-4, atol=1e-6)
    assert teacher.features[0].grad is None and not teacher.features[0].requires_grad


def test_class_without_prototypes_has_sigma_one_and_no_global_loss():
    d = make("global", lam=1.0, use_resp=False, adapter="conv1x1_relu")
    d.set_extra_state(bank_state({(0, 1): (PT, PS)}))
    teacher = constant_taps("retinanet", [[2.0, 1.0]], [BOX], [[2]])  # class 2 has no prototype
    student = constant_taps("retinanet", [[1.0, 1.0]], [BOX], [[2]], grad=True)
    out = d(teacher, student, student.targets)
    assert out["loss_global"].item() == 0.0
    assert d.stats["sigma_mean"] == 1.0 and d.stats["proto_covered"] == 0.0


def test_local_feature_loss_hand_value():
    """Eq. 7 with an identity adapter: student = teacher + 1 in the box's cells only. Box (4, 4, 20, 20) on
    a stride-8 4x4 map covers cells 0..2 x 0..2 (floor 0.5 = 0, ceil 2.5 = 3): 9 cells, d^2 = C = 2 each,
    sigma = 1 (empty bank) -> 9 * 2 / (2 * 9) = 1."""
    d = make("global", use_global=False, use_resp=False)
    conv = d.adapters[0][0]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        conv.bias.zero_()
    t_map = torch.full((1, 2, 4, 4), 2.0)
    s_map = t_map.clone()
    s_map[:, :, :3, :3] += 1.0
    teacher = constant_taps("retinanet", [[2.0, 2.0]], [BOX], [[1]])
    student = constant_taps("retinanet", [[2.0, 2.0]], [BOX], [[1]])
    teacher.features, student.features = [t_map], [s_map.requires_grad_(True)]
    out = d(teacher, student, student.targets)
    assert math.isclose(out["loss_local_feat"].item(), 1.0, rel_tol=1e-6)
    out["loss_local_feat"].backward()
    assert conv.weight.grad is not None and s_map.grad.abs().sum() > 0


@pytest.mark.parametrize("feat_norm", ["level", "all"])
def test_local_feature_loss_normalisation_over_levels(feat_norm):
    """Two levels, identity adapters, student = teacher + 1 everywhere (d^2 = C = 2 per cell). Box (4, 4,
    20, 20) covers 9 cells of the stride-8 4x4 map and 1 cell of the stride-32 1x1 map. "level": each level
    divides by its own cells, 18 / 18 + 2 / 2 = 2; "all": (18 + 2) / (2 * 10) = 1."""
    d = build_distiller("global", {"use_global": False, "use_resp": False, "feat_norm": feat_norm},
                        [2, 2], [2, 2], "retinanet")
    for seq in d.adapters:
        with torch.no_grad():
            seq[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            seq[0].bias.zero_()
    teacher = constant_taps("retinanet", [[2.0, 2.0]], [BOX], [[1]])
    student = constant_taps("retinanet", [[2.0, 2.0]], [BOX], [[1]])
    t_maps = [torch.full((1, 2, 4, 4), 2.0), torch.full((1, 2, 1, 1), 2.0)]
    s_maps = [(m + 1.0).requires_grad_(True) for m in t_maps]
    for taps, maps in ((teacher, t_maps), (student, s_maps)):
        taps.features, taps.level_names, taps.strides = maps, ["0", "1"], [8, 32]
    out = d(teacher, student, student.targets)
    assert math.isclose(out["loss_local_feat"].item(), 2.0 if feat_norm == "level" else 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("sigma", ["paper", "one"])
def test_local_feature_loss_is_weighted_by_sigma(sigma):
    """``sigma: one`` (ablation) switches the weighting off: the same case then weighs 1."""
    d = make("global", lam=1.0, use_global=False, use_resp=False, sigma=sigma)
    d.set_extra_state(bank_state({(0, 1): (PT, PS)}))
    conv = d.adapters[0][0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(3.0)  # H(f^s) = 3 everywhere
    teacher = constant_taps("retinanet", [[2.0, 1.0]], [BOX], [[1]])
    student = constant_taps("retinanet", [[1.0, 1.0]], [BOX], [[1]])
    out = d(teacher, student, student.targets)
    # per covered cell ||(3, 3) - (2, 1)||^2 = 5; 9 cells; weight sigma -> sigma * 45 / 18
    weight = SIGMA if sigma == "paper" else 1.0
    assert math.isclose(out["loss_local_feat"].item(), weight * 5 / 2, rel_tol=1e-5)
    assert d.stats["sigma_mean"] == pytest.approx(weight)


def test_response_one_stage_hand_value():
    d = make("global", lam=1.0, use_global=False, use_feat=False, temperature=1.0)
    d.set_extra_state(bank_state({(0, 1): (PT, PS)}))
    teacher = constant_taps("retinanet", [[2.0, 1.0]], [BOX], [[1]])
    student = constant_taps("retinanet", [[1.0, 1.0]], [BOX], [[1]])
    zt = torch.zeros(1, 3, NUM_CLASSES + 1)
    zs = torch.zeros(1, 3, NUM_CLASSES + 1, requires_grad=True)
    with torch.no_grad():
        zt[0, 0, 1] = math.log(3.0)  # teacher p = 0.75 on class 1 of anchor 0; student p = 0.5
        zt[0, 2, 2] = 5.0  # anchor 2 is negative: never counted
    teacher.cls_logits, student.cls_logits = zt, zs
    student.matched_idxs = [torch.tensor([0, -1, -2])]
    out = d(teacher, student, student.targets)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # other classes: 0
    assert math.isclose(out["loss_local_resp"].item(), 5.0 * SIGMA * kl, rel_tol=1e-5)
    out["loss_local_resp"].backward()
    assert zs.grad[0, 1].abs().sum() == 0 and zs.grad[0, 0, 1] != 0


@pytest.mark.parametrize("resp_rois", ["all", "positive"])
def test_response_faster_rcnn_weights_positive_rois_by_sigma(resp_rois):
    d = make("global", arch="faster_rcnn", lam=1.0, use_global=False, use_feat=False, temperature=1.0,
             resp_rois=resp_rois)
    d.set_extra_state(bank_state({(0, 1): (PT, PS)}))
    teacher = constant_taps("faster_rcnn", [[2.0, 1.0]], [BOX], [[1]])
    student = constant_taps("faster_rcnn", [[1.0, 1.0]], [BOX], [[1]])
    teacher.class_logits = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    student.class_logits = torch.zeros(2, 4, requires_grad=True)
    student.rois = [torch.tensor([[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 8.0, 8.0]])]
    student.roi_labels = [torch.tensor([1, 0])]
    student.roi_matched_gt = [torch.tensor([0, 0])]
    out = d(teacher, student, student.targets)
    p = torch.tensor([3.0, 1.0, 1.0, 1.0]) / 6.0
    kl = float((p * (p / 0.25).log()).sum())  # the same KL for both RoIs
    expected = 5.0 * (SIGMA * kl + kl) / 2 if resp_rois == "all" else 5.0 * SIGMA * kl
    assert math.isclose(out["loss_local_resp"].item(), expected, rel_tol=1e-5)


def test_positive_proposals_use_the_students_rois_and_only_on_faster_rcnn():
    with pytest.raises(ConfigError, match="instances"):
        make("global", arch="retinanet", instances="positive_proposals")
    d = make("global", arch="faster_rcnn", lam=1.0, instances="positive_proposals", use_feat=False,
             use_resp=False)
    d.set_extra_state(bank_state({(0, 1): (PT, PS)}))
    teacher = constant_taps("faster_rcnn", [[2.0, 1.0]], [[]], [[]])  # no ground truth at all
    student = constant_taps("faster_rcnn", [[1.0, 1.0]], [[]], [[]])
    student.rois = [torch.tensor([[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 8.0, 8.0]])]
    student.roi_labels = [torch.tensor([1, 0])]
    out = d(teacher, student, student.targets)
    assert math.isclose(out["loss_global"].item(), SIGMA * SQ / 4, rel_tol=1e-5)


def test_no_instances_gives_graph_connected_zeros():
    d = make("global", use_resp=False)
    teacher = constant_taps("retinanet", [[2.0, 1.0]], [[]], [[]])
    student = constant_taps("retinanet", [[1.0, 1.0]], [[]], [[]], grad=True)
    out = d(teacher, student, student.targets)
    total = sum(out.values())
    assert total.item() == 0.0 and total.requires_grad
    total.backward()


def test_switches_and_requests():
    assert set(make("global", use_global=False, a_resp=0.0)(  # a zero weight also switches a term off
        constant_taps("retinanet", [[2.0, 1.0]], [BOX], [[1]]),
        constant_taps("retinanet", [[1.0, 1.0]], [BOX], [[1]]), [{"boxes": torch.tensor([BOX[0]]),
                                                                 "labels": torch.tensor([1])}])) == {"loss_local_feat"}
    assert make("global", arch="faster_rcnn").request().roi_outputs
    assert make("global", arch="fcos").request().dense_outputs
    assert not make("global", arch="fcos", use_resp=False).request().dense_outputs
    with pytest.raises(ConfigError, match=r"distill\.options\.k: must be >= 1, got 0"):
        make("global", k=0)
    with pytest.raises(ConfigError, match="temperature"):
        make("global", temperature=0.0)


# ----------------------------------------------------------------------------------------------------------
# Schedule and persistence


class ExplodingLoader:
    def __iter__(self):
        raise AssertionError("the loader must not be read")


def test_extra_state_round_trip_and_no_reselection_for_the_same_epoch():
    d = make("global", lam=1.0)
    d.set_extra_state(bank_state({(0, 1): (PT, PS), (0, 3): (PT[:1], PS[:1])}))
    d.refreshed_epoch = 4
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)
    buf.seek(0)
    e = make("global", lam=1.0)
    e.load_state_dict(torch.load(buf, weights_only=True))  # how detkd checkpoints are read
    assert e.refreshed_epoch == 4 and e.bank.refreshes == 1
    for c in (1, 3):
        a, b = d.bank.get(0, c), e.bank.get(0, c)
        assert torch.equal(a.teacher, b.teacher) and torch.equal(a.student, b.student)
        assert torch.equal(a.indices, b.indices)
    assert e.bank.get(0, 2) is None
    ctx = DistillContext(teacher=None, student=None, loader=ExplodingLoader(), device="cpu", epoch=4, epochs=10)
    e.on_epoch_start(ctx)  # already selected for epoch 4: nothing to do
    ctx.epoch = 5
    e.opts.refresh_every = 2
    e.on_epoch_start(ctx)  # 5 % 2 != 0 and prototypes exist: nothing to do
    ctx.epoch = 6
    with pytest.raises(AssertionError, match="must not be read"):
        e.on_epoch_start(ctx)


# ----------------------------------------------------------------------------------------------------------
# The "+prototypes" variants


def test_variants_without_prototypes_equal_their_baselines():
    """With an empty bank every sigma is 1: defeat_proto / kd_proto reduce to defeat / kd exactly."""
    g = torch.Generator().manual_seed(0)
    boxes = [[[4.0, 4.0, 20.0, 20.0], [10.0, 2.0, 30.0, 14.0]]]
    labels = [[1, 2]]
    for arch in ("faster_rcnn", "retinanet"):
        t = constant_taps(arch, [[0.0] * 4], boxes, labels)
        s = constant_taps(arch, [[0.0] * 4], boxes, labels)
        t.features = [torch.randn(1, 4, 4, 4, generator=g)]
        s.features = [torch.randn(1, 4, 4, 4, generator=g)]
        if arch == "faster_rcnn":
            s.rois = [torch.tensor([[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 8.0, 8.0], [9.0, 2.0, 30.0, 15.0]])]
            s.roi_labels = [torch.tensor([1, 0, 2])]
            s.roi_matched_gt = [torch.tensor([0, 0, 1])]
            t.class_logits, s.class_logits = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
        else:
            t.cls_logits, s.cls_logits = torch.randn(1, 6, 4, generator=g), torch.randn(1, 6, 4, generator=g)
            s.matched_idxs = [torch.tensor([0, -1, 1, -2, 0, -1])]
        for base, proto in (("defeat", "defeat_proto"), ("kd", "kd_proto")):
            torch.manual_seed(1)
            a = build_distiller(base, {}, [4], [4], arch)
            torch.manual_seed(1)
            b = build_distiller(proto, {}, [4], [4], arch)
            oa, ob = a(t, s, s.targets), b(t, s, s.targets)
            assert len(oa) == len(ob)
            for (ka, va), (kb, vb) in zip(sorted(oa.items()), sorted(ob.items())):
                assert torch.allclose(va, vb, rtol=1e-5), (arch, ka, kb)


def test_kd_proto_weights_the_positive_by_sigma():
    d = make("kd_proto", lam=1.0, temperature=1.0)
    d.set_extra_state(bank_state({(0, 1): (PT, PS)}))
    teacher = constant_taps("retinanet", [[2.0, 1.0]], [BOX], [[1]])
    student = constant_taps("retinanet", [[1.0, 1.0]], [BOX], [[1]])
    teacher.cls_logits = torch.zeros(1, 2, 4)
    teacher.cls_logits[0, 0, 1] = math.log(3.0)
    student.cls_logits = torch.zeros(1, 2, 4)
    student.matched_idxs = [torch.tensor([0, -1])]
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert math.isclose(float(d(teacher, student, student.targets)["kd_proto_cls"]), SIGMA * kl, rel_tol=1e-5)


def test_defeat_proto_foreground_weighted_by_sigma():
    d = make("defeat_proto", lam=1.0, adapter="identity")
    d.set_extra_state(bank_state({(0, 1): (PT, PS)}))
    teacher = constant_taps("retinanet", [[2.0, 1.0]], [BOX], [[1]])
    student = constant_taps("retinanet", [[1.0, 1.0]], [BOX], [[1]])
    out = d(teacher, student, student.targets)
    # every cell differs by (1, 0): fg = 3 * sigma * 9 * 1 / (2 * 9 * 2), bg = 12 * 7 * 1 / (2 * 7 * 2)
    assert math.isclose(out["defeat_proto_fg"].item(), 3 * SIGMA / 4, rel_tol=1e-5)
    assert math.isclose(out["defeat_proto_bg"].item(), 3.0, rel_tol=1e-5)


def test_rkd_proto_hand_value_and_gradient():
    d = make("rkd_proto", lam=1.0)
    d.set_extra_state(bank_state({(0, 1): (PT, PS)}))
    teacher = constant_taps("retinanet", [[2.0, 1.0]], [BOX], [[1]])
    student = constant_taps("retinanet", [[1.0, 1.0]], [BOX], [[1]], grad=True)
    out = d(teacher, student, student.targets)
    diff = (LAM_S - LAM_T).abs()
    expected = float((0.5 * diff**2).mean())  # |d| < 1: smooth-L1 = 0.5 d^2, mean over K, N = 1
    assert math.isclose(out["rkd_proto"].item(), expected, rel_tol=1e-5)
    out["rkd_proto"].backward()
    assert student.features[0].grad.abs().sum() > 0


@pytest.mark.parametrize("adapter,relu", [("conv1x1_relu", True), ("conv1x1", False), ("conv3x3", False)])
def test_adapter_choices(adapter, relu):
    """The paper's H ends in a ReLU, which cannot output the negative values of a signed teacher map: with a
    bias of -1 and zero weights, H(f^s) is 0 (ReLU) or -1 (linear) everywhere."""
    d = make("global", use_global=False, use_resp=False, adapter=adapter)
    conv = d.adapters[0][0]
    assert conv.kernel_size == ((3, 3) if adapter == "conv3x3" else (1, 1))
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-1.0)
    out = d.adapters[0](torch.ones(1, 2, 4, 4))
    assert torch.all(out == (0.0 if relu else -1.0))


def test_feat_region_imitation_uses_fgfis_mask():
    """feat_region imitation: Eq. 7 on FGFI's anchor-IoU locations (sigma 1 with an empty bank), identity
    adapter, student = teacher + 1 everywhere: every masked cell has d^2 = C = 2, so the loss is
    2 n / (2 n) = 1, and the student's gradient is non-zero exactly on FGFI's mask."""
    from detkd.distill.masks import imitation_mask_batch

    d = make("global", use_global=False, use_resp=False, adapter="conv1x1", feat_region="imitation")
    conv = d.adapters[0][0]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        conv.bias.zero_()
    teacher = constant_taps("retinanet", [[2.0, 2.0]], [BOX], [[1]], size=128)
    student = constant_taps("retinanet", [[2.0, 2.0]], [BOX], [[1]], size=128)
    s_map = torch.full((1, 2, 16, 16), 3.0, requires_grad=True)
    teacher.features, student.features = [torch.full((1, 2, 16, 16), 2.0)], [s_map]
    out = d(teacher, student, student.targets)
    assert math.isclose(out["loss_local_feat"].item(), 1.0, rel_tol=1e-6)
    out["loss_local_feat"].backward()
    mask = imitation_mask_batch(student)[0][0]
    assert 0 < mask.sum() < 256  # a real region, not the whole map
    assert torch.equal(s_map.grad[0, 0] != 0, mask > 0)


def test_feat_region_and_norm_belong_to_the_paper_loss():
    with pytest.raises(ConfigError, match="feat_region / feat_norm"):
        make("global", feat_loss="defeat", feat_region="imitation")
