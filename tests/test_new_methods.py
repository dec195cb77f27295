"""PKD, CWD and MGD (issue 14) and the ``detkd methods`` command.

The references below are written from the papers' formulas with explicit Python loops over images,
channels and positions, independently of the vectorised code under test.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from detkd.cli import main
from detkd.config import ConfigError
from detkd.distill import REGISTRY, build_distiller
from detkd.distill.cwd import channel_kl
from detkd.distill.describe import option_comments, registry
from detkd.distill.losses import standardize
from detkd.distill.mgd import keep_mask, mask_seed, mgd_loss
from detkd.distill.pkd import pkd_loss
from detkd.taps import Taps

NEW = ["pkd", "cwd", "mgd"]
SHAPES = [(4, 4), (2, 2)]


def make_taps(channels: int = 4, seed: int = 0, grad: bool = False, features: list[torch.Tensor] | None = None,
              arch: str = "retinanet") -> Taps:
    """A two-image batch, a two-level pyramid (4x4 and 2x2); ``grad`` makes the maps leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    if features is None:
        features = [torch.randn(2, channels, h, w, generator=g) for h, w in SHAPES]
    features = [f.clone().requires_grad_(grad) for f in features]
    return Taps(arch=arch, features=features, level_names=["0", "1"], strides=[16, 32],
                image_sizes=[(64, 64)] * 2, batch_shape=(64, 64), targets=[], num_classes=3)


def build(name: str, options: dict | None = None, teacher_channels: int = 4, student_channels: int = 4,
          levels: int = 2, arch: str = "retinanet"):
    return build_distiller(name, options or {}, [teacher_channels] * levels, [student_channels] * levels, arch)


# ----------------------------------------------------------------------------------------------------------
# Loop references from the papers


def ref_standardise(values: list[float], unbiased: bool, eps: float) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1 if unbiased and n > 1 else n)
    return [(v - mean) / math.sqrt(var + eps * eps) for v in values]


def ref_pkd(s: torch.Tensor, t: torch.Tensor, stats: str, eps: float = 1e-6) -> float:
    """1/2 mean (s_hat - t_hat)^2, each channel standardised per image (instance) or over the batch."""
    n, c, h, w = s.shape
    s_hat, t_hat = {}, {}
    for ch in range(c):
        groups = [[i] for i in range(n)] if stats == "instance" else [list(range(n))]
        for images in groups:
            keys = [(i, y, x) for i in images for y in range(h) for x in range(w)]
            for src, dst in ((s, s_hat), (t, t_hat)):
                z = ref_standardise([float(src[i, ch, y, x]) for i, y, x in keys], stats == "batch", eps)
                dst.update({(i, ch, y, x): v for (i, y, x), v in zip(keys, z)})
    return 0.5 * sum((s_hat[k] - t_hat[k]) ** 2 for k in s_hat) / len(s_hat)


def ref_cwd(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    """tau^2 / (N C) * sum_n sum_c KL(softmax_positions(T_nc / tau) || softmax_positions(S_nc / tau))."""
    n, c = s.shape[:2]
    total = 0.0
    for i in range(n):
        for ch in range(c):
            zs = [float(v) / tau for v in s[i, ch].flatten()]
            zt = [float(v) / tau for v in t[i, ch].flatten()]
            ps = [math.exp(z) / sum(math.exp(u) for u in zs) for z in zs]
            pt = [math.exp(z) / sum(math.exp(u) for u in zt) for z in zt]
            total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return total * tau**2 / (n * c)


def ref_conv3x3(x: list, weight: torch.Tensor, bias: torch.Tensor) -> list:
    """Zero-padded 3x3 convolution of x[c][y][x] (nested lists)."""
    weight, bias = weight.detach(), bias.detach()
    cout, cin = weight.shape[:2]
    h, w = len(x[0]), len(x[0][0])
    out = [[[float(bias[o]) for _ in range(w)] for _ in range(h)] for o in range(cout)]
    for o in range(cout):
        for y in range(h):
            for xx in range(w):
                for ci in range(cin):
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            if 0 <= y + dy < h and 0 <= xx + dx < w:
                                out[o][y][xx] += float(weight[o, ci, dy + 1, dx + 1]) * x[ci][y + dy][xx + dx]
    return out


# ----------------------------------------------------------------------------------------------------------
# PKD


def test_pkd_hand_value_is_one_minus_pearson():
    # channel 0: r = 0.8 (deviations -1.5 -.5 .5 1.5 vs -1.5 -.5 1.5 .5: covariance 4, variances 5);
    # channel 1: r = -1. Loss = mean over channels of (1 - r) = (0.2 + 2) / 2.
    t = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, 1.0]]]])
    s = torch.tensor([[[[1.0, 2.0], [4.0, 3.0]], [[1.0, 1.0], [0.0, 0.0]]]])
    torch.testing.assert_close(pkd_loss(s, t), torch.tensor(1.1), atol=1e-5, rtol=0)
    torch.testing.assert_close(pkd_loss(s, t), torch.tensor(ref_pkd(s, t, "instance")), atol=1e-6, rtol=0)
    d = build("pkd", levels=1)
    out = d(make_taps(features=[t]), make_taps(features=[s]), [])
    torch.testing.assert_close(out["pkd_feat"], torch.tensor(6.0 * 1.1), atol=1e-4, rtol=0)  # weight 6


