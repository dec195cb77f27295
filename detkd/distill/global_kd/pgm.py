"""Prototype generation module (PGM) of "Distilling Object Detectors with Global Knowledge" (ECCV 2022,
https://arxiv.org/abs/2210.09022).

Alg. 1 picks K instances ("prototypes") that serve as common basis vectors in both feature spaces. It is
greedy matching pursuit on the objective of Eq. 2: the residuals start as the features (Eq. 3); at each
step, every candidate k is tried as the next prototype (g^t, g^s) = (f_k^t, f_k^s), each instance i gets
the coupled coefficients (a_i, b_i) that minimise

    ||r_i^t - a g^t||^2 + ||r_i^s - b g^s||^2 + lam (a - b)^2                                 (Eq. 4-5)

and the candidate with the smallest total objective (Eq. 4, summed over ALL N instances) is appended;
the residuals then lose a_i g^t and b_i g^s (Eq. 3).

Closed form of Eq. 5. Setting both derivatives to zero gives the 2x2 system
[[n_t + lam, -lam], [-lam, n_s + lam]] (a, b) = (p_t, p_s) with p = <r_i, g>, n = ||g||^2, hence

    den = (n_t + lam)(n_s + lam) - lam^2 = n_t n_s + lam (n_t + n_s)
    a = ((n_s + lam) p_t + lam p_s) / den,   b = ((n_t + lam) p_s + lam p_t) / den.

For unit-norm features this is the authors' a = (lam (p_t + p_s) + p_t) / (1 + 2 lam). When den = 0 (lam = 0
and a zero-norm prototype, or a prototype that is zero in both spaces) we use the minimum-norm solution:
a = p_t / n_t (0 when n_t = 0), b likewise. At the optimum the per-instance objective drops by exactly
a p_t + b p_s, so, with c1 = (n_s + lam)/den, c2 = lam/den, d1 = (n_t + lam)/den, candidate k lowers the
total objective by

    gain[k] = c1[k] S_tt[k] + d1[k] S_ss[k] + 2 c2[k] S_ts[k],
    S_tt[k] = sum_i P_t[i, k]^2,  S_ss[k] = sum_i P_s[i, k]^2,  S_ts[k] = sum_i P_t[i, k] P_s[i, k],

with P_t[i, k] = <r_i^t, f_k^t>. Picking argmin of Eq. 4 = argmax of gain. No (candidates x D x N) tensor
and no N x N matrix is needed, because every sum collapses onto D x D Gram matrices:

- initially R = F, so S_tt[k] = f_k^T (F_t^T F_t) f_k and S_ts[k] = f_k^t^T (F_t^T F_s) f_k^s: three
  D x D Gram matrices, O(N D^2) once, evaluated for the candidates in chunks;
- picking k* with coefficients a, b (N,) is a rank-one change of the residuals, P_t <- P_t - a h_t^T with
  h_t = F_t f_{k*}^t, so S_tt <- S_tt - 2 h_t (P_t^T a) + h_t^2 (a.a) and likewise S_ss, S_ts (with the
  cross products P_t^T b, P_s^T a). P^T a is F (F^T a) minus a correction from the earlier picks, and
  F^T a itself comes from the Gram matrices (F_t^T h_t = G_tt g_t, F_t^T h_s = G_ts g_s), so each pick
  reads each feature matrix once: F [g, F^T a, F^T b], O(N D) per pick.

Total O(N D^2 + K N D) time, O(N K + D^2) memory beyond the features (the L2 normalisation is applied as
row scales inside the products and row chunks, never as a normalised copy). The residuals themselves are
never stored: <r_i, g> = <f_i, g> - sum_l w_l[i] <g_l, g> from the stored coefficients and h vectors.
The running sums S, the coefficients and the costs are kept in float64 whatever ``dtype`` the O(N D)
products use, so float32 only rounds the matrix products (about 1e-7 relative); exact recomputation is
never needed.

The RDM coordinates (Eq. 6, 8: "calculated exactly the same as in Eq. 5") are :func:`project` (one
triangular solve for the K sequential steps) and :func:`project_grouped` (many classes in one call).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PGMResult",
    "select_prototypes",
    "coupled_coefficients",
    "project",
    "project_grouped",
    "prototype_density",
    "density_candidates",
]

# Temporaries of the chunked loops hold about this many elements (16 MiB in float32).
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class PGMResult:
    """Output of :func:`select_prototypes`.

    indices: (K',) int64, chosen instance indices in pick order.
    costs:   (K',) float64, the total objective of Eq. 4 (residual energies of all N instances in both
             spaces plus lam times the summed squared coefficient gaps of all picks so far) after each
             pick. Non-increasing.
    """

    indices: Tensor
    costs: Tensor


def _check_pair(feat_t: Tensor, feat_s: Tensor, where: str, names: tuple[str, str] = ("feat_t", "feat_s")) -> None:
    for name, x in zip(names, (feat_t, feat_s)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D (instances, channels), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    if feat_t.shape[0] != feat_s.shape[0]:
        raise ValueError(
            f"{where}: {names[0]} and {names[1]} must have the same number of rows, "
            f"got {feat_t.shape[0]} and {feat_s.shape[0]}"
        )
    if feat_t.device != feat_s.device:
        raise ValueError(f"{where}: {names[0]} is on {feat_t.device} but {names[1]} is on {feat_s.device}")


def _check_lam(lam: float, where: str) -> None:
    if not lam >= 0:  # also rejects NaN
        raise ValueError(f"{where}: lam must be >= 0, got {lam}")


def _coefficient_factors(n_t: Tensor, n_s: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """(c1, c2, d1) such that a = c1 p_t + c2 p_s and b = c2 p_t + d1 p_s solve Eq. 5 (any norms).

    den is expanded as n_t n_s + lam (n_t + n_s), which equals (n_t + lam)(n_s + lam) - lam^2 without the
    cancellation for large lam. den = 0 means lam = 0 with a zero norm, or both norms zero; the minimum-norm
    solution then decouples to a = p_t / n_t, b = p_s / n_s (0 for a zero norm; p is 0 there too).
    The guards keep gradients finite (no 0/0 in either branch of torch.where).
    """
    den = n_t * n_s + lam * (n_t + n_s)
    ok = den > 0
    safe_den = torch.where(ok, den, torch.ones_like(den))
    inv_t = torch.where(n_t > 0, 1.0 / torch.where(n_t > 0, n_t, torch.ones_like(n_t)), torch.zeros_like(n_t))
    inv_s = torch.where(n_s > 0, 1.0 / torch.where(n_s > 0, n_s, torch.ones_like(n_s)), torch.zeros_like(n_s))
    c1 = torch.where(ok, (n_s + lam) / safe_den, inv_t)
    c2 = torch.where(ok, lam / safe_den, torch.zeros_like(den))
    d1 = torch.where(ok, (n_t + lam) / safe_den, inv_s)
    return c1, c2, d1


def coupled_coefficients(
    p_t: Tensor | float, p_s: Tensor | float, n_t: Tensor | float, n_s: Tensor | float, lam: float
) -> tuple[Tensor, Tensor]:
    """Closed-form solution of Eq. 5 for prototypes of any norm (broadcasting over all arguments).

    Minimises ||r^t - a g^t||^2 + ||r^s - b g^s||^2 + lam (a - b)^2 given p_t = <r^t, g^t>,
    p_s = <r^s, g^s>, n_t = ||g^t||^2, n_s = ||g^s||^2:

        den = (n_t + lam)(n_s + lam) - lam^2
        a = ((n_s + lam) p_t + lam p_s) / den,   b = ((n_t + lam) p_s + lam p_t) / den

    Unit norms give the authors' a = (lam (p_t + p_s) + p_t) / (1 + 2 lam). If den = 0 (lam = 0 with a
    zero-norm prototype, or a prototype that is zero in both spaces) the minimum-norm solution is returned:
    a = p_t / n_t, or 0 when n_t = 0 (b likewise). Differentiable in all tensor arguments.
    """
    _check_lam(lam, "coupled_coefficients")
    ref = next((x for x in (p_t, p_s, n_t, n_s) if isinstance(x, Tensor)), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    p_t, p_s, n_t, n_s = (torch.as_tensor(x, dtype=dtype, device=device) for x in (p_t, p_s, n_t, n_s))
    if bool((n_t < 0).any()) or bool((n_s < 0).any()):
        raise ValueError("coupled_coefficients: n_t and n_s are squared norms and must be >= 0")
    c1, c2, d1 = _coefficient_factors(n_t, n_s, lam)
    return c1 * p_t + c2 * p_s, c2 * p_t + d1 * p_s


def _eq5_factors(q_t: Tensor, q_s: Tensor, lam: float) -> Tensor:
    """Eq. 5 factors (c1, c2, d1) of each prototype from the Gram matrices (..., K, K): (..., K, 3)."""
    return torch.stack(_coefficient_factors(q_t.diagonal(dim1=-2, dim2=-1), q_s.diagonal(dim1=-2, dim2=-1), lam), -1)


def _eq5_system(q_t: Tensor, q_s: Tensor, fac: Tensor) -> Tensor:
    """Unit lower-triangular (..., 2K, 2K) matrix of the K sequential Eq. 5 steps (see :func:`project`).

    q_t, q_s: (..., K, K) prototype Gram matrices <g_l, g_j>; fac (..., K, 3) from :func:`_eq5_factors`.
    Row 2j is a_j's equation and row 2j+1 b_j's: a_j + sum_{l<j} (c1_j Qt[l, j] a_l + c2_j Qs[l, j] b_l) =
    c1_j <f^t, g_j^t> + c2_j <f^s, g_j^s>, and b_j likewise with (c2_j, d1_j).
    """
    k = q_t.shape[-1]
    c1, c2, d1 = fac[..., 0, None], fac[..., 1, None], fac[..., 2, None]
    lt, ls = q_t.transpose(-1, -2).tril(-1), q_s.transpose(-1, -2).tril(-1)  # [j, l] = Q[l, j] for l < j
    row_a = torch.stack([c1 * lt, c2 * ls], dim=-1)  # (..., K, K, 2)
    row_b = torch.stack([c2 * lt, d1 * ls], dim=-1)
    blocks = torch.stack([row_a, row_b], dim=-3)  # (..., K, 2, K, 2)
    eye = torch.eye(2 * k, dtype=q_t.dtype, device=q_t.device)
    return blocks.reshape(*q_t.shape[:-2], 2 * k, 2 * k) + eye


def _eq5_rhs(m_t: Tensor, m_s: Tensor, fac: Tensor) -> Tensor:
    """Right-hand side (..., 2K) of :func:`_eq5_system` from m = <f_i, g_j> (..., K) and the factors."""
    c1, c2, d1 = fac.unbind(-1)
    return torch.stack([c1 * m_t + c2 * m_s, c2 * m_t + d1 * m_s], dim=-1).flatten(-2)


def _check_projection_args(
    feat_t: Tensor, feat_s: Tensor, proto_t: Tensor, proto_s: Tensor, lam: float, where: str
) -> None:
    _check_lam(lam, where)
    _check_pair(feat_t, feat_s, where)
    if proto_t.shape[-1] != feat_t.shape[1] or proto_s.shape[-1] != feat_s.shape[1]:
        raise ValueError(
            f"{where}: prototype widths {proto_t.shape[-1]}, {proto_s.shape[-1]} do not match feature widths "
            f"{feat_t.shape[1]}, {feat_s.shape[1]} (teacher, student)"
        )
    if proto_t.device != feat_t.device or proto_s.device != feat_t.device:
        raise ValueError(f"{where}: prototypes are on {proto_t.device} but features on {feat_t.device}")


def project(
    feat_t: Tensor, feat_s: Tensor, proto_t: Tensor, proto_s: Tensor, lam: float, *, normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """Coordinates Lambda^t, Lambda^s (N, K) of instances w.r.t. K prototypes, "exactly as in Eq. 5" (RDM).

    The prototypes are taken in order, like the picks of Alg. 1: coordinate j is the coupled coefficient
    pair of Eq. 5 for prototype j and the residual left by prototypes 0..j-1, after which a_j g_j^t and
    b_j g_j^s are subtracted (Eq. 3). The residuals are not materialised: <r_i, g_j> = <f_i, g_j> -
    sum_{l<j} a_l[i] <g_l, g_j>, so with (c1_j, c2_j, d1_j) the Eq. 5 factors of prototype j

        a_j = c1_j (<f^t, g_j^t> - sum_{l<j} a_l <g_l^t, g_j^t>) + c2_j (<f^s, g_j^s> - sum_{l<j} b_l <g_l^s, g_j^s>)

    and b_j likewise with (c2_j, d1_j). These K sequential steps are a forward substitution: the unknowns
    (a_0, b_0, a_1, b_1, ...) of every instance solve one unit lower-triangular (2K x 2K) system, the same
    for all instances (it depends on the prototypes only), so all steps are one ``solve_triangular`` with N
    right-hand sides. Cost O(N K D + N K^2 + K^3).

    feat_t (N, Dt), feat_s (N, Ds), proto_t (K, Dt), proto_s (K, Ds). Differentiable w.r.t. all four
    (detach the prototypes and the teacher side in the caller when they must not be trained).
    ``normalize=True`` L2-normalises features and prototypes first (zero rows stay zero), as the authors
    do before selection.
    """
    _check_pair(proto_t, proto_s, "project", names=("proto_t", "proto_s"))
    _check_projection_args(feat_t, feat_s, proto_t, proto_s, lam, "project")
    if normalize:
        feat_t, feat_s = F.normalize(feat_t, dim=1), F.normalize(feat_s, dim=1)
        proto_t, proto_s = F.normalize(proto_t, dim=1), F.normalize(proto_s, dim=1)
    n, k = feat_t.shape[0], proto_t.shape[0]
    if k == 0:
        empty = feat_t.new_zeros(n, 0)
        return empty, empty.clone()
    q_t, q_s = proto_t @ proto_t.T, proto_s @ proto_s.T  # <g_l, g_j>, (K, K)
    fac = _eq5_factors(q_t, q_s, lam)
    rhs = _eq5_rhs(feat_t @ proto_t.T, feat_s @ proto_s.T, fac)  # (N, 2K)
    x = torch.linalg.solve_triangular(_eq5_system(q_t, q_s, fac), rhs.T, upper=False, unitriangular=True)
    x = x.T.reshape(n, k, 2)
    return x[..., 0], x[..., 1]


def project_grouped(
    feat_t: Tensor,
    feat_s: Tensor,
    groups: Tensor,
    proto_t: Tensor,
    proto_s: Tensor,
    lam: float,
    *,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`project` of instances of several classes in one call, each on its own class's prototypes.

    feat_t (N, Dt), feat_s (N, Ds); groups (N,) int64, the row of instance i in the prototype stacks
    proto_t (C, K, Dt), proto_s (C, K, Ds). A class with K_c < K prototypes is padded with zero rows after
    its K_c prototypes: a zero prototype has zero norms, so its Eq. 5 factors are 0 (the den = 0 branch
    of :func:`coupled_coefficients`), its coordinates come out exactly 0, and it has zero inner products
    with everything, so it changes no other coordinate. Returns Lambda^t, Lambda^s (N, K); columns K_c..K-1
    of a class-c row are 0, columns 0..K_c-1 equal ``project`` on the class's K_c prototypes. One batched
    triangular solve over the instances (each with its class's matrix). Differentiable like ``project``.
    """
    where = "project_grouped"
    _check_projection_args(feat_t, feat_s, proto_t, proto_s, lam, where)
    if proto_t.dim() != 3 or proto_s.dim() != 3 or proto_t.shape[:2] != proto_s.shape[:2]:
        raise ValueError(
            f"{where}: proto_t and proto_s must be (C, K, D) stacks with the same C and K, got shapes "
            f"{tuple(proto_t.shape)} and {tuple(proto_s.shape)}"
        )
    if groups.dim() != 1 or groups.shape[0] != feat_t.shape[0] or groups.dtype != torch.int64:
        raise ValueError(
            f"{where}: groups must be an int64 vector with one entry per instance ({feat_t.shape[0]}), "
            f"got {groups.dtype} of shape {tuple(groups.shape)}"
        )
    n, k = feat_t.shape[0], proto_t.shape[1]
    if n and (int(groups.min()) < 0 or int(groups.max()) >= proto_t.shape[0]):
        raise ValueError(f"{where}: groups must lie in [0, {proto_t.shape[0]}), got {groups.tolist()}")
    if normalize:
        feat_t, feat_s = F.normalize(feat_t, dim=1), F.normalize(feat_s, dim=1)
        proto_t, proto_s = F.normalize(proto_t, dim=2), F.normalize(proto_s, dim=2)
    if k == 0 or n == 0:
        empty = feat_t.new_zeros(n, k)
        return empty, empty.clone()
    q_t, q_s = proto_t @ proto_t.transpose(1, 2), proto_s @ proto_s.transpose(1, 2)  # (C, K, K)
    fac = _eq5_factors(q_t, q_s, lam)  # (C, K, 3)
    system = _eq5_system(q_t, q_s, fac)[groups]  # (N, 2K, 2K)
    m_t = (proto_t[groups] @ feat_t[:, :, None]).squeeze(2)  # <f_i, g_j> with i's class's prototypes, (N, K)
    m_s = (proto_s[groups] @ feat_s[:, :, None]).squeeze(2)
    rhs = _eq5_rhs(m_t, m_s, fac[groups])  # (N, 2K)
    x = torch.linalg.solve_triangular(system, rhs[:, :, None], upper=False, unitriangular=True)
    x = x.reshape(n, k, 2)
    return x[..., 0], x[..., 1]


