"""The prototype pool of the global-knowledge method: which instances build it, extracting their features
(only the images needed, the teacher's once), gathering them across ranks, and the refresh.

Decisions this module makes (the paper leaves them open):

- **Which instances build the bank** (Alg. 2 line 4): the ground-truth boxes of the non-augmented
  training set, ignore (crowd / difficult) boxes excluded. ``min_box`` drops boxes narrower or lower
  than that many pixels of the resized image (authors: 30; default 0 keeps all). ``max_images_per_class``
  keeps at most that many images per class (authors: 800), the ones with the lowest seeded hash of (image
  id, class): the same images whatever the number of ranks or loader order (0 = all images).
- **Only the needed images are forwarded.** The instances are decided from the targets before any detector
  runs (:meth:`PrototypeBank._plan`): from the data set's annotations (``coco_gt()``, nothing decoded) when
  the loader is a DataLoader over a detkd data set and ``min_box`` is 0, otherwise from one pass over the
  loader's targets. Then only the images holding a kept instance go through the detectors (backbone + FPN,
  no heads): a loader over just those items, or the loader's batches sliced to them. The features of an
  image depend on its batch only through padding (images of different sizes); digits images are equal.
- **Teacher features** are computed once and cached (the teacher is fixed); the student's are recomputed
  at every refresh for exactly the cached instances (matched by (image id, box index)).
- **Distributed.** The cap's winners are found from every rank's candidates (:func:`select_images`); every
  rank extracts its shard, :func:`detkd.runtime.dist.all_gather_cat` joins them,
  instances are sorted by key (and deduplicated: DistributedSampler pads by repeating images), so every
  rank holds the same pool. The (level, class) selections are split across ranks and shared with
  ``all_gather_objects``; nothing is written to disk.
"""

from __future__ import annotations

import heapq
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from detkd.data import kept_boxes
from detkd.distill.base import opt
from detkd.distill.global_kd.pgm import select_prototypes
from detkd.distill.global_kd.prototypes import EXTRACTIONS, GENERATORS, Prototypes, generate, instance_features_levels
from detkd.runtime.dist import all_gather_cat, all_gather_objects, is_main, rank, world_size
from detkd.taps import TapRequest, select_levels, tap_teacher, transform_batch

# ----------------------------------------------------------------------------------------------------------
# The options of a prototype method

GeneratorName = Literal[
    "pgm", "kmeans_teacher", "kmeans_student", "dbscan_teacher", "dbscan_student", "ambiguous", "random"
]


@dataclass
class PrototypeOptions:
    """Options shared by every distiller that uses prototypes (bank, schedule, relations, sigma); the bank
    (:class:`PrototypeBank`) reads those of the pool and the selection."""

    k: int = opt(10, ge=1)  # prototypes per class per level (K)
    lam: float = opt(10.0, ge=0)  # lambda of Eq. 2 / 5
    refresh_every: int = opt(1, ge=1)  # T of Alg. 2, in epochs
    generator: GeneratorName = "pgm"  # Table 6
    normalize: bool = False  # L2-normalise features for selection and projection (authors: true)
    allow_repeats: bool = True  # PGM may pick an instance twice (authors' code)
    prefilter: bool = False  # PGM candidates: the authors' density pre-filter
    max_candidates: int | None = opt(None, ge=1)  # PGM: random subset of candidates
    extraction: Literal["roi_align", "crop_mean", "crop_mean_inclusive"] = "roi_align"  # authors: crop_mean_inclusive
    roi_size: int = opt(7, ge=1)  # RoIAlign output size (extraction roi_align)
    min_box: float = opt(0.0, ge=0)  # bank: drop boxes narrower / lower than this (px); authors: 30
    # bank: at most this many images per class (authors: 800 on COCO; 0 = all); only the images holding a kept
    # instance are forwarded at a refresh, so it sets the refresh cost (digits configs: 50)
    max_images_per_class: int = opt(800, ge=0)
    seed: int = opt(0, unbounded=True)
    dbscan_eps: float = opt(0.0, ge=0)  # 0 = automatic (see prototypes.dbscan_labels)
    dbscan_min_samples: int = opt(5, ge=1)
    # "one": every sigma fixed to 1, the robust weighting of RDM switched off (an ablation; the bench's
    # global_sigma_one row)
    sigma: Literal["paper", "cosine_max", "one"] = "paper"
    instances: Literal["gt", "positive_proposals"] = "gt"