@pytest.mark.parametrize("stats", ["instance", "batch"])
def test_pkd_matches_loop_reference(stats):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, 2, 3, generator=g) * 5 + 2
    torch.testing.assert_close(pkd_loss(s, t, stats), torch.tensor(ref_pkd(s, t, stats)), atol=1e-5, rtol=1e-5)
    z = standardize(t, stats)
    dims = (2, 3) if stats == "instance" else (0, 2, 3)
    torch.testing.assert_close(z.mean(dims), torch.zeros_like(z.mean(dims)), atol=1e-5, rtol=0)
    # the two modes differ once images have different statistics
    assert not torch.isclose(pkd_loss(s, t, "instance"), pkd_loss(s, t, "batch"))


def test_pkd_is_scale_free():
    t, s = make_taps(seed=1), make_taps(seed=2)
    d = build("pkd")
    base = d(t, s, [])["pkd_feat"]
    scaled_t = make_taps(features=[100.0 * f - 3.0 for f in t.features])
    scaled_s = make_taps(features=[0.1 * f + 1.0 for f in s.features])  # (eps 1e-6 and float32 aside)
    torch.testing.assert_close(d(scaled_t, scaled_s, [])["pkd_feat"], base, atol=1e-4, rtol=1e-4)
    # a student equal to the teacher up to a positive scale per channel and image has zero loss
    same = make_taps(features=[f * torch.rand(2, 4, 1, 1) * 10 + 0.1 for f in t.features])
    assert d(t, same, [])["pkd_feat"] < 1e-4
    # a constant channel standardises to 0 (no NaN)
    flat = make_taps(features=[torch.ones(2, 4, h, w) for h, w in SHAPES])
    assert torch.isfinite(d(t, flat, [])["pkd_feat"])
    # ... so each level costs 1/2 mean(t_hat^2) = 1/2 (t_hat has unit population variance): weight 6 x 2 levels
    flat = make_taps(features=[torch.ones(2, 4, h, w) for h, w in SHAPES], grad=True)
    loss = d(t, flat, [])["pkd_feat"]
    torch.testing.assert_close(loss, torch.tensor(6.0), atol=1e-4, rtol=0)
    loss.backward()  # a finite gradient, not NaN (large: it scales as 1 / eps; see the module docstring)
    assert all(torch.isfinite(f.grad).all() for f in flat.features)


# ----------------------------------------------------------------------------------------------------------
# CWD


def test_cwd_hand_value():
    # channel 0: teacher uniform over 4 positions, student logits (ln 2, 0, 0, 0) -> p_s = (2, 1, 1, 1) / 5;
    # channel 1 equal in both: KL 0. tau = 1, N C = 2.
    t = torch.zeros(1, 2, 2, 2)
    s = torch.zeros(1, 2, 2, 2)
    s[0, 0, 0, 0] = math.log(2.0)
    kl = 0.25 * (math.log(0.25 / 0.4) + 3 * math.log(0.25 / 0.2))
    torch.testing.assert_close(channel_kl(s, t, 1.0), torch.tensor(kl / 2))
    d = build("cwd", levels=1)
    torch.testing.assert_close(d(make_taps(features=[t]), make_taps(features=[s]), [])["cwd_feat"],
                               torch.tensor(5.0 * kl / 2))  # weight 5