def _inverse_norms(f: Tensor) -> Tensor:
    """1 / ||f_i|| per row, 0 for zero rows (like F.normalize, whose denominator is clamped to 1e-12)."""
    return 1.0 / torch.linalg.vector_norm(f, dim=1).clamp_min(1e-12)


def prototype_density(feat: Tensor, bandwidth: float = 0.1, *, chunk_size: int | None = None) -> Tensor:
    """The authors' density of each instance: density_i = sum_j exp(-((1 - cos_ij) / bandwidth)^2).

    j runs over all instances including i itself (cos_ii = 1 adds 1 to every non-zero row). Zero rows have
    cos = 0 with everything. The N x N cosine matrix is computed ``chunk_size`` rows at a time, so memory
    is O(N * chunk_size); time is O(N^2 D).
    """
    if feat.dim() != 2:
        raise ValueError(f"prototype_density: feat must be 2-D, got shape {tuple(feat.shape)}")
    if not bandwidth > 0:
        raise ValueError(f"prototype_density: bandwidth must be > 0, got {bandwidth}")
    x = feat.detach()
    inv_norm = _inverse_norms(x)  # cos_ij = <x_i, x_j> / (|x_i| |x_j|), without a normalised copy of x
    n = x.shape[0]
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // max(n, 1))
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        cos = (x[start : start + chunk] @ x.T) * inv_norm[start : start + chunk, None] * inv_norm[None, :]
        # exp(-((1 - cos) / bandwidth)^2), in place on the (chunk, N) block
        out[start : start + chunk] = cos.neg_().add_(1.0).div_(bandwidth).square_().neg_().exp_().sum(dim=1)
    return out


