"""``detkd analyze relations``: Fig. 1 of "Distilling Object Detectors with Global Knowledge" (ECCV 2022).

**Fig. 1 (right): discrepancy of relations in TS-space** (``detkd analyze relations``). For one pyramid
level l and one class c, let (f_i^t, f_i^s), i = 1..N, be the teacher / student features of the class's
instances, extracted exactly as the global method's prototype bank does (ground-truth boxes of the
non-augmented training set, RoIAlign / crop mean on level l, the run's ``extraction``, ``min_box`` and
images-per-class cap: :meth:`detkd.distill.global_kd.pool.PrototypeBank.extract_pool`). Three kinds of K
basis pairs (g_k^t, g_k^s) are built from them, each a pair of vectors of the SAME basis in both spaces:

- ``prototypes``: the K instances chosen by PGM (Alg. 1, Eq. 2-5), with the run's ``lam`` and PGM options
  (:func:`detkd.distill.global_kd.prototypes.generate`, ``"pgm"``): g_k = (f_{i_k}^t, f_{i_k}^s);
- ``random``: K distinct instances drawn uniformly (seeded): g_k = (f_{i_k}^t, f_{i_k}^s);
- ``kmeans``: Lloyd's K-means (k-means++ seeding, :func:`detkd.distill.global_kd.prototypes.kmeans`) in the teacher
  space (``kmeans_space="student"``: the student's); centre k of the pair is the mean of the SAME cluster
  members in each space, g_k^t = mean_{i in C_k} f_i^t, g_k^s = mean_{i in C_k} f_i^s (in the clustering
  space that is the K-means centre itself).

"10 instances are selected for each class as the bases and others are used for measuring the
discrepancy" (Fig. 1 caption): the instances that are a basis of ``prototypes`` or ``random`` are left
out of the measurement, for all three kinds, so the three histograms count the same instances. For every
other instance i two relations are measured, each in both spaces:

- ``cosine`` (the paper's Fig. 1, Sec. 1: "we first measure the cosine similarity between the bases and
  each of the other instances in the TS-space, and then calculate the discrepancy by l_1 distance"):
  r_ik^t = cos(f_i^t, g_k^t), r_ik^s = cos(f_i^s, g_k^s), and

      d_i = sum_{k=1..K} | r_ik^s - r_ik^t |                                   (l_1 over the K bases)

- ``projection`` (the global knowledge of Sec. 3.2, the relation our ``global`` distiller trains on):
  Lambda_i^t, Lambda_i^s = P_{G_t, G_s}(f_i^t, f_i^s), the sequential coupled coefficients of Eq. 5 over
  the K bases (:func:`detkd.distill.global_kd.pgm.project`, the run's ``lam`` and ``normalize``), and

      d_i = || Lambda_i^s - Lambda_i^t ||_2                                     (Eq. 8: sigma_i = 1 - d_i)

  (Eq. 6 averages d_i^2 / 2K over instances with the weights sigma_i.)

The per-instance d_i of every (level, class) are pooled into one histogram per basis kind and relation.
Written to ``OUT``: ``relations.png`` (one panel per relation, the three kinds overlaid),
``relations.json`` (count / mean / median / std / 90th percentile per relation and kind, also per level;
the definition; skipped (level, class) pairs with too few instances) and ``relations.pt`` (the raw d_i
with their levels and classes; loads with ``weights_only=True``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.config import Config, ConfigError, to_dict
from detkd.distill import build_distiller
from detkd.distill.base import DistillContext
from detkd.distill.global_kd.pgm import project
from detkd.distill.global_kd.prototypes import generate, kmeans
from detkd.engine.assemble import feature_loader, load_student, load_teacher, prototype_method, resolve_device
from detkd.models import paired_channels, pyramid_levels
from detkd.runtime.console import info
from detkd.runtime.files import atomic_write_text

KINDS = ("prototypes", "random", "kmeans")
RELATIONS = ("cosine", "projection")
KIND_COLORS = {"prototypes": "#d62728", "random": "#7f7f7f", "kmeans": "#1f77b4"}
DISTANCE_LABELS = {
    "cosine": r"$\sum_k |\cos(f^s, g^s_k) - \cos(f^t, g^t_k)|$  (Fig. 1: cosine relations, $l_1$)",
    "projection": r"$\|\Lambda^s - \Lambda^t\|_2$  (Eq. 5 projections, Eq. 8)",
}

# ----------------------------------------------------------------------------------------------------------
# Fig. 1: bases, relations, discrepancy


@dataclass
class Bases:
    """K basis pairs: row k of ``teacher`` and of ``student`` are the same basis in the two spaces.
    ``instances``: the indices of the instances used as bases (empty for K-means centres)."""

    teacher: Tensor  # (K, Dt)
    student: Tensor  # (K, Ds)
    instances: Tensor  # (K',) int64


def kmeans_bases(feat_t: Tensor, feat_s: Tensor, k: int, *, seed: int = 0, space: str = "teacher") -> Bases:
    """K-means (:func:`detkd.distill.global_kd.prototypes.kmeans`) in one space; centre k = the mean of cluster k's
    members in EACH space (so the pair describes the same group of instances in both)."""
    if space not in ("teacher", "student"):
        raise ValueError(f"kmeans space: {space!r} is not 'teacher' or 'student'")
    _, assign = kmeans(feat_t if space == "teacher" else feat_s, k, seed=seed)
    clusters = [j for j in range(k) if bool((assign == j).any())]
    t = torch.stack([feat_t[assign == j].float().mean(0) for j in clusters])
    s = torch.stack([feat_s[assign == j].float().mean(0) for j in clusters])
    return Bases(t, s, torch.zeros(0, dtype=torch.int64))


def choose_bases(
    feat_t: Tensor,
    feat_s: Tensor,
    k: int,
    *,
    lam: float = 10.0,
    seed: int = 0,
    kmeans_space: str = "teacher",
    pgm_opts: dict[str, Any] | None = None,
) -> dict[str, Bases]:
    """The three kinds of K bases of Fig. 1 for the N paired instances ``feat_t`` (N, Dt), ``feat_s`` (N, Ds):
    ``prototypes`` (PGM, ``lam`` and ``pgm_opts``), ``random`` (``seed``) and ``kmeans`` (in ``kmeans_space``,
    ``seed``). See the module docstring. Needs N >= K."""
    n = feat_t.shape[0]
    if k < 1 or n < k:
        raise ValueError(f"choose_bases: need 1 <= k <= N instances, got k={k}, N={n}")
    out = {}
    for kind, method in (("prototypes", "pgm"), ("random", "random")):
        opts = dict(pgm_opts or {}) if method == "pgm" else {}
        idx = generate(feat_t, feat_s, k, method, lam=lam, seed=seed, **opts)
        out[kind] = Bases(feat_t[idx].float(), feat_s[idx].float(), idx)
    out["kmeans"] = kmeans_bases(feat_t, feat_s, k, seed=seed, space=kmeans_space)
    return out


def relations(
    feat_t: Tensor, feat_s: Tensor, bases: Bases, relation: str = "cosine", *, lam: float = 10.0,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """(R^t, R^s), each (N, K): the relation of every instance to the K bases in the teacher and in the student
    space. ``cosine``: R_ik = cos(f_i, g_k) (a zero vector has cosine 0). ``projection``: the Eq. 5
    coordinates Lambda^t, Lambda^s (:func:`detkd.distill.global_kd.pgm.project` with ``lam``, ``normalize``)."""
    ft, fs = feat_t.float(), feat_s.float()
    if relation == "cosine":
        return (F.normalize(ft, dim=1) @ F.normalize(bases.teacher, dim=1).T,
                F.normalize(fs, dim=1) @ F.normalize(bases.student, dim=1).T)
    if relation == "projection":
        return project(ft, fs, bases.teacher, bases.student, lam, normalize=normalize)
    raise ValueError(f"relation: {relation!r} is not one of {', '.join(RELATIONS)}")


def discrepancy(rel_t: Tensor, rel_s: Tensor, relation: str = "cosine") -> Tensor:
    """(N,) per-instance discrepancy of the relations: the l_1 distance of the rows for ``cosine`` (Fig. 1),
    the l_2 distance for ``projection`` (Eq. 8's ||Lambda^s - Lambda^t||_2)."""
    diff = rel_s - rel_t
    if relation == "cosine":
        return diff.abs().sum(dim=1)
    if relation == "projection":
        return diff.norm(dim=1)
    raise ValueError(f"relation: {relation!r} is not one of {', '.join(RELATIONS)}")


def relation_discrepancy(
    feat_t: Tensor,
    feat_s: Tensor,
    bases: dict[str, Bases],
    relation: str = "cosine",
    *,
    lam: float = 10.0,
    normalize: bool = False,
    exclude: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per basis kind, the (M,) discrepancies d_i of the instances not in ``exclude`` (indices; None = the
    instances any of ``bases`` uses), in instance order. The module docstring defines d_i."""
    n = feat_t.shape[0]
    if feat_s.shape[0] != n:
        raise ValueError(f"relation_discrepancy: {n} teacher features but {feat_s.shape[0]} student features")
    if exclude is None:
        exclude = torch.cat([b.instances for b in bases.values()]) if bases else torch.zeros(0, dtype=torch.int64)
    keep = torch.ones(n, dtype=torch.bool)
    keep[exclude.long().cpu()] = False
    ft, fs = feat_t[keep], feat_s[keep]
    out = {}
    for kind, b in bases.items():
        rt, rs = relations(ft, fs, b, relation, lam=lam, normalize=normalize)
        out[kind] = discrepancy(rt, rs, relation).detach().cpu()
    return out


@dataclass
class RelationResult:
    """Discrepancies pooled over (level, class): ``values[relation][kind]`` (M,), with each measured
    instance's ``levels`` (M,) and ``classes`` (M,) (the same M instances for every relation and kind);
    ``skipped``: (level, class, N) pairs with too few instances to leave one out of 2K bases."""

    values: dict[str, dict[str, Tensor]]
    levels: Tensor
    classes: Tensor
    skipped: list[tuple[int, int, int]]


def pool_discrepancies(
    feats_t: Sequence[Tensor],
    feats_s: Sequence[Tensor],
    labels: Tensor,
    k: int,
    *,
    lam: float = 10.0,
    normalize: bool = False,
    seed: int = 0,
    kmeans_space: str = "teacher",
    pgm_opts: dict[str, Any] | None = None,
    relation_names: Sequence[str] = RELATIONS,
) -> RelationResult:
    """:func:`relation_discrepancy` of every (level, class): ``feats_t[l]`` (N, Dt), ``feats_s[l]`` (N, Ds)
    are the level-l features of N instances with classes ``labels`` (N,). Bases per (level, class) from
    :func:`choose_bases` (seed ``seed + 1009 * level + class``, like the prototype bank); the instances that
    are a ``prototypes`` or ``random`` basis are left out for all kinds. A (level, class) whose N leaves no
    instance to measure (N <= K, or every instance a basis) is skipped."""
    labels = labels.cpu()
    values: dict[str, dict[str, list[Tensor]]] = {r: {kind: [] for kind in KINDS} for r in relation_names}
    levels, classes, skipped = [], [], []
    for lv, (ft_all, fs_all) in enumerate(zip(feats_t, feats_s)):
        for c in sorted(int(x) for x in labels.unique().tolist()):
            idx = torch.nonzero(labels == c).squeeze(1)
            ft, fs = ft_all[idx].float(), fs_all[idx].float()
            n = idx.numel()
            if n <= k:
                skipped.append((lv, c, n))
                continue
            bases = choose_bases(ft, fs, k, lam=lam, seed=seed + 1009 * lv + c, kmeans_space=kmeans_space,
                                 pgm_opts=pgm_opts)
            used = torch.cat([bases["prototypes"].instances, bases["random"].instances]).unique()
            m = n - used.numel()
            if m == 0:
                skipped.append((lv, c, n))
                continue
            for r in relation_names:
                d = relation_discrepancy(ft, fs, bases, r, lam=lam, normalize=normalize, exclude=used)
                for kind in KINDS:
                    values[r][kind].append(d[kind])
            levels.append(torch.full((m,), lv, dtype=torch.int64))
            classes.append(torch.full((m,), c, dtype=torch.int64))
    empty = torch.zeros(0)
    return RelationResult(
        {r: {kind: torch.cat(v) if v else empty for kind, v in per.items()} for r, per in values.items()},
        torch.cat(levels) if levels else empty.long(),
        torch.cat(classes) if classes else empty.long(),
        skipped,
    )


def describe(values: Tensor) -> dict[str, float | int | None]:
    """count, mean, median, std and 90th percentile of a 1-D tensor (None when empty)."""
    v = values.double()
    if v.numel() == 0:
        return {"count": 0, "mean": None, "median": None, "std": None, "p90": None}
    return {"count": int(v.numel()), "mean": float(v.mean()), "median": float(v.median()),
            "std": float(v.std()) if v.numel() > 1 else 0.0, "p90": float(torch.quantile(v, 0.9))}


def summarize(result: RelationResult, level_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Statistics of :func:`describe` per relation and kind, over all levels and per level."""
    overall = {r: {kind: describe(v) for kind, v in per.items()} for r, per in result.values.items()}
    per_level: dict[str, Any] = {}
    for lv in sorted(int(x) for x in result.levels.unique().tolist()):
        name = level_names[lv] if level_names is not None else str(lv)
        mask = result.levels == lv
        per_level[name] = {r: {kind: describe(v[mask]) for kind, v in per.items()}
                           for r, per in result.values.items()}
    return {"overall": overall, "per_level": per_level}


def plot_relation_histograms(result: RelationResult, path: str | Path, title: str = "", bins: int = 40) -> Path:
    """PNG with one panel per relation: the discrepancy histograms of the three kinds overlaid (shared bins up
    to the 99.5th percentile of all values; larger values go to the last bin), means in the legend."""
    # matplotlib only when a plot is drawn (slow to import), its file backend chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use
    rels = list(result.values)
    fig, axes = plt.subplots(1, len(rels), figsize=(6.0 * len(rels), 4.2), squeeze=False)
    for ax, r in zip(axes[0], rels):
        per = result.values[r]
        every = torch.cat([v for v in per.values()]).double()
        if every.numel() == 0:
            ax.text(0.5, 0.5, "no instance to measure", ha="center", va="center", transform=ax.transAxes)
        else:
            top = float(torch.quantile(every, 0.995)) if every.numel() > 1 else float(every.max())
            edges = np.linspace(0.0, max(top, 1e-6), bins + 1)
            for kind, v in per.items():
                x = np.clip(v.double().numpy(), 0.0, edges[-1])
                label = f"{kind} (mean {float(v.double().mean()):.3g}, median {float(v.double().median()):.3g})"
                color = KIND_COLORS.get(kind)
                ax.hist(x, bins=edges, color=color, alpha=0.3, histtype="stepfilled")
                ax.hist(x, bins=edges, color=color, histtype="step", linewidth=1.5, label=label)
            ax.legend(fontsize=8)
        ax.set_xlabel(DISTANCE_LABELS.get(r, r), fontsize=9)
        ax.set_ylabel("instances")
        ax.set_title(f"{r} relations: discrepancy between teacher and student space", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _check_arguments(cfg: Config, k: int | None, images: int | None, kmeans_space: str) -> None:
    if cfg.distill is None:
        raise ConfigError("the config has no distill section: `detkd analyze relations` needs a distillation "
                          "config naming the teacher (distill.teacher / teacher_checkpoint)")
    if k is not None and k < 1:
        raise ConfigError(f"--k: must be >= 1, got {k}")
    if images is not None and images < 0:
        raise ConfigError(f"--images: must be >= 0 (0 = every image), got {images}")
    if kmeans_space not in ("teacher", "student"):
        raise ConfigError(f"--kmeans-space: {kmeans_space!r} is not 'teacher' or 'student'")


def analyze_relations(
    cfg: Config,
    checkpoint: str,
    out: str | Path,
    *,
    k: int | None = None,
    images: int | None = None,
    seed: int = 0,
    kmeans_space: str = "teacher",
) -> dict[str, Any]:
    """``detkd analyze relations``: Fig. 1 (right) for the teacher of ``cfg.distill`` and the student weights
    in ``checkpoint``; writes ``relations.png``, ``relations.json`` and ``relations.pt`` to ``out`` and returns
    the JSON summary. ``k`` (bases per class; default the run's prototype ``k``) and ``images`` (images per
    class in the instance pool; default the run's ``max_images_per_class``) override the run's options; the
    other options (``lam``, ``normalize``, PGM options, extraction, ``min_box``) are the run's prototype
    method's (:func:`detkd.engine.assemble.prototype_method`)."""
    t0 = time.perf_counter()
    _check_arguments(cfg, k, images, kmeans_space)
    name, options = prototype_method(cfg)
    options = {**options, "generator": "pgm"}  # the bank's PGM options (gen_opts) are the prototypes kind's
    if k is not None:
        options["k"] = k
    if images is not None:
        options["max_images_per_class"] = images
    info(f"relations: method {name!r} options {options}; loading teacher and student")
    teacher = load_teacher(cfg)
    student = load_student(cfg, checkpoint)
    device = resolve_device(cfg.train.device)
    pairs, t_ch, s_ch = paired_channels(teacher, student, "distill")
    distiller = build_distiller(name, options, t_ch, s_ch, cfg.model.arch,
                                where="distill.methods (prototype method)")
    opts, bank = distiller.opts, distiller.bank
    teacher.to(device)
    student.to(device)
    ctx = DistillContext(teacher=teacher, student=student, loader=feature_loader(cfg), device=device, epoch=0,
                         epochs=cfg.train.epochs, pairs=pairs)
    pool = bank.extract_pool(ctx)
    t_extract = time.perf_counter() - t0
    info(f"relations: {pool.keys.shape[0]} instances, {pool.labels.unique().numel()} classes; measuring")
    result = pool_discrepancies(pool.ft, pool.fs, pool.labels, opts.k, lam=opts.lam, normalize=opts.normalize,
                                seed=opts.seed, kmeans_space=kmeans_space, pgm_opts=bank.gen_opts)
    level_names = pyramid_levels(student)
    if pairs is not None:  # the bank's levels are the paired ones
        level_names = [level_names[j] for _, j in pairs]
    out = Path(out)
    title = (f"{cfg.model.arch}: teacher {Path(cfg.distill.teacher_checkpoint).name}, student "
             f"{Path(checkpoint).name}; K={opts.k}, lambda={opts.lam:g}, all levels")
    plot_relation_histograms(result, out / "relations.png", title)
    torch.save({"values": result.values, "levels": result.levels, "classes": result.classes,
                "level_names": list(level_names), "k": opts.k}, out / "relations.pt")
    summary = {
        "version": 1,
        "definition": {
            "bases": "per (level, class): prototypes = PGM picks (Alg. 1, Eq. 2-5); random = K random instances; "
                     f"kmeans = K-means in the {kmeans_space} space, centre pair = mean of the same members in "
                     "each space. Instances used as prototypes or random bases are not measured.",
            "cosine": "d_i = sum_k |cos(f_i^s, g_k^s) - cos(f_i^t, g_k^t)| (Fig. 1: cosine relations, l1 distance)",
            "projection": "d_i = ||Lambda_i^s - Lambda_i^t||_2 with Lambda the Eq. 5 projections (Eq. 6, 8)",
        },
        "method": name, "options": options, "k": opts.k, "lam": opts.lam, "normalize": bool(opts.normalize),
        "pgm_options": bank.gen_opts, "kmeans_space": kmeans_space, "seed": opts.seed,
        "images_per_class": opts.max_images_per_class, "checkpoint": str(checkpoint),
        "teacher_checkpoint": cfg.distill.teacher_checkpoint, "num_instances": int(pool.keys.shape[0]),
        "levels": list(level_names),
        **summarize(result, level_names),
        "skipped": [{"level": level_names[lv], "class": c, "instances": n} for lv, c, n in result.skipped],
        "time": {"extract_s": round(t_extract, 3), "total_s": round(time.perf_counter() - t0, 3)},
        "config": to_dict(cfg),
    }
    atomic_write_text(out / "relations.json", json.dumps(summary, indent=2))
    for r, per in summary["overall"].items():
        stats = ", ".join(f"{kind} {s['mean']:.4g}" if s["mean"] is not None else f"{kind} -"
                          for kind, s in per.items())
        info(f"relations: {r}: mean discrepancy {stats}")
    info(f"relations: done in {summary['time']['total_s']:.1f} s -> {out}")
    return summary