@pytest.mark.parametrize("tau", [1.0, 0.5, 4.0])
def test_cwd_matches_loop_reference(tau):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, 2, 3, generator=g)
    torch.testing.assert_close(channel_kl(s, t, tau), torch.tensor(ref_cwd(s, t, tau), dtype=torch.float32))
    # the softmax ignores a channel's offset; equal maps give 0
    assert channel_kl(s + 7.0, s, tau).abs() < 1e-5


# ----------------------------------------------------------------------------------------------------------
# MGD


def test_mgd_mask_follows_eq2_and_the_seed():
    g = torch.Generator().manual_seed(0)
    m = keep_mask(4, 100, 100, 0.65, g)
    assert m.shape == (4, 1, 100, 100) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(m.mean().item() - 0.35) < 0.01  # kept with probability 1 - lambda
    r = torch.rand((2, 1, 3, 3), generator=torch.Generator().manual_seed(5))
    expected = torch.tensor([[[[0.0 if float(v) < 0.4 else 1.0 for v in row] for row in img[0]]] for img in r])
    assert torch.equal(keep_mask(2, 3, 3, 0.4, torch.Generator().manual_seed(5)), expected)
    assert keep_mask(2, 3, 3, 0.0, torch.Generator().manual_seed(5)).eq(1).all()  # ratio 0: nothing masked
    assert len({mask_seed(s, c, r) for s in range(3) for c in range(50) for r in range(4)}) == 3 * 50 * 4


def test_mgd_matches_loop_reference():
    torch.manual_seed(0)
    d = build("mgd", {"mask_ratio": 0.5, "seed": 3}, teacher_channels=2, student_channels=2, levels=1)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 2, 2, 2, generator=g), torch.randn(1, 2, 2, 2, generator=g)
    out = d(make_taps(features=[t]), make_taps(features=[s]), [])["mgd_feat"]

    # the mask of call 0 on rank 0: R ~ U(0, 1) per position, masked where R < lambda (Eq. 2)
    r = torch.rand((1, 1, 2, 2), generator=torch.Generator().manual_seed(mask_seed(3, 0, 0)))
    masked = [[[float(s[0, c, y, x]) * (0.0 if float(r[0, 0, y, x]) < 0.5 else 1.0) for x in range(2)]
               for y in range(2)] for c in range(2)]
    gen = d.level_modules[0].generator
    hidden = [[[max(0.0, v) for v in row] for row in ch] for ch in ref_conv3x3(masked, gen[0].weight, gen[0].bias)]
    regen = ref_conv3x3(hidden, gen[2].weight, gen[2].bias)
    sse = sum((float(t[0, c, y, x]) - regen[c][y][x]) ** 2 for c in range(2) for y in range(2) for x in range(2))
    torch.testing.assert_close(out, torch.tensor(2e-5 * sse / 1), rtol=1e-5, atol=1e-12)  # alpha 2e-5, N 1
    assert int(d.calls) == 1

    gt = torch.tensor([[[[1.0, 2.0]]]])
    torch.testing.assert_close(mgd_loss(torch.zeros(2, 1, 1, 2), gt.expand(2, 1, 1, 2)), torch.tensor(5.0))


def test_mgd_masks_repeat_with_the_seed_and_leave_the_global_rng_alone():
    t, s = make_taps(seed=1), make_taps(seed=2)

    def run(seed):
        torch.manual_seed(0)  # same generator weights
        d = build("mgd", {"seed": seed})
        return [float(d(t, s, [])["mgd_feat"].detach()) for _ in range(3)]

    state = torch.get_rng_state()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    d = build("mgd")  # built before: only the forward must not draw from the global RNG
    torch.set_rng_state(before)
    d(t, s, [])
    assert torch.equal(torch.get_rng_state(), before)
    torch.set_rng_state(state)

    a, b, c = run(0), run(0), run(1)
    assert a == b  # same seed, same masks, same losses
    assert a != c
    assert len(set(a)) == 3  # a fresh mask at every call