def density_candidates(
    feat_t: Tensor,
    feat_s: Tensor,
    quantile: float = 0.4,
    bandwidth: float = 0.1,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """The authors' candidate pre-filter: indices (ascending, int64) dense in BOTH spaces.

    An instance is a candidate when its :func:`prototype_density` is strictly above the threshold in the
    teacher space and in the student space. The threshold is the authors' order statistic
    ``sort(density)[int(quantile * N)]`` (clamped to the last element), not an interpolated quantile.

    When no instance survives (e.g. near-orthogonal features, where all densities are equal, or N = 1), the
    authors' code crashes; here all instances become candidates and a warning is issued.
    """
    _check_pair(feat_t, feat_s, "density_candidates")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"density_candidates: quantile must be in [0, 1], got {quantile}")
    n = feat_t.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=feat_t.device)
    pos = min(int(quantile * n), n - 1)
    keep = torch.ones(n, dtype=torch.bool, device=feat_t.device)
    for feat in (feat_t, feat_s):
        density = prototype_density(feat, bandwidth, chunk_size=chunk_size)
        threshold = torch.sort(density).values[pos]
        keep &= density > threshold
    idx = keep.nonzero().squeeze(1)
    if idx.numel() == 0:
        warnings.warn(
            f"PGM density pre-filter: no instance of {n} is above the {quantile} quantile in both spaces; "
            "using all instances as candidates",
            stacklevel=2,
        )
        idx = torch.arange(n, device=feat_t.device)
    return idx


