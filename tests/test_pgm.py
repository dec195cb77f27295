"""Tests of the prototype generation module (Alg. 1, Eq. 2-5) and the Eq. 5 projection used by RDM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detkd.distill.global_kd.pgm import (
    PGMResult,
    coupled_coefficients,
    density_candidates,
    project,
    project_grouped,
    prototype_density,
    select_prototypes,
)

# ----------------------------------------------------------------------------------------------------------
# A direct, unoptimised float64 reading of Alg. 1 / Eq. 3-5: loop over candidates, build the residuals, solve
# the 2x2 system of Eq. 5 for every instance (minimum-norm solution via pinv), sum Eq. 4 over instances.
# ----------------------------------------------------------------------------------------------------------


def reference_pgm(ft, fs, k, lam, allow_repeats=True, candidates=None):
    ft = np.asarray(ft, dtype=np.float64)
    fs = np.asarray(fs, dtype=np.float64)
    n = ft.shape[0]
    cands = list(range(n)) if candidates is None else [int(c) for c in candidates]
    rt, rs = ft.copy(), fs.copy()
    penalty = 0.0  # lam * sum over the earlier picks of (a - b)^2, the last term of Eq. 4
    picks, costs = [], []
    steps = k if allow_repeats else min(k, len(cands))
    for _ in range(steps):
        best = None
        for c in cands:
            if not allow_repeats and c in picks:
                continue
            gt, gs = ft[c], fs[c]
            h = np.array([[gt @ gt + lam, -lam], [-lam, gs @ gs + lam]])
            a, b = np.linalg.pinv(h) @ np.stack([rt @ gt, rs @ gs])  # every instance at once, (N,) each
            new_rt = rt - a[:, None] * gt[None, :]
            new_rs = rs - b[:, None] * gs[None, :]
            total = penalty + np.sum(new_rt**2) + np.sum(new_rs**2) + lam * np.sum((a - b) ** 2)
            if best is None or total < best[0]:
                best = (total, c, a, b)
        total, c, a, b = best
        rt = rt - a[:, None] * ft[c][None, :]
        rs = rs - b[:, None] * fs[c][None, :]
        penalty += lam * np.sum((a - b) ** 2)
        picks.append(c)
        costs.append(total)
    return picks, np.array(costs)


def make_features(kind, n, dt, ds, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        ft, fs = torch.randn(n, dt, generator=g), torch.randn(n, ds, generator=g)
    else:  # clustered, with the student a noisy linear image of the teacher
        centers = torch.randn(4, dt, generator=g) * 3
        ft = centers[torch.randint(0, 4, (n,), generator=g)] + 0.5 * torch.randn(n, dt, generator=g)
        fs = ft @ torch.randn(dt, ds, generator=g) / dt**0.5 + 0.3 * torch.randn(n, ds, generator=g)
    return ft.double(), fs.double()


def scale_rows(ft, fs, norms, seed):
    g = torch.Generator().manual_seed(seed + 1)
    ft = torch.nn.functional.normalize(ft, dim=1)
    fs = torch.nn.functional.normalize(fs, dim=1)
    if norms == "unit":
        return ft, fs
    if norms == "small":
        return ft * 1e-3, fs * 2e-3
    if norms == "large":
        return ft * 1e3, fs * 5e2
    scale_t = torch.exp(2 * torch.randn(ft.shape[0], 1, generator=g, dtype=torch.float64))
    scale_s = torch.exp(2 * torch.randn(fs.shape[0], 1, generator=g, dtype=torch.float64))
    return ft * scale_t, fs * scale_s


def assert_matches_reference(ft, fs, k, lam, **kwargs):
    res = select_prototypes(ft, fs, k=k, lam=lam, dtype=torch.float64, **kwargs)
    cands = kwargs.get("candidates_for_reference")
    picks, costs = reference_pgm(ft, fs, k, lam, kwargs.get("allow_repeats", True), cands)
    assert res.indices.tolist() == picks
    cost0 = float((ft**2).sum() + (fs**2).sum())
    np.testing.assert_allclose(res.costs.numpy(), costs, rtol=1e-6, atol=1e-9 * cost0)
    return res


@pytest.mark.parametrize("n", [1, 2, 5, 37, 200])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_matches_direct_reference_sizes(n, kind):
    ft, fs = make_features(kind, n, 12, 7, seed=n)
    # Mixed norms: with two unit rows the two candidates tie exactly by symmetry (rounding would decide).
    ft, fs = scale_rows(ft, fs, "mixed", seed=n)
    assert_matches_reference(ft, fs, 10, lam=10.0)


@pytest.mark.parametrize("norms", ["unit", "small", "large", "mixed"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 10.0])
def test_matches_direct_reference_norms(norms, lam):
    ft, fs = make_features("clustered", 37, 9, 16, seed=3)
    ft, fs = scale_rows(ft, fs, norms, seed=3)
    res = assert_matches_reference(ft, fs, 10, lam)
    assert res.indices.dtype == torch.int64 and res.costs.dtype == torch.float64


def test_matches_reference_without_repeats_and_raw_features():
    ft, fs = make_features("random", 8, 5, 3, seed=11)  # raw (non-normalised) features, Dt != Ds
    res = assert_matches_reference(ft, fs, 10, 2.0, allow_repeats=False)
    assert len(res.indices) == 8
    assert sorted(res.indices.tolist()) == list(range(8))


def test_normalize_option_equals_normalising_first():
    ft, fs = make_features("clustered", 37, 12, 7, seed=5)
    ft, fs = scale_rows(ft, fs, "mixed", seed=5)
    res = select_prototypes(ft, fs, k=6, lam=10.0, normalize=True, dtype=torch.float64)
    picks, costs = reference_pgm(
        torch.nn.functional.normalize(ft, dim=1), torch.nn.functional.normalize(fs, dim=1), 6, 10.0
    )
    assert res.indices.tolist() == picks
    np.testing.assert_allclose(res.costs.numpy(), costs, rtol=1e-6)
    # Row chunks that do not divide N, and a candidate subset (scaled rows gathered by index).
    res = select_prototypes(ft, fs, k=6, lam=10.0, normalize=True, dtype=torch.float64, chunk_size=5,
                            max_candidates=20, allow_repeats=False)
    subset = torch.randperm(37, generator=torch.Generator().manual_seed(0))[:20].sort().values
    picks, costs = reference_pgm(
        torch.nn.functional.normalize(ft, dim=1), torch.nn.functional.normalize(fs, dim=1), 6, 10.0,
        allow_repeats=False, candidates=subset,
    )
    assert res.indices.tolist() == picks
    np.testing.assert_allclose(res.costs.numpy(), costs, rtol=1e-6)


def test_unit_norm_coefficients_equal_reduced_formula():
    g = torch.Generator().manual_seed(0)
    p_t, p_s = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    for lam in (0.0, 0.5, 10.0, 1e4):
        a, b = coupled_coefficients(p_t, p_s, 1.0, 1.0, lam)
        torch.testing.assert_close(a, (lam * (p_t + p_s) + p_t) / (1 + 2 * lam), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, (lam * (p_t + p_s) + p_s) / (1 + 2 * lam), rtol=1e-12, atol=1e-12)


def test_coefficients_solve_eq5_for_any_norms_and_guard_zero_norms():
    # Eq. 5 as written: w_t = (p_t + lam w_s) / (lam + n_t), w_s = (p_s + lam w_t) / (lam + n_s).
    p_t, p_s, n_t, n_s, lam = 0.7, -1.3, 4.0, 0.25, 3.0
    a, b = coupled_coefficients(torch.tensor(p_t, dtype=torch.float64), p_s, n_t, n_s, lam)
    assert a.dtype == torch.float64
    assert float(a) == pytest.approx((p_t + lam * float(b)) / (lam + n_t), rel=1e-12)
    assert float(b) == pytest.approx((p_s + lam * float(a)) / (lam + n_s), rel=1e-12)
    # Zero-norm prototype: with lam = 0 the spaces decouple; with lam > 0 both sides share the coefficient.
    a, b = coupled_coefficients(torch.tensor(0.0), torch.tensor(2.0), 0.0, 4.0, 0.0)
    assert (float(a), float(b)) == (0.0, 0.5)
    a, b = coupled_coefficients(torch.tensor(0.0), torch.tensor(2.0), 0.0, 4.0, 1.0)
    assert float(a) == pytest.approx(0.5) and float(b) == pytest.approx(0.5)
    a, b = coupled_coefficients(torch.tensor(0.0), torch.tensor(0.0), 0.0, 0.0, 1.0)
    assert (float(a), float(b)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        coupled_coefficients(1.0, 1.0, 1.0, 1.0, -1.0)


def test_costs_non_increasing_and_unique_without_repeats():
    ft, fs = make_features("clustered", 300, 16, 24, seed=7)
    for allow_repeats in (True, False):
        res = select_prototypes(ft, fs, k=20, lam=10.0, allow_repeats=allow_repeats)
        assert len(res.indices) == 20
        assert bool((res.costs[1:] <= res.costs[:-1] * (1 + 1e-6)).all())
        assert float(res.costs[0]) < float((ft**2).sum() + (fs**2).sum())
    assert len(set(res.indices.tolist())) == 20


def test_duplicate_rows_are_represented_exactly():
    g = torch.Generator().manual_seed(1)
    x_t, x_s = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(1, 4, generator=g) * 3
    ft, fs = x_t.repeat(2, 1), x_s.double().repeat(2, 1)
    res = select_prototypes(ft, fs, k=1, lam=10.0, dtype=torch.float64)
    # a = b = 1 for both copies whatever the norms: zero residual and zero coupling penalty.
    assert res.indices.tolist() == [0]
    assert abs(float(res.costs[0])) < 1e-12 * float((ft**2).sum() + (fs**2).sum())


def test_orthogonal_instances_reach_zero_cost_after_n_picks():
    ft = torch.diag(torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=torch.float64))
    fs = torch.cat([torch.diag(torch.tensor([1.0, 4.0, 0.2, 2.0], dtype=torch.float64)), torch.zeros(4, 2)], 1)
    res = select_prototypes(ft, fs, k=4, lam=10.0, allow_repeats=False, dtype=torch.float64)
    assert sorted(res.indices.tolist()) == [0, 1, 2, 3]
    assert abs(float(res.costs[-1])) < 1e-12


def test_ties_go_to_lowest_index():
    # Integer unit features and lam = 1.5 keep every quantity exact, so the ties are exact.
    ft = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    fs = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    res = select_prototypes(ft, fs.double(), k=4, lam=1.5, dtype=torch.float64)
    # 1, 2, 4 are copies (largest gain), then 0 and 3 are copies; afterwards everything is zero -> index 0.
    assert res.indices.tolist() == [1, 0, 0, 0]
    res = select_prototypes(ft, fs.double(), k=5, lam=1.5, allow_repeats=False, dtype=torch.float64)
    assert res.indices.tolist() == [1, 0, 2, 3, 4]
    assert res.costs.tolist()[1:] == [0.0] * 4
    for dtype in (torch.float32, torch.float64):  # reproducible
        first = select_prototypes(ft, fs, k=4, dtype=dtype).indices
        assert torch.equal(first, select_prototypes(ft, fs, k=4, dtype=dtype).indices)


def test_float32_picks_equal_float64_picks_on_clustered_data():
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(12, 64, generator=g)
        ft = centers[torch.arange(600) % 12] + 0.4 * torch.randn(600, 64, generator=g)
        fs = ft @ torch.randn(64, 48, generator=g) / 8 + 0.2 * torch.randn(600, 48, generator=g)
        r32 = select_prototypes(ft, fs, k=10, lam=10.0, normalize=True, dtype=torch.float32)
        r64 = select_prototypes(ft, fs, k=10, lam=10.0, normalize=True, dtype=torch.float64)
        assert r32.indices.tolist() == r64.indices.tolist()
        torch.testing.assert_close(r32.costs, r64.costs, rtol=1e-5, atol=0.0)


def test_edge_cases_no_nan():
    empty = select_prototypes(torch.zeros(0, 4), torch.zeros(0, 3), k=10)
    assert empty.indices.shape == (0,) and empty.costs.shape == (0,)
    assert empty.indices.dtype == torch.int64 and empty.costs.dtype == torch.float64
    assert select_prototypes(torch.randn(5, 4), torch.randn(5, 3), k=0).indices.numel() == 0

    one = select_prototypes(torch.randn(1, 4), torch.randn(1, 3), k=3)
    assert one.indices.tolist() == [0, 0, 0] and torch.isfinite(one.costs).all()
    one = select_prototypes(torch.randn(1, 4), torch.randn(1, 3), k=3, allow_repeats=False)
    assert one.indices.tolist() == [0]

    ft, fs = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    ft[2] = 0.0
    fs[2] = 0.0
    ft[4] = 0.0  # zero in one space only
    for lam in (0.0, 10.0):
        for normalize in (False, True):
            res = select_prototypes(ft, fs, k=8, lam=lam, normalize=normalize, dtype=torch.float64)
            assert torch.isfinite(res.costs).all()
        assert_matches_reference(ft, fs, 8, lam)
    zeros = select_prototypes(torch.zeros(3, 4), torch.zeros(3, 2), k=2, lam=0.0)
    assert zeros.indices.tolist() == [0, 0] and zeros.costs.tolist() == [0.0, 0.0]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="same number of rows"):
        select_prototypes(torch.randn(5, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match="feat_s must be 2-D"):
        select_prototypes(torch.randn(5, 4), torch.randn(5))
    with pytest.raises(ValueError, match="lam must be >= 0"):
        select_prototypes(torch.randn(5, 4), torch.randn(5, 4), lam=-1.0)
    with pytest.raises(ValueError, match="k must be"):
        select_prototypes(torch.randn(5, 4), torch.randn(5, 4), k=-1)
    with pytest.raises(ValueError, match="floating-point"):
        select_prototypes(torch.ones(5, 4, dtype=torch.long), torch.randn(5, 4))
    bad = torch.randn(5, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="feat_t contains NaN"):
        select_prototypes(bad, torch.randn(5, 4))


def test_result_is_not_differentiable_and_ignores_grad_mode():
    ft = torch.randn(10, 4, requires_grad=True)
    res = select_prototypes(ft, torch.randn(10, 3), k=3)
    assert isinstance(res, PGMResult) and not res.costs.requires_grad


# ----------------------------------------------------------------------------------------------------------
# Density pre-filter and candidate cap
# ----------------------------------------------------------------------------------------------------------


def reference_candidates(ft, fs, quantile, bandwidth):
    keep = np.ones(ft.shape[0], dtype=bool)
    for f in (np.asarray(ft, dtype=np.float64), np.asarray(fs, dtype=np.float64)):
        x = f / np.linalg.norm(f, axis=1, keepdims=True)
        density = np.exp(-(((1.0 - x @ x.T) / bandwidth) ** 2)).sum(axis=1)
        threshold = np.sort(density)[min(int(quantile * len(density)), len(density) - 1)]
        keep &= density > threshold
    return np.nonzero(keep)[0].tolist()


def test_prefilter_matches_direct_computation():
    ft, fs = make_features("clustered", 40, 8, 6, seed=2)
    ft, fs = scale_rows(ft, fs, "mixed", seed=2)
    for quantile, bandwidth in ((0.4, 0.1), (0.4, 0.5), (0.7, 0.3)):
        expected = reference_candidates(ft, fs, quantile, bandwidth)
        assert 0 < len(expected) < 40
        got = density_candidates(ft, fs, quantile, bandwidth, chunk_size=7)  # chunks that do not divide N
        assert got.tolist() == expected
        res = select_prototypes(
            ft, fs, k=5, lam=10.0, prefilter=True, prefilter_quantile=quantile,
            prefilter_bandwidth=bandwidth, dtype=torch.float64,
        )
        picks, costs = reference_pgm(ft, fs, 5, 10.0, candidates=expected)
        assert res.indices.tolist() == picks
        np.testing.assert_allclose(res.costs.numpy(), costs, rtol=1e-6)
    x = torch.nn.functional.normalize(ft, dim=1)
    direct = torch.exp(-(((1 - x @ x.T) / 0.1) ** 2)).sum(1)
    torch.testing.assert_close(prototype_density(ft, 0.1, chunk_size=3), direct)


def test_prefilter_without_survivors_falls_back_to_all_instances():
    # Orthogonal rows: all densities are equal, so none is strictly above the threshold.
    with pytest.warns(UserWarning, match="no instance"):
        cand = density_candidates(torch.eye(6), torch.eye(6), 0.4, 0.1)
    assert cand.tolist() == list(range(6))
    with pytest.warns(UserWarning, match="no instance"):
        res = select_prototypes(torch.eye(6), 2 * torch.eye(6), k=3, prefilter=True, allow_repeats=False)
    assert len(res.indices) == 3
    with pytest.warns(UserWarning, match="no instance"):  # N = 1: nothing is strictly above itself
        assert select_prototypes(torch.ones(1, 3), torch.ones(1, 2), k=1, prefilter=True).indices.tolist() == [0]


def test_max_candidates_is_a_deterministic_subset():
    ft, fs = make_features("clustered", 100, 8, 6, seed=4)
    res_a = select_prototypes(ft, fs, k=5, max_candidates=10, allow_repeats=False)
    res_b = select_prototypes(ft, fs, k=5, max_candidates=10, allow_repeats=False)
    assert torch.equal(res_a.indices, res_b.indices)
    subset = torch.randperm(100, generator=torch.Generator().manual_seed(0))[:10].sort().values
    assert set(res_a.indices.tolist()) <= set(subset.tolist())
    picks, _ = reference_pgm(ft, fs, 5, 10.0, allow_repeats=False, candidates=subset)
    assert res_a.indices.tolist() == picks
    res_c = select_prototypes(ft, fs, k=5, max_candidates=10, generator=torch.Generator().manual_seed(3))
    subset_c = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:10]
    assert set(res_c.indices.tolist()) <= set(subset_c.tolist())
    with pytest.raises(ValueError, match="max_candidates"):
        select_prototypes(ft, fs, max_candidates=0)


# ----------------------------------------------------------------------------------------------------------
# Projection (RDM coordinates, "exactly as in Eq. 5")
# ----------------------------------------------------------------------------------------------------------


def test_project_matches_hand_computation_for_two_prototypes():
    ft = torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.0, 0.0]], dtype=torch.float64)
    fs = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    pt = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    ps = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]], dtype=torch.float64)
    lam = 2.0
    lt, ls = project(ft, fs, pt, ps, lam)
    assert lt.shape == (3, 2) and ls.shape == (3, 2)
    for i in range(3):
        rt, rs = ft[i].clone(), fs[i].clone()
        for j in range(2):
            p_t, p_s = float(rt @ pt[j]), float(rs @ ps[j])
            n_t, n_s = float(pt[j] @ pt[j]), float(ps[j] @ ps[j])
            den = (n_t + lam) * (n_s + lam) - lam**2
            a = (p_t * (n_s + lam) + lam * p_s) / den
            b = (p_s * (n_t + lam) + lam * p_t) / den
            assert float(lt[i, j]) == pytest.approx(a, rel=1e-12, abs=1e-12)
            assert float(ls[i, j]) == pytest.approx(b, rel=1e-12, abs=1e-12)
            rt, rs = rt - a * pt[j], rs - b * ps[j]
    # Instance 0, prototype 0 by hand: p_t = 1, p_s = 0, n_t = n_s = 1, den = 3 * 3 - 4 = 5 -> a = 0.6, b = 0.4.
    assert float(lt[0, 0]) == pytest.approx(0.6) and float(ls[0, 0]) == pytest.approx(0.4)


def test_project_coordinates_match_selection_coefficients():
    # The coordinates of the chosen prototypes' own decomposition reproduce the cost of Eq. 4.
    ft, fs = make_features("clustered", 30, 6, 5, seed=9)
    res = select_prototypes(ft, fs, k=4, lam=3.0, dtype=torch.float64)
    idx = res.indices
    lt, ls = project(ft, fs, ft[idx], fs[idx], 3.0)
    rt, rs = ft - lt @ ft[idx], fs - ls @ fs[idx]
    cost = (rt**2).sum() + (rs**2).sum() + 3.0 * ((lt - ls) ** 2).sum()
    assert float(cost) == pytest.approx(float(res.costs[-1]), rel=1e-9)


def test_project_gradients_reach_student_features():
    g = torch.Generator().manual_seed(0)
    ft = torch.randn(7, 5, generator=g)
    fs = torch.randn(7, 4, generator=g, requires_grad=True)
    pt, ps = ft[:3].clone(), fs[:3].detach().clone()
    lt, ls = project(ft, fs, pt, ps, 10.0, normalize=True)
    ((ls - lt) ** 2).sum().backward()
    assert fs.grad is not None and torch.isfinite(fs.grad).all() and fs.grad.abs().sum() > 0
    # and it is the derivative of the projection: autograd against central differences, in float64
    ft64, pt64, ps64 = ft.double(), pt.double(), ps.double()

    def discrepancy(x: torch.Tensor) -> torch.Tensor:
        lt, ls = project(ft64, x, pt64, ps64, 10.0, normalize=True)
        return ((ls - lt) ** 2).sum()

    assert torch.autograd.gradcheck(discrepancy, (fs.detach().double().requires_grad_(True),))
    # Zero rows and zero prototypes keep gradients finite too.
    fs2 = torch.zeros(3, 4, requires_grad=True)
    lt, ls = project(torch.zeros(3, 5), fs2, torch.zeros(2, 5), torch.zeros(2, 4), 0.0, normalize=True)
    ls.sum().backward()
    assert torch.isfinite(fs2.grad).all() and torch.isfinite(ls).all()
    assert torch.equal(ls, torch.zeros(3, 2)) and torch.equal(lt, torch.zeros(3, 2))  # nothing to project


def test_project_bad_shapes():
    with pytest.raises(ValueError, match="prototype widths"):
        project(torch.randn(4, 5), torch.randn(4, 3), torch.randn(2, 6), torch.randn(2, 3), 1.0)
    with pytest.raises(ValueError, match="same number of rows"):
        project(torch.randn(4, 5), torch.randn(4, 3), torch.randn(2, 5), torch.randn(3, 3), 1.0)
    lt, ls = project(torch.randn(4, 5), torch.randn(4, 3), torch.zeros(0, 5), torch.zeros(0, 3), 1.0)
    assert lt.shape == (4, 0) and ls.shape == (4, 0)


def sequential_eq5(ft, fs, pt, ps, lam):
    """Eq. 5 one prototype after the other on explicit residuals (Eq. 3), in torch so that it differentiates."""
    rt, rs = ft, fs
    cols_t, cols_s = [], []
    for j in range(pt.shape[0]):
        p_t, p_s = rt @ pt[j], rs @ ps[j]
        n_t, n_s = pt[j] @ pt[j], ps[j] @ ps[j]
        den = n_t * n_s + lam * (n_t + n_s)
        if float(den.detach()) > 0:
            a = ((n_s + lam) * p_t + lam * p_s) / den
            b = ((n_t + lam) * p_s + lam * p_t) / den
        else:  # minimum-norm solution: decoupled, 0 for a zero prototype
            a = p_t / n_t if float(n_t.detach()) > 0 else torch.zeros_like(p_t)
            b = p_s / n_s if float(n_s.detach()) > 0 else torch.zeros_like(p_s)
        cols_t.append(a)
        cols_s.append(b)
        rt, rs = rt - a[:, None] * pt[j], rs - b[:, None] * ps[j]
    return torch.stack(cols_t, dim=1), torch.stack(cols_s, dim=1)


def random_prototypes(g, k, d_t, d_s):
    """Prototypes with norms spread over two orders of magnitude (float64)."""
    pt = torch.randn(k, d_t, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    ps = torch.randn(k, d_s, generator=g, dtype=torch.float64) * torch.rand(k, 1, generator=g, dtype=torch.float64) * 5
    return pt, ps


@pytest.mark.parametrize("lam", [0.0, 0.7, 10.0])
def test_project_triangular_solve_equals_sequential_loop_with_gradients(lam):
    g = torch.Generator().manual_seed(3)
    ft = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fs = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pt, ps = random_prototypes(g, 10, 5, 4)
    pt.requires_grad_()
    ps.requires_grad_()
    lt, ls = project(ft, fs, pt, ps, lam)
    rt, rs = sequential_eq5(ft, fs, pt, ps, lam)
    assert torch.allclose(lt, rt, rtol=1e-10, atol=1e-12) and torch.allclose(ls, rs, rtol=1e-10, atol=1e-12)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(((ls - lt) ** 2 * w).sum() + (lt * w).sum(), (ft, fs, pt, ps))
    want = torch.autograd.grad(((rs - rt) ** 2 * w).sum() + (rt * w).sum(), (ft, fs, pt, ps))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("lam,normalize", [(0.0, False), (2.5, False), (10.0, True)])
def test_project_grouped_equals_per_class_sequential_loop(lam, normalize):
    # Classes with K_c = 4, 2, 1 prototypes, padded with zero prototypes to K = 4 in the stacks.
    g = torch.Generator().manual_seed(11)
    counts = [4, 2, 1]
    protos = [random_prototypes(g, kc, 5, 3) for kc in counts]
    stack_t = torch.zeros(3, 4, 5, dtype=torch.float64)
    stack_s = torch.zeros(3, 4, 3, dtype=torch.float64)
    for c, (pt, ps) in enumerate(protos):
        stack_t[c, : counts[c]], stack_s[c, : counts[c]] = pt, ps
    groups = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0])
    ft = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fs = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lt, ls = project_grouped(ft, fs, groups, stack_t, stack_s, lam, normalize=normalize)
    assert lt.shape == (8, 4) and ls.shape == (8, 4)

    w = torch.randn(8, 4, generator=g, dtype=torch.float64)
    loss_ref = ft.new_zeros(())
    for c, (pt, ps) in enumerate(protos):
        rows = torch.nonzero(groups == c).squeeze(1)
        ft_c, fs_c = ft[rows], fs[rows]
        if normalize:
            ft_c, fs_c = torch.nn.functional.normalize(ft_c, dim=1), torch.nn.functional.normalize(fs_c, dim=1)
            pt, ps = torch.nn.functional.normalize(pt, dim=1), torch.nn.functional.normalize(ps, dim=1)
        rt, rs = sequential_eq5(ft_c, fs_c, pt, ps, lam)
        kc = counts[c]
        assert torch.allclose(lt[rows, :kc], rt, rtol=1e-10, atol=1e-12)
        assert torch.allclose(ls[rows, :kc], rs, rtol=1e-10, atol=1e-12)
        # the zero padding gives coordinates that are exactly 0
        assert (lt[rows, kc:] == 0).all() and (ls[rows, kc:] == 0).all()
        loss_ref = loss_ref + (((rs - rt) ** 2 + rs) * w[rows, :kc]).sum()
    loss = (((ls - lt) ** 2 + ls) * w).sum()
    got = torch.autograd.grad(loss, (ft, fs))
    want = torch.autograd.grad(loss_ref, (ft, fs))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


def test_project_grouped_one_class_equals_project_and_bad_input():
    g = torch.Generator().manual_seed(2)
    ft, fs = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    pt, ps = torch.randn(3, 4, generator=g), torch.randn(3, 3, generator=g)
    groups = torch.zeros(5, dtype=torch.int64)
    lt, ls = project_grouped(ft, fs, groups, pt[None], ps[None], 1.5)
    rt, rs = project(ft, fs, pt, ps, 1.5)
    assert torch.allclose(lt, rt, atol=1e-6) and torch.allclose(ls, rs, atol=1e-6)
    lt, ls = project_grouped(ft[:0], fs[:0], groups[:0], pt[None], ps[None], 1.5)
    assert lt.shape == (0, 3) and ls.shape == (0, 3)
    with pytest.raises(ValueError, match="groups must lie in"):
        project_grouped(ft, fs, groups + 1, pt[None], ps[None], 1.5)
    with pytest.raises(ValueError, match="one entry per instance"):
        project_grouped(ft, fs, groups[:3], pt[None], ps[None], 1.5)
    with pytest.raises(ValueError, match=r"\(C, K, D\) stacks"):
        project_grouped(ft, fs, groups, pt, ps, 1.5)
    with pytest.raises(ValueError, match="prototype widths"):
        project_grouped(ft, fs, groups, pt[None, :, :3], ps[None], 1.5)