# ----------------------------------------------------------------------------------------------------------
# All three: gradients, widths, levels, options


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("widths", [(4, 4), (6, 4)])
def test_gradients_reach_student_and_adapters_never_the_teacher(name, widths):
    tc, sc = widths
    d = build(name, teacher_channels=tc, student_channels=sc)
    teacher = make_taps(channels=tc, seed=1, grad=True)  # leaves that WOULD receive gradients
    student = make_taps(channels=sc, seed=2, grad=True)
    out = d(teacher, student, [])
    assert set(out) == {f"{name}_feat"}
    total = sum(out.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student.features)
    assert all(f.grad is None for f in teacher.features)
    params = list(d.parameters())
    if tc != sc or name == "mgd":  # adapters (widths differ) and MGD's generators have weights
        assert params
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    if tc == sc and name != "mgd":
        assert not params  # equal widths: compared directly, as the authors do


@pytest.mark.parametrize("name", NEW)
def test_default_levels_leave_out_faster_rcnn_pool(name):
    assert build(name, levels=5, arch="faster_rcnn").levels == [0, 1, 2, 3]
    assert build(name, levels=5, arch="retinanet").levels == [0, 1, 2, 3, 4]
    assert build(name, {"levels": [1]}, levels=5, arch="fcos").levels == [1]
    with pytest.raises(ConfigError, match=rf"{name}\.options\.levels"):
        build(name, {"levels": [5]}, levels=5)


def test_bad_options_name_the_option():
    for tau in (-1.0, 0.0):
        with pytest.raises(ConfigError, match=r"options\.tau: must be > 0"):
            build("cwd", {"tau": tau})
    with pytest.raises(ConfigError, match=r"options\.mask_ratio: must be in \[0, 1\), got 1\.0"):
        build("mgd", {"mask_ratio": 1.0})
    with pytest.raises(ConfigError, match=r"options\.mask_ratio: must be in \[0, 1\), got -0\.1"):
        build("mgd", {"mask_ratio": -0.1})
    with pytest.raises(ConfigError, match=r"options\.stats"):
        build("pkd", {"stats": "global"})
    with pytest.raises(ConfigError, match=r"options\.alpha"):
        build("mgd", {"alpha": -1.0})
    with pytest.raises(ConfigError, match="identity.*level 0"):
        build("pkd", {"adapter": "identity"}, teacher_channels=6, student_channels=4)
    # the trainer's "where" names the entry of distill.methods
    with pytest.raises(ConfigError, match=r"distill\.methods\[2\]\.options\.tau"):
        build_distiller("cwd", {"tau": -2.0}, [4], [4], "fcos", where="distill.methods[2]")


# ----------------------------------------------------------------------------------------------------------
# detkd methods


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    names = registry()
    assert set(NEW) <= set(names) and {"fitnet", "fgd", "global"} <= set(names)
    for name, cls in names.items():
        row = next((line for line in lines if line.split()[:1] == [name]), None)
        assert row is not None, name
        assert ", ".join(cls.archs) in row
    assert "Pearson" in out and "(Cao et al., NeurIPS 2022)" in out


def test_methods_name_prints_options_defaults_and_help(capsys):
    assert main(["methods", "pkd"]) == 0
    out = capsys.readouterr().out
    assert "weight: float = 6.0" in out
    assert "stats: one of instance, batch = 'instance'" in out
    flat = " ".join(out.split())  # help is wrapped
    assert "per channel over the whole batch (the authors' code)" in flat  # a comment continued on a 2nd line
    assert "levels: list[int] = []" in out
    assert main(["methods", "mgd"]) == 0
    out = capsys.readouterr().out
    assert "mask_ratio: float = 0.65" in out and "seed: int = 0" in out and "lambda_mgd" in out
    # the ranges declared on the options fields, in the words of the range check; none for an unbounded seed
    assert "mask_ratio: float = 0.65, must be in [0, 1)" in out and "\n  seed: int = 0\n" in out
    assert "alpha: float = 2e-05, must be >= 0" in out and "levels: list[int] = [], each must be >= 0" in out