# ----------------------------------------------------------------------------------------------------------
# The bank


@dataclass
class InstancePool:
    """The instances a refresh selects from (:meth:`PrototypeBank.extract_pool`), sorted by key, on CPU."""

    keys: Tensor  # (N, 2) int64 (image id, box index among the image's non-ignored boxes)
    labels: Tensor  # (N,) int64
    areas: Tensor  # (N,) box areas in the transformed frame
    ft: list[Tensor]  # per level (N, Dt): teacher features
    fs: list[Tensor]  # per level (N, Ds): student features
    plan_s: float  # seconds spent deciding the instances (before any detector ran)


def _priority(seed: int, image_id: int, cls: int) -> int:
    """A seeded pseudo-random 64-bit priority of (image, class) (splitmix64): order- and rank-independent."""
    z = (seed * 0x9E3779B97F4A7C15 + image_id * 0xBF58476D1CE4E5B9 + cls * 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return z ^ (z >> 31)


def _sort_dedupe(keys: Tensor) -> Tensor:
    """Order of rows sorted by (image id, box index) with repeated keys dropped."""
    order = torch.argsort(keys[:, 1], stable=True)
    order = order[torch.argsort(keys[order, 0], stable=True)]
    k = keys[order]
    first = torch.ones(k.shape[0], dtype=torch.bool)
    first[1:] = (k[1:] != k[:-1]).any(1)
    return order[first]


def _concat(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Join extraction chunks (keys, labels, areas, per-level features ``fs`` / ``ft`` or None)."""
    out: dict[str, Any] = {k: torch.cat([c[k] for c in chunks]) for k in ("keys", "labels", "areas")}
    for name in ("fs", "ft"):
        out[name] = None
        if chunks[0][name] is not None:
            out[name] = [torch.cat([c[name][lv] for c in chunks]) for lv in range(len(chunks[0][name]))]
    return out


# ----------------------------------------------------------------------------------------------------------
# Which images a refresh needs, known before any detector runs

# image id -> [(box index, label)]: the instances to extract from that image (box index = position among the
# image's non-ignored boxes)
Wanted = dict[int, list[tuple[int, int]]]


def _image_id(target: dict[str, Any], fallback: int) -> int:
    if "image_id" in target:
        return int(torch.as_tensor(target["image_id"]).reshape(-1)[0])
    return fallback  # no id: rank and position (then the loader order must not change between refreshes)


def _kept_labels(target: dict[str, Any]) -> Tensor:
    """Labels of the non-ignored boxes, in box order (what :func:`detkd.taps.transform_batch` keeps)."""
    return torch.as_tensor(target["labels"]).reshape(-1).cpu()[kept_boxes(target).cpu()]


def annotation_index(loader: Any) -> list[tuple[int, int, list[int]]] | None:
    """The images ``loader`` yields, as (data set index, image id, labels of the non-ignored boxes in box
    order), read from the data set's ground truth without decoding an image.

    Needs a ``torch.utils.data.DataLoader`` over a map-style data set with ``coco_gt()`` (the detkd data sets:
    images in data set order, each image's annotations in box order, ``iscrowd`` = ignore) whose own
    ``sampler`` decides the images (no custom ``batch_sampler``); returns None otherwise. Follows the
    sampler, so under DDP it lists this rank's shard.
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    if loader.batch_size is None or not hasattr(loader.dataset, "coco_gt"):
        return None
    gt = loader.dataset.coco_gt()
    ids = [int(im["id"]) for im in gt["images"]]
    if len(ids) != len(loader.dataset):
        return None
    labels: dict[int, list[int]] = {i: [] for i in ids}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            labels.setdefault(int(a["image_id"]), []).append(int(a["category_id"]))
    return [(int(i), ids[int(i)], labels[ids[int(i)]]) for i in loader.sampler]


def select_images(eligible: dict[int, list[int]], cap: int, seed: int) -> set[tuple[int, int]] | None:
    """(image id, class) pairs kept by the images-per-class cap: for each class, the ``cap`` images with the
    lowest seeded priority (:func:`_priority`, ties by image id) among the images holding an eligible
    instance of it, over ALL ranks (``eligible``: this rank's image id -> eligible instance labels). Each rank
    sends only its own bottom-``cap`` per class, which holds every global winner of its shard; the result
    is the same for any number of ranks and loader order. None = no cap (keep everything)."""
    if cap <= 0:
        return None
    per_class: dict[int, list[tuple[int, int]]] = {}
    for img, labels in eligible.items():
        for c in set(labels):
            per_class.setdefault(c, []).append((_priority(seed, img, c), img))
    local = {c: heapq.nsmallest(cap, items) for c, items in per_class.items()}
    merged: dict[int, set[tuple[int, int]]] = {}
    for part in all_gather_objects(local):
        for c, items in part.items():  # type: ignore[union-attr]
            merged.setdefault(c, set()).update(items)
    return {(img, c) for c, items in merged.items() for _, img in sorted(items)[:cap]}


def _subset_loader(loader: Any, indices: list[int]) -> Any:
    """A DataLoader like ``loader`` (data set, batch size, collate, workers) over the data set ``indices``."""
    extra: dict[str, Any] = {}
    if loader.num_workers > 0:
        extra = {"prefetch_factor": loader.prefetch_factor, "worker_init_fn": loader.worker_init_fn,
                 "multiprocessing_context": loader.multiprocessing_context}
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=indices, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, **extra)


class PrototypeBank:
    """Prototypes per pyramid level per class, built by Alg. 2 line 4-5, as ``opts`` say (K, lambda, generator,
    extraction, ``min_box``, ``max_images_per_class``, seed; default: :class:`PrototypeOptions`'s defaults).

    ``protos[level][cls]`` is a :class:`Prototypes` (classes with no instance have no entry). Build it
    from a data loader with :meth:`refresh` or from precomputed features with :meth:`build_from_features`.
    """

    def __init__(self, opts: PrototypeOptions | None = None):
        self.opts = opts if opts is not None else PrototypeOptions()
        if self.opts.generator not in GENERATORS:
            raise ValueError(f"generator: {self.opts.generator!r} is not one of {', '.join(GENERATORS)}")
        if self.opts.extraction not in EXTRACTIONS:
            raise ValueError(f"extraction: {self.opts.extraction!r} is not one of {', '.join(EXTRACTIONS)}")
        self.protos: list[dict[int, Prototypes]] = []
        self.refreshes = 0  # how many times prototypes were (re)selected
        # teacher cache: keys (N, 2) = (image id, box index), labels, areas, features per level (CPU)
        self._teacher_cache: dict[str, Any] | None = None
        # set to {} to keep PGM's Eq. 4 objective after each pick, per (level, class) (``detkd prototypes``)
        self.pgm_costs: dict[tuple[int, int], list[float]] | None = None
        self._device_cache: dict[str, Any] = {}

    # -- queries
    @property
    def gen_opts(self) -> dict[str, Any]:
        """The generator's own options, from :attr:`opts`: PGM's (``normalize``, ``allow_repeats``,
        ``prefilter``, ``max_candidates``), DBSCAN's (``dbscan_eps``, ``dbscan_min_samples``), else none."""
        o = self.opts
        if o.generator == "pgm":
            return {"normalize": o.normalize, "allow_repeats": o.allow_repeats, "prefilter": o.prefilter,
                    "max_candidates": o.max_candidates}
        if o.generator.startswith("dbscan"):
            return {"dbscan_eps": o.dbscan_eps, "dbscan_min_samples": o.dbscan_min_samples}
        return {}

    @property
    def num_levels(self) -> int:
        return len(self.protos)

    def is_empty(self) -> bool:
        return not any(self.protos)

    def get(self, level: int, cls: int, device: torch.device | None = None) -> Prototypes | None:
        """Prototypes of class ``cls`` on ``level`` (moved to ``device``), or None when there are none."""
        if level >= len(self.protos) or cls not in self.protos[level]:
            return None
        p = self.protos[level][cls]
        if device is None or p.teacher.device == torch.device(device):
            return p
        key = f"{level}/{cls}/{device}"
        if key not in self._device_cache:
            self._device_cache[key] = Prototypes(
                p.indices, p.teacher.to(device, non_blocking=True), p.student.to(device, non_blocking=True)
            )
        return self._device_cache[key]

    def all_classes(self, level: int, device: torch.device | None = None) -> tuple[Tensor, Tensor] | None:
        """Prototypes of every class on ``level`` stacked in class order: ((sum K_c, Dt), (sum K_c, Ds))."""
        if level >= len(self.protos) or not self.protos[level]:
            return None
        key = f"all/{level}/{device}"
        if key not in self._device_cache:
            ps = [self.protos[level][c] for c in sorted(self.protos[level])]
            t = torch.cat([p.teacher for p in ps])
            s = torch.cat([p.student for p in ps])
            self._device_cache[key] = (t.to(device), s.to(device)) if device is not None else (t, s)
        return self._device_cache[key]

    @property
    def pool_keys(self) -> Tensor:
        """(N, 2) int64 (image id, box index) of the pooled instances, the rows prototype indices point to."""
        if self._teacher_cache is None:
            raise RuntimeError("the prototype pool is built by the first refresh")
        return self._teacher_cache["keys"]

    @property
    def pool_labels(self) -> Tensor:
        """(N,) int64 class of each pooled instance."""
        if self._teacher_cache is None:
            raise RuntimeError("the prototype pool is built by the first refresh")
        return self._teacher_cache["labels"]

    # -- selection
    def _generate(self, level: int, cls: int, ft: Tensor, fs: Tensor, areas: Tensor | None) -> Tensor:
        o = self.opts
        if self.pgm_costs is not None and o.generator == "pgm" and ft.shape[0] > 0:
            # the call generate() makes for pgm, keeping the Eq. 4 costs it drops
            res = select_prototypes(ft, fs, k=o.k, lam=o.lam, **self.gen_opts)
            self.pgm_costs[(level, cls)] = [float(c) for c in res.costs.cpu()]
            return res.indices.cpu().to(torch.int64)
        return generate(
            ft, fs, o.k, o.generator, lam=o.lam, seed=o.seed + 1009 * level + cls,
            areas=areas, **self.gen_opts,
        )

    def build_from_features(
        self,
        feats_t: Sequence[Tensor],
        feats_s: Sequence[Tensor],
        labels: Tensor,
        areas: Tensor | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        """Select prototypes per level per class from pooled instance features.

        ``feats_t[l]`` (N, Dt) and ``feats_s[l]`` (N, Ds) are the level-l vectors of the same N instances,
        ``labels`` (N,) their classes, ``areas`` (N,) their box areas (needed by ``ambiguous``).
        ``device`` is where the generator runs. Under DDP the (level, class) jobs are split across ranks
        and the results shared, so every rank ends with the same bank.
        """
        if len(feats_t) != len(feats_s):
            raise ValueError(f"build_from_features: {len(feats_t)} teacher levels but {len(feats_s)} student")
        labels = labels.cpu()
        for f in list(feats_t) + list(feats_s):
            if f.shape[0] != labels.shape[0]:
                raise ValueError(f"build_from_features: {f.shape[0]} features but {labels.shape[0]} labels")
        classes = sorted(int(c) for c in labels.unique().tolist())
        jobs = [(lv, c) for lv in range(len(feats_t)) for c in classes]
        mine = jobs[rank():: world_size()]
        bar = mine
        if progress and is_main():
            # bars on a terminal only: in a log file their carriage returns pile up into one long line
            bar = tqdm(mine, desc=f"prototypes ({self.opts.generator})", leave=False, disable=not sys.stderr.isatty())
        chosen: dict[tuple[int, int], list[int]] = {}
        for lv, c in bar:
            idx = torch.nonzero(labels == c).squeeze(1)
            ft = feats_t[lv][idx].to(device) if device is not None else feats_t[lv][idx]
            fs = feats_s[lv][idx].to(device) if device is not None else feats_s[lv][idx]
            sel = self._generate(lv, c, ft, fs, None if areas is None else areas.cpu()[idx])
            chosen[(lv, c)] = idx[sel.cpu()].tolist()
        merged: dict[tuple[int, int], list[int]] = {}
        for part in all_gather_objects(chosen):
            merged.update(part)  # type: ignore[arg-type]
        protos: list[dict[int, Prototypes]] = [{} for _ in feats_t]
        for (lv, c), ids in sorted(merged.items()):
            ix = torch.tensor(ids, dtype=torch.int64)
            protos[lv][c] = Prototypes(
                ix, feats_t[lv][ix].detach().float().cpu().clone(), feats_s[lv][ix].detach().float().cpu().clone()
            )
        self.protos = protos
        self.refreshes += 1
        self._device_cache = {}

    # -- Alg. 2: extraction from a loader
    def _eligible(self, context: Any, index: list[tuple[int, int, list[int]]] | None) -> Wanted:
        """This rank's instances that may build the bank, image id -> [(box index, label)]: the non-ignored
        boxes, those under ``min_box`` left out; a repeated image counts once.

        From the data set's annotations when ``index`` is given and ``min_box`` is 0 (nothing decoded);
        otherwise from one pass over the loader's targets (``min_box`` > 0: boxes in the student's input
        frame, through :func:`detkd.taps.transform_batch`). No detector runs.
        """
        out: Wanted = {}
        min_box = self.opts.min_box
        if index is not None and min_box <= 0:
            for _, img, labels in index:
                out.setdefault(img, list(enumerate(labels)))
            return out
        counter = 0
        for images, targets in context.loader:
            ids = [_image_id(t, (rank() << 40) + counter + i) for i, t in enumerate(targets)]
            counter += len(targets)
            if min_box > 0:
                _, tgts = transform_batch(context.student, images, targets)
                for img, t in zip(ids, tgts):
                    wh = (t["boxes"][:, 2:] - t["boxes"][:, :2]).cpu()
                    ok = (wh[:, 0] >= min_box) & (wh[:, 1] >= min_box)
                    labels = t["labels"].cpu().tolist()
                    out.setdefault(img, [(j, labels[j]) for j in torch.nonzero(ok).squeeze(1).tolist()])
            else:
                for img, t in zip(ids, targets):
                    out.setdefault(img, list(enumerate(_kept_labels(t).tolist())))
        return out

    def _plan(self, context: Any, index: list[tuple[int, int, list[int]]] | None) -> Wanted:
        """First refresh: the instances to extract on this rank, decided from the targets alone: the eligible
        instances whose (image, class) survives the images-per-class cap (:func:`select_images`)."""
        eligible = self._eligible(context, index)
        keep = select_images({img: [c for _, c in inst] for img, inst in eligible.items()},
                             self.opts.max_images_per_class, self.opts.seed)
        wanted = {img: [(j, c) for j, c in inst if keep is None or (img, c) in keep] for img, inst in eligible.items()}
        return {img: inst for img, inst in wanted.items() if inst}

    def _batches(self, context: Any, wanted: Wanted, index: list[tuple[int, int, list[int]]] | None):
        """(images, targets, image ids) of the images holding a wanted instance, each image once; no other
        image reaches a detector. With ``index``: a loader over just those data set items (full batches,
        nothing else decoded); otherwise ``context.loader``'s batches sliced to them (empty ones skipped)."""
        bar = None
        if is_main():
            bar = tqdm(desc="prototype features", unit="img", leave=False, disable=not sys.stderr.isatty())
        try:
            if index is not None:
                order: dict[int, int] = {}  # image id -> data set index, in sampler order
                for i, img, _ in index:
                    if img in wanted:
                        order.setdefault(img, i)
                if not order:
                    return
                expected = iter(order.items())
                for images, targets in _subset_loader(context.loader, list(order.values())):
                    ids = [_image_id(t, -1) for t in targets]
                    for img in ids:
                        want, at = next(expected)
                        if img != want:
                            raise RuntimeError(
                                f"prototype refresh: item {at} of the data set has image id {img}, but its "
                                f"coco_gt() lists image id {want} there"
                            )
                    if bar is not None:
                        bar.update(len(ids))
                    yield images, targets, ids
                return
            counter, done = 0, set()
            for images, targets in context.loader:
                ids = [_image_id(t, (rank() << 40) + counter + i) for i, t in enumerate(targets)]
                counter += len(targets)
                pos = [i for i, img in enumerate(ids) if img in wanted and img not in done]
                if not pos:
                    continue
                done.update(ids[i] for i in pos)
                if bar is not None:
                    bar.update(len(pos))
                yield [images[i] for i in pos], [targets[i] for i in pos], [ids[i] for i in pos]
        finally:
            if bar is not None:
                bar.close()

    def _extract(self, context: Any, wanted: Wanted, index: list[tuple[int, int, list[int]]] | None,
                 with_teacher: bool) -> dict[str, Any]:
        """Keys (image id, box index), labels, areas, and per-level student (and teacher) features of this
        rank's ``wanted`` instances, on CPU. Only the images holding one go through the detectors (their
        backbone + FPN only, eval mode, no grad)."""
        student, teacher = context.student, context.teacher
        request = TapRequest(features=True)
        extraction, roi_size = self.opts.extraction, self.opts.roi_size
        pairs = getattr(context, "pairs", None)  # pyramids of different levels: the paired ones only
        chunks: list[dict[str, Any]] = []
        for images, targets, ids in self._batches(context, wanted, index):
            # transform_batch drops ignore boxes: box index = position among the kept boxes
            image_list, tgts = transform_batch(student, images, targets)
            boxes, keys, labels, areas = [], [], [], []
            for img, t in zip(ids, tgts):
                sel = torch.tensor([j for j, _ in wanted[img]], dtype=torch.int64)
                lab = torch.tensor([c for _, c in wanted[img]], dtype=torch.int64)
                got = t["labels"].cpu()
                if int(sel.max()) >= got.shape[0] or not torch.equal(got[sel], lab):
                    raise RuntimeError(
                        f"prototype refresh: image id {img} has {got.shape[0]} boxes with labels {got.tolist()} "
                        f"in the loader, but boxes {sel.tolist()} with labels {lab.tolist()} were expected "
                        "(from the data set's annotations or the first refresh); the data changed"
                    )
                b = t["boxes"][sel.to(t["boxes"].device)]
                boxes.append(b)
                keys.append(torch.stack([torch.full_like(sel, img), sel], dim=1))
                labels.append(lab)
                areas.append((b[:, 2:] - b[:, :2]).prod(dim=1).cpu())
            # tap_teacher: eval mode, no_grad, training flags restored afterwards (used for the student too)
            s_taps = tap_teacher(student, image_list, tgts, request, None)
            if pairs is not None:
                s_taps = select_levels(s_taps, [j for _, j in pairs])
            chunk = {
                "keys": torch.cat(keys), "labels": torch.cat(labels), "areas": torch.cat(areas),
                "fs": [f.float().cpu() for f in instance_features_levels(s_taps, boxes, extraction, roi_size)],
                "ft": None,
            }
            if with_teacher:
                t_taps = tap_teacher(teacher, image_list, tgts, request, None)
                if pairs is not None:
                    t_taps = select_levels(t_taps, [i for i, _ in pairs])
                chunk["ft"] = [f.float().cpu() for f in instance_features_levels(t_taps, boxes, extraction,
                                                                                 roi_size)]
            chunks.append(chunk)
        if not chunks:
            return {"keys": torch.zeros((0, 2), dtype=torch.int64), "labels": torch.zeros(0, dtype=torch.int64),
                    "areas": torch.zeros(0), "fs": None, "ft": None}
        return _concat(chunks)

    def extract_pool(self, context: Any) -> InstancePool:
        """Alg. 2 line 4 on its own: the instance features a refresh selects from (teacher once, cached; the
        current student every time), gathered from every rank, sorted by key; no selection.

        The instances are decided before any detector runs: at the first call from the targets
        (:meth:`_plan`: eligible boxes, images-per-class cap), later the cached ones; only the images
        holding one are forwarded. :meth:`refresh` is this followed by :meth:`build_from_features`.
        """
        t0 = time.perf_counter()
        first = self._teacher_cache is None
        index = annotation_index(context.loader)
        if first:
            wanted = self._plan(context, index)
        else:
            wanted = {}
            for (img, j), c in zip(self._teacher_cache["keys"].tolist(), self._teacher_cache["labels"].tolist()):
                wanted.setdefault(img, []).append((j, c))
        t_plan = time.perf_counter()
        local = self._extract(context, wanted, index, with_teacher=first)
        # the number of levels can only be known on a rank that saw an instance
        num_levels = max(int(n) for n in all_gather_objects(len(local["fs"]) if local["fs"] else 0))
        if num_levels == 0:
            raise RuntimeError("prototype refresh: no ground-truth instance in the training set (after min_box)")
        dims = {}
        for name in ("fs", "ft") if first else ("fs",):
            shapes = [s for s in all_gather_objects(
                [int(f.shape[1]) for f in local[name]] if local[name] else None) if s is not None]
            dims[name] = shapes[0]

        def gather(t: Tensor) -> Tensor:
            # all_gather_cat needs tensors on the collective's device (NCCL: CUDA)
            return all_gather_cat(t.to(context.device)).cpu()

        keys = gather(local["keys"])
        labels = gather(local["labels"])
        areas = gather(local["areas"])
        feats = {}
        for name in dims:
            per_level = local[name] or [torch.zeros((0, d)) for d in dims[name]]
            feats[name] = [gather(f) for f in per_level]
        order = _sort_dedupe(keys)  # DistributedSampler pads a shard by repeating images of another
        keys, labels, areas = keys[order], labels[order], areas[order]
        feats = {name: [f[order] for f in fl] for name, fl in feats.items()}
        if first:
            self._teacher_cache = {"keys": keys, "labels": labels, "areas": areas, "ft": feats["ft"]}
        else:
            cache = self._teacher_cache
            if not torch.equal(keys, cache["keys"]):
                found = {(int(a), int(b)) for a, b in keys.tolist()}
                missing = [tuple(k) for k in cache["keys"].tolist() if tuple(k) not in found]
                where = (f"first: image id {missing[0][0]}, box {missing[0][1]}" if missing
                         else "the loader yielded other instances")
                raise RuntimeError(
                    f"prototype refresh: {len(missing)} cached instances ({where}) were not found again in the "
                    "training loader; the data changed"
                )
            keys, labels, areas = cache["keys"], cache["labels"], cache["areas"]
        return InstancePool(keys, labels, areas, self._teacher_cache["ft"], feats["fs"], t_plan - t0)

    def refresh(self, context: Any) -> dict[str, float]:
        """Alg. 2 lines 4-5: :meth:`extract_pool`, then reselect the prototypes of every (level, class)
        (:meth:`build_from_features`). Returns the timing / size statistics it also passes to ``context.log``.
        """
        t0 = time.perf_counter()
        pool = self.extract_pool(context)
        t1 = time.perf_counter()
        self.build_from_features(pool.ft, pool.fs, pool.labels, pool.areas, device=context.device, progress=True)
        t2 = time.perf_counter()
        stats = {
            "proto_refresh_s": t2 - t0,
            "proto_plan_s": pool.plan_s,
            "proto_extract_s": t1 - t0,
            "proto_select_s": t2 - t1,
            "proto_instances": float(pool.keys.shape[0]),
            "proto_images": float(pool.keys[:, 0].unique().numel()),
            "proto_classes": float(pool.labels.unique().numel()),
        }
        context.log(stats)
        return stats

    # -- persistence (through the distiller's get_extra_state / set_extra_state)
    def state(self) -> dict[str, Any]:
        """Plain tensors and containers only (checkpoints load with ``weights_only=True``)."""
        entries = {}
        for lv, per_class in enumerate(self.protos):
            for c, p in per_class.items():
                entries[f"{lv}/{c}"] = {"indices": p.indices, "teacher": p.teacher, "student": p.student}
        return {"version": 1, "num_levels": len(self.protos), "refreshes": self.refreshes, "entries": entries}

    def load_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError(f"prototype bank state: unsupported format {type(state).__name__}")
        protos: list[dict[int, Prototypes]] = [{} for _ in range(int(state["num_levels"]))]
        for key, e in state["entries"].items():
            lv, c = (int(x) for x in key.split("/"))
            protos[lv][c] = Prototypes(e["indices"].cpu(), e["teacher"].float().cpu(), e["student"].float().cpu())
        self.protos = protos
        self.refreshes = int(state.get("refreshes", 0))
        self._device_cache = {}