@torch.no_grad()
def select_prototypes(
    feat_t: Tensor,
    feat_s: Tensor,
    k: int = 10,
    lam: float = 10.0,
    *,
    normalize: bool = False,
    allow_repeats: bool = True,
    prefilter: bool = False,
    prefilter_quantile: float = 0.4,
    prefilter_bandwidth: float = 0.1,
    max_candidates: int | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> PGMResult:
    """Greedy prototype selection of Alg. 1 (Eq. 2-5) in O(N D^2 + K N D) time; see the module docstring.

    Args:
        feat_t, feat_s: (N, Dt), (N, Ds) teacher / student features of the same N instances (Dt may differ
            from Ds). Any device; the work and the result follow it.
        k: number of picks (Alg. 1's K).
        lam: weight of the coefficient-consistency term of Eq. 2 (>= 0).
        normalize: L2-normalise the rows first (the authors' default). The default ``False`` is the paper's
            plain Eq. 5 on the features as given. Zero rows stay zero. Done by row scales inside the
            products, so no normalised copy of the features is made.
        allow_repeats: the authors' code may pick an instance again (its residual is generally not zero
            after its own pick because of the coupling). With ``True`` there are always ``k`` picks, even
            when N < k. With ``False`` picked candidates are excluded and there are min(k, #candidates).
        prefilter: restrict candidates to the authors' density pre-filter (:func:`density_candidates`,
            with ``prefilter_quantile`` and ``prefilter_bandwidth``). O(N^2 D) time, chunked memory. Falls
            back to all instances (with a warning) when no instance survives. The objective still covers
            all N instances; only the set of possible prototypes shrinks.
        max_candidates: cap on the number of candidates (after the pre-filter). When there are more, a
            uniformly random subset is kept, drawn with ``generator`` (a fresh generator seeded with 0 when
            None, so the result is deterministic), kept in ascending index order.
        dtype: dtype of the O(N D) / O(N D^2) products. Running sums and costs are float64 regardless.
            A dtype other than the features' own makes one converted copy of them.
        chunk_size: rows per chunk for the Gram matrices, the initial sums and the density (default:
            max(128, N / 16) rows, at most about 4M elements per temporary).

    Returns:
        :class:`PGMResult` with the picks (indices into the N rows) and the Eq. 4 objective after each
        pick. Exact ties are broken by the lowest index. N = 0 or k = 0 gives empty tensors. Callers gather
        the raw (un-normalised) features of the picks themselves, as the authors do.
    """
    where = "select_prototypes"
    _check_pair(feat_t, feat_s, where)
    _check_lam(lam, where)
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"{where}: k must be a non-negative int, got {k!r}")
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"{where}: max_candidates must be >= 1 or None, got {max_candidates}")
    if not dtype.is_floating_point:
        raise ValueError(f"{where}: dtype must be a floating-point dtype, got {dtype}")
    device = feat_t.device
    n = feat_t.shape[0]

    f_t = feat_t.detach().to(dtype).contiguous()
    f_s = feat_s.detach().to(dtype).contiguous()
    # Row scales stand for the normalisation: F' = diag(scale) F (the pre-filter's cosine ignores them).
    scale_t, scale_s = (_inverse_norms(f_t), _inverse_norms(f_s)) if normalize else (None, None)

    cand, n_cand = _candidates(f_t, f_s, prefilter, prefilter_quantile, prefilter_bandwidth, max_candidates,
                               generator, chunk_size)

    steps = k if allow_repeats else min(k, n_cand)
    if n == 0 or steps == 0:
        return PGMResult(
            torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.float64, device=device)
        )
    return _greedy(f_t, f_s, scale_t, scale_s, steps, lam, cand, allow_repeats, chunk_size)