def test_methods_reads_the_options_dataclasses_of_the_registry(capsys):
    """No drift: every option of every method's Options dataclass (what configs are validated against) is
    printed, with its default; the new methods' options all have help."""
    for name, cls in registry().items():
        assert cls is REGISTRY[name]
        assert main(["methods", name]) == 0
        out = capsys.readouterr().out
        for f in dataclasses.fields(cls.Options):
            assert f"\n  {f.name}: " in out, (name, f.name)
    for name in NEW:
        helps = option_comments(REGISTRY[name].Options)
        assert set(helps) == {f.name for f in dataclasses.fields(REGISTRY[name].Options)}, name


def test_option_comments_follow_inheritance_and_comment_blocks():
    helps = option_comments(REGISTRY["global"].Options)  # GlobalOptions(PrototypeOptions)
    assert helps["k"].startswith("prototypes per class")  # inherited field
    assert helps["min_box"] == "bank: drop boxes narrower / lower than this (px); authors: 30"  # not the block below
    assert helps["max_images_per_class"].startswith("bank: at most this many images per class")  # block above
    assert helps["a_feat"] == "alpha_2"


def test_methods_unknown_name_exits_2_and_names_it(capsys):
    assert main(["methods", "pkdd"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'pkdd'" in err and "pkd" in err and "fitnet" in err


# ----------------------------------------------------------------------------------------------------------
# A few steps through the real training loop (tiny Faster R-CNN pair of different FPN widths)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from detkd.models import build_detector
    from detkd.runtime.checkpoint import save_checkpoint
    from tests.engine_helpers import tiny_model

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "faster_rcnn.pt"
    save_checkpoint(path, {"model": build_detector(tiny_model("faster_rcnn", fpn=48)).state_dict()})
    return str(path)


@pytest.mark.parametrize("name", NEW)
def test_distill_runs_through_the_training_loop(name, data_root, teacher, tmp_path):
    from detkd.engine.logger import read_jsonl
    from detkd.engine.trainer import fit
    from detkd.runtime.checkpoint import load_checkpoint
    from tests.engine_helpers import tiny_config, with_distill

    cfg = with_distill(tiny_config(data_root, tmp_path / "run", arch="faster_rcnn", train_images=8), teacher,
                       [name])  # teacher FPN 48, student 32: adapters on
    cfg.data.batch_size = 2  # 4 steps
    metrics = fit(cfg, progress=False)
    assert "mAP" in metrics
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 4
    assert all(math.isfinite(r[f"{name}_feat"]) and r[f"{name}_feat"] > 0 for r in train)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert any(k.startswith("0.") for k in ckpt["distillers"])  # adapters / generators are saved
    if name == "mgd":
        assert int(ckpt["distillers"]["0.calls"]) == 4  # the mask sequence continues on resume


def test_mgd_resumed_run_equals_uninterrupted_run(data_root, teacher, tmp_path):
    """The mask sequence continues on resume (the ``calls`` buffer is checkpointed): 2 epochs straight and
    1 + 1 resumed end with the same student and generators."""
    import copy

    from detkd.engine.trainer import fit
    from detkd.runtime.checkpoint import load_checkpoint
    from tests.engine_helpers import tiny_config, with_distill

    straight = with_distill(tiny_config(data_root, tmp_path / "straight", arch="faster_rcnn", epochs=2,
                                        train_images=4, deterministic=True), teacher, ["mgd"])
    straight.train.eval_every = 2
    fit(straight, progress=False)
    half = copy.deepcopy(straight)
    half.output_dir = str(tmp_path / "halves")
    half.train.epochs = 1  # the multistep schedule here does not depend on the epoch count
    fit(half, progress=False)
    half.train.epochs = 2
    fit(half, resume=True, progress=False)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "halves" / "last.pt")
    for part in ("model", "distillers"):
        for k, v in a[part].items():
            torch.testing.assert_close(v, b[part][k], rtol=0, atol=1e-6, msg=f"{part}.{k}")
    assert int(a["distillers"]["0.calls"]) == int(b["distillers"]["0.calls"]) == 2


def test_pkd_one_by_one_level_gives_zero_loss_and_finite_gradient():
    """A 1x1 pyramid level (P7 of a 96 px image): per-image statistics have variance 0, so the standardised
    map is 0; the gradient must be 0, not NaN (sqrt's slope at 0 is infinite)."""
    from detkd.distill.pkd import pkd_loss

    s = torch.randn(2, 3, 1, 1, requires_grad=True)
    loss = pkd_loss(s, torch.randn(2, 3, 1, 1))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0