def _candidates(f_t: Tensor, f_s: Tensor, prefilter: bool, quantile: float, bandwidth: float,
                max_candidates: int | None, generator: torch.Generator | None,
                chunk_size: int | None) -> tuple[Tensor | None, int]:
    """The rows PGM may pick (None: all N, which avoids gathering a copy of the features) and their number:
    the density pre-filter, then a random subset of at most ``max_candidates``."""
    n = f_t.shape[0]
    cand: Tensor | None = None
    if prefilter and n > 0:
        cand = density_candidates(
            f_t, f_s, quantile, bandwidth, chunk_size=chunk_size
        )
        if cand.numel() == n:
            cand = None
    n_cand = n if cand is None else cand.numel()
    if max_candidates is not None and n_cand > max_candidates:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        keep = torch.randperm(n_cand, generator=gen, device=gen.device)[:max_candidates]
        keep = keep.sort().values.to(f_t.device)
        cand = keep if cand is None else cand[keep]
        n_cand = max_candidates
    return cand, n_cand


def _rows(f: Tensor, scale: Tensor | None, rows: slice | Tensor) -> Tensor:
    """Rows of diag(scale) F (a scaled copy of just these rows)."""
    return f[rows] if scale is None else f[rows] * scale[rows][:, None]


def _times_columns(f: Tensor, scale: Tensor | None, vecs: list[Tensor]) -> Tensor:
    """diag(scale) F @ [v_1, v_2, ...] as float64 (N, len(vecs)), reading the N x D matrix F once.

    F.linear (weight rows = the vectors) is used because it is several times faster on CPU than
    ``f @ cols`` for such skinny products (MKL, torch 2.x).
    """
    out = F.linear(f, torch.stack([v.to(f.dtype) for v in vecs], dim=0)).to(torch.float64)
    return out if scale is None else out * scale.to(torch.float64)[:, None]


def _greedy(
    f_t: Tensor,
    f_s: Tensor,
    scale_t: Tensor | None,
    scale_s: Tensor | None,
    steps: int,
    lam: float,
    cand: Tensor | None,
    allow_repeats: bool,
    chunk_size: int | None,
) -> PGMResult:
    """The greedy loop of Alg. 1 on the Gram / rank-one form (module docstring).

    The features are diag(scale_t) f_t and diag(scale_s) f_s (scale None = 1); f_* are already in dtype.

    Why one function: the loop's state (running sums, costs, the picked rows and their projections) is updated
    in place at every pick, the order of those updates is the algorithm; pieces would pass all of it back and
    forth.
    """
    f64 = torch.float64
    device = f_t.device
    n, d_t, d_s = f_t.shape[0], f_t.shape[1], f_s.shape[1]
    n_cand = n if cand is None else cand.numel()
    chunk = chunk_size or min(max(1, _CHUNK_ELEMENTS // max(d_t, d_s, 1)), max(128, n // 16))

    # Gram matrices of the initial residuals R = F (D x D), accumulated over row chunks so that the scaled
    # rows never exist all at once. A NaN / inf anywhere in F shows up here.
    g_tt = f_t.new_zeros(d_t, d_t)
    g_ss = f_t.new_zeros(d_s, d_s)
    g_ts = f_t.new_zeros(d_t, d_s)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        ct, cs = _rows(f_t, scale_t, rows), _rows(f_s, scale_s, rows)
        g_tt.addmm_(ct.T, ct)
        g_ss.addmm_(cs.T, cs)
        g_ts.addmm_(ct.T, cs)
    for name, g in (("feat_t", g_tt), ("feat_s", g_ss)):
        if not bool(torch.isfinite(g).all()):
            raise ValueError(
                f"select_prototypes: {name} contains NaN/inf (or its Gram matrix overflows in {f_t.dtype})"
            )

    # Initial column sums S and squared norms of the candidates, a chunk of candidates at a time.
    s_tt = torch.empty(n_cand, dtype=f64, device=device)
    s_ss, s_ts, nt_c, ns_c = (torch.empty_like(s_tt) for _ in range(4))
    for start in range(0, n_cand, chunk):
        rows = slice(start, start + chunk) if cand is None else cand[start : start + chunk]
        ct, cs = _rows(f_t, scale_t, rows), _rows(f_s, scale_s, rows)
        out = slice(start, start + ct.shape[0])
        s_tt[out] = (ct @ g_tt).mul_(ct).sum(dim=1)
        s_ss[out] = (cs @ g_ss).mul_(cs).sum(dim=1)
        s_ts[out] = (ct @ g_ts).mul_(cs).sum(dim=1)
        nt_c[out] = (ct * ct).sum(dim=1)
        ns_c[out] = (cs * cs).sum(dim=1)
    c1, c2, d1 = _coefficient_factors(nt_c, ns_c, lam)

    # History of the picks, one row per pick (float64): coefficients a (teacher) and b (student) of every
    # instance, h = F g (every instance's inner product with the pick), and F^T a, F^T b in both spaces.
    hist_a, hist_b = (torch.zeros(steps, n, dtype=f64, device=device) for _ in range(2))
    hist_ht, hist_hs = (torch.zeros(steps, n, dtype=f64, device=device) for _ in range(2))
    hist_ta, hist_tb = (torch.zeros(steps, d_t, dtype=f64, device=device) for _ in range(2))
    hist_sa, hist_sb = (torch.zeros(steps, d_s, dtype=f64, device=device) for _ in range(2))
    picked = torch.zeros(n_cand, dtype=torch.bool, device=device)
    indices = torch.empty(steps, dtype=torch.long, device=device)
    costs = torch.empty(steps, dtype=f64, device=device)
    cost = g_tt.diagonal().to(f64).sum() + g_ss.diagonal().to(f64).sum()  # Eq. 4 before any pick

    for step in range(steps):
        # Argmin of Eq. 4 over candidates = argmax of the decrease; argmax returns the first maximum.
        gain = c1 * s_tt + d1 * s_ss + 2.0 * c2 * s_ts
        if not allow_repeats:
            gain = gain.masked_fill(picked, float("-inf"))
        j = int(torch.argmax(gain))
        picked[j] = True
        kk = j if cand is None else int(cand[j])
        indices[step] = kk
        g_t, g_s = _rows(f_t, scale_t, slice(kk, kk + 1))[0], _rows(f_s, scale_s, slice(kk, kk + 1))[0]
        ht_k, hs_k = hist_ht[:step, kk], hist_hs[:step, kk]  # <g_l, g> of the earlier picks l

        # F^T p for both spaces from the Gram matrices, without a pass over the N rows:
        # p_t = F_t g_t - sum_l a_l <g_l, g_t>, so F_t^T p_t = G_tt g_t - sum_l (F_t^T a_l) <g_l, g_t>, etc.
        q_tt = (g_tt @ g_t).to(f64) - hist_ta[:step].T @ ht_k  # F_t^T p_t
        q_ts = (g_ts @ g_s).to(f64) - hist_tb[:step].T @ hs_k  # F_t^T p_s
        q_st = (g_t @ g_ts).to(f64) - hist_sa[:step].T @ ht_k  # F_s^T p_t
        q_ss = (g_ss @ g_s).to(f64) - hist_sb[:step].T @ hs_k  # F_s^T p_s
        xa_t, xb_t = c1[j] * q_tt + c2[j] * q_ts, c2[j] * q_tt + d1[j] * q_ts  # F_t^T a, F_t^T b
        xa_s, xb_s = c1[j] * q_st + c2[j] * q_ss, c2[j] * q_st + d1[j] * q_ss  # F_s^T a, F_s^T b

        # The one O(N D) pass per space: F [g, F^T a, F^T b].
        last = step + 1 == steps
        y_t = _times_columns(f_t, scale_t, [g_t] if last else [g_t, xa_t, xb_t])
        y_s = _times_columns(f_s, scale_s, [g_s] if last else [g_s, xa_s, xb_s])
        h_t, h_s = y_t[:, 0], y_s[:, 0]

        # Inner products of every current residual with the pick: <r_i, g> = <f_i, g> - sum_l w_l[i] <g_l, g>.
        p_t = h_t - hist_a[:step].T @ ht_k
        p_s = h_s - hist_b[:step].T @ hs_k
        a = c1[j] * p_t + c2[j] * p_s  # Eq. 5, closed form
        b = c2[j] * p_t + d1[j] * p_s
        cost = cost - (a @ p_t + b @ p_s)  # the optimal per-instance objective drops by a p_t + b p_s
        costs[step] = cost

        if not last:
            # P^T a, P^T b for every row k: P_t[:, k] = F_t f_k - sum_l a_l h_l[k], so P_t^T a =
            # F_t (F_t^T a) - sum_l (a_l . a) h_l.
            ab = torch.stack([a, b], dim=1)
            pta_ptb = y_t[:, 1:] - hist_ht[:step].T @ (hist_a[:step] @ ab)  # (P_t^T a, P_t^T b)
            psa_psb = y_s[:, 1:] - hist_hs[:step].T @ (hist_b[:step] @ ab)  # (P_s^T a, P_s^T b)
            hc_t, hc_s = h_t, h_s
            if cand is not None:
                pta_ptb, psa_psb, hc_t, hc_s = pta_ptb[cand], psa_psb[cand], h_t[cand], h_s[cand]
            # Rank-one update of the residuals: P_t <- P_t - a h_t^T, P_s <- P_s - b h_s^T.
            s_tt += hc_t * (hc_t * (a @ a) - 2.0 * pta_ptb[:, 0])
            s_ss += hc_s * (hc_s * (b @ b) - 2.0 * psa_psb[:, 1])
            s_ts += hc_t * hc_s * (a @ b) - hc_s * pta_ptb[:, 1] - hc_t * psa_psb[:, 0]

        hist_a[step], hist_b[step], hist_ht[step], hist_hs[step] = a, b, h_t, h_s
        hist_ta[step], hist_tb[step], hist_sa[step], hist_sb[step] = xa_t, xb_t, xa_s, xb_s

    return PGMResult(indices, costs)
