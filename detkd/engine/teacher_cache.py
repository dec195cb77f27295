"""The teacher cache: what the frozen teacher computes independently of the student, once per input.

A distilled step runs the teacher on the student's transformed batch (:func:`detkd.taps.tap_teacher`).
When the same input recurs (every epoch on a data set without random augmentation, every row and seed
of a ``detkd bench`` that feeds the same images), the teacher's pyramid features, its RPN proposals and
its dense head outputs are the same too. This module stores them per image and rebuilds the teacher's
:class:`~detkd.taps.Taps` from the store; what depends on the student is computed live on the stored
features: the teacher's RoI head on the student's RoIs (``roi_outputs``), CrossKD's teacher head tail
(``head_tail``), and the cheap parts that depend on the targets (anchors, anchor matches).

Key of an entry: a hash of the image's transformed, padded input tensor (so the image and every
augmentation applied to it: a flipped image is another key), the padded batch shape and the batch size.
Measured on CPU, an image's features do not depend on the other images of its batch nor on its place in
it, but they do depend on the batch size (other kernels), hence the batch size in the key.

Namespace of a store (a folder under ``distill.cache_dir``): a hash of the teacher's loaded weights, its
model config, the cached parts (proposals, dense outputs, head layer), the storage and teacher dtypes,
the torch version, the thread count and the device type. A changed checkpoint is another namespace, so
stale entries are never read.

Store: a dict in memory (up to ``distill.cache_memory_mb``) in front of one file per entry in the
namespace folder (up to ``distill.cache_disk_mb``), written to a temporary file and renamed into place,
read back memory-mapped and checked against the digest of its tensors: a corrupt or truncated file is
deleted and recomputed, a failed write (full disk) stops writing for the run with one log line. In
float32 the cache gives bit-identical losses (tests/test_teacher_cache.py); ``cache_dtype: float16``
rounds the stored features.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from detkd.config import Config
from detkd.models.build import detector_arch
from detkd.runtime.console import info
from detkd.taps import TapRequest, Taps, match_anchors, num_classes_of, tap_teacher
from detkd.taps.head_walk import head_tail

# TeacherCache.worth_it; an estimate (host / disk bandwidth against a GPU teacher's forward), not measured:
# no GPU was available when it was written
CUDA_MAX_ENTRY_MB = 16
CACHE_VERSION = 1  # bump when the entry layout changes: old folders are then another namespace
# distill.teacher_dtype; "auto" (None): the teacher runs as the step does (under train.amp's autocast on CUDA)
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherCacheError(RuntimeError):
    """The teacher cache cannot be used as configured (the message names the key)."""


def cached_parts(request: TapRequest) -> dict[str, Any]:
    """What the cache stores for ``request``: features always (the live RoI head and head tail start from
    them), proposals and dense outputs when requested. ``roi_outputs`` is never stored: it depends on
    the student's RoIs."""
    dense = request.dense_outputs or request.head_layer >= 0
    return {"proposals": bool(request.proposals), "dense": bool(dense), "head_layer": int(request.head_layer)}


def teacher_fingerprint(teacher: nn.Module, parts: dict[str, Any], settings: dict[str, Any]) -> str:
    """Namespace of a cache: every tensor of the teacher's state, the cached parts and ``settings``
    (teacher config, dtypes, threads...). Equal iff the teacher would compute the same outputs."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"version": CACHE_VERSION, "arch": detector_arch(teacher), "parts": parts,
                         "torch": torch.__version__, "threads": torch.get_num_threads(), **settings},
                        sort_keys=True, default=str).encode())
    for name, t in sorted(teacher.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_keys(images: ImageList, namespace: str) -> list[str]:
    """One key per image of a transformed batch: its padded input bytes, its un-padded size, the padded
    batch shape and the batch size (features depend on all of these)."""
    tensors = images.tensors.detach()
    n = int(tensors.shape[0])
    head = f"{namespace}:{n}:{tuple(tensors.shape[1:])}:{tensors.dtype}"
    cpu = tensors.cpu()
    keys = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{head}:{tuple(images.image_sizes[i])}".encode())
        h.update(cpu[i].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


def entry_digest(entry: dict[str, Any]) -> str:
    """Hash of an entry's names, dtypes, shapes and bytes (the check of a file read back)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(entry):
        value = entry[name]
        h.update(name.encode())
        if isinstance(value, Tensor):
            h.update(f"{value.dtype}:{tuple(value.shape)}".encode())
            h.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def entry_bytes(entry: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in entry.values() if isinstance(v, Tensor))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode and without gradients for the block; every module's flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def taps_to_float32(taps: Taps) -> Taps:
    """The floating tensors of ``taps`` (a teacher run under autocast) as float32, so the distillers mix
    them with the student's tensors as before."""
    def conv(v: Any) -> Any:
        if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != torch.float32:
            return v.float()
        if isinstance(v, list) and v and isinstance(v[0], Tensor):
            return [conv(x) for x in v]
        return v

    return dataclasses.replace(taps, **{f.name: conv(getattr(taps, f.name)) for f in dataclasses.fields(taps)
                                        if f.name not in ("targets", "extras")})


def teacher_autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The precision of the teacher's forward (``distill.teacher_dtype``): None leaves the step's own
    autocast state; float32 switches autocast off (a full-precision teacher under AMP too)."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float32:
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=dtype)


def live_teacher(teacher: nn.Module, images: ImageList, targets: list[dict[str, Tensor]] | None,
                 request: TapRequest, student: Taps | None, dtype: torch.dtype | None = None) -> Taps:
    """:func:`tap_teacher` in the precision ``dtype`` (see :func:`teacher_autocast`); floating outputs of a
    half-precision teacher are cast back to float32."""
    if dtype is None:
        return tap_teacher(teacher, images, targets, request, student)
    with teacher_autocast(images.tensors.device.type, dtype):
        taps = tap_teacher(teacher, images, targets, request, student)
    return taps_to_float32(taps) if dtype != torch.float32 else taps


class TeacherCache:
    """The teacher's outputs per image key, in memory and optionally in a folder (see the module doc).

    ``enabled=False``: every call computes the teacher live (in ``teacher_dtype``); nothing is stored.
    """

    def __init__(self, teacher: nn.Module, request: TapRequest, *, enabled: bool = True,
                 folder: str | Path | None = None, memory_mb: float = 2048, disk_mb: float = 20480,
                 dtype: str = "float32", teacher_dtype: str = "auto", settings: dict[str, Any] | None = None):
        if dtype not in ("float32", "float16"):
            raise TeacherCacheError(f"distill.cache_dtype: {dtype!r} is not one of 'float32', 'float16'")
        if teacher_dtype not in DTYPES:
            raise TeacherCacheError(f"distill.teacher_dtype: {teacher_dtype!r} is not one of {', '.join(DTYPES)}")
        self.enabled = enabled
        self.store_dtype = DTYPES[dtype]
        self.teacher_dtype = DTYPES[teacher_dtype]
        self.parts = cached_parts(request)
        self.memory_limit = int(memory_mb * 2**20)
        self.disk_limit = int(disk_mb * 2**20)
        self.memory: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.memory_used = 0
        self.hits = self.misses = self.disk_reads = self.rebuilt = 0
        self.write_off: str = ""  # why entries are no longer written to the folder ("" = they are)
        self.memory_full = False
        self.namespace = ""
        self.folder: Path | None = None
        self.disk_used = 0
        if not enabled:
            return
        self.namespace = teacher_fingerprint(teacher, self.parts, {
            "cache_dtype": dtype, "teacher_dtype": teacher_dtype, **(settings or {})})
        if folder:
            self.folder = Path(folder) / self.namespace
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TeacherCacheError(f"distill.cache_dir: cannot create {self.folder}: {e}") from None
            self.disk_used = sum(p.stat().st_size for p in self.folder.glob("*/*.pt"))

    # ------------------------------------------------------------------------------------------------------

    def describe(self) -> str:
        if not self.enabled:
            return "teacher cache: off"
        where = f"memory up to {self.memory_limit / 2**20:.0f} MB"
        if self.folder is not None:
            where += (f", folder {self.folder} up to {self.disk_limit / 2**20:.0f} MB "
                      f"({self.disk_used / 2**20:.1f} MB there)")
        return f"teacher cache: on ({where}, {str(self.store_dtype).removeprefix('torch.')})"

    def summary(self) -> str:
        total = self.hits + self.misses
        rate = self.hits / total if total else 0.0
        return (f"teacher cache: {self.hits} of {total} images reused ({rate:.0%}), {len(self.memory)} in memory "
                f"({self.memory_used / 2**20:.1f} MB), {self.disk_reads} read from disk, {self.rebuilt} rebuilt")

    def tap(self, teacher: nn.Module, images: ImageList, targets: list[dict[str, Tensor]] | None,
            request: TapRequest, student: Taps | None = None) -> Taps:
        """The teacher's taps of this batch, as :func:`detkd.taps.tap_teacher` returns them: from the cache
        when every image of the batch is there, else computed live (and the missing images stored)."""
        if not self.enabled:
            return live_teacher(teacher, images, targets, request, student, self.teacher_dtype)
        if cached_parts(request) != self.parts:
            raise TeacherCacheError(f"teacher cache: built for {self.parts}, asked for {cached_parts(request)}")
        keys = image_keys(images, self.namespace)
        entries = [self.get(k) for k in keys]
        if all(e is not None for e in entries):
            self.hits += len(keys)
            return self.from_entries(teacher, images, targets, request, student, entries)
        taps = live_teacher(teacher, images, targets, request, student, self.teacher_dtype)
        for i, (k, e) in enumerate(zip(keys, entries)):
            if e is None:
                self.misses += 1
                e = self.entry(taps, i)
                if not self.worth_it(e, images.tensors.device):
                    return taps
                self.put(k, e)
            else:
                self.hits += 1
        return taps

    def worth_it(self, e: dict[str, Any], device: torch.device) -> bool:
        """On CUDA, a teacher's outputs of more than :data:`CUDA_MAX_ENTRY_MB` per image (large inputs: COCO
        at 800 px is ~90 MB) take longer to copy back from host memory or disk than to recompute: the
        cache turns itself off, once, with a log line."""
        size = entry_bytes(e) / 2**20
        if device.type != "cuda" or size <= CUDA_MAX_ENTRY_MB:
            return True
        self.enabled = False
        self.memory.clear()
        self.memory_used = 0
        info(f"teacher cache: off: the teacher's outputs are {size:.0f} MB per image, more than "
             f"{CUDA_MAX_ENTRY_MB} MB, which a CUDA teacher recomputes faster than they are copied back")
        return False

    # ------------------------------------------------------------------------------------------------------
    # Entries

    def entry(self, taps: Taps, i: int) -> dict[str, Any]:
        """Image ``i`` of live taps: its own copy (not a view of the batch) on CPU, in the storage dtype."""
        def own(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
            # a half-precision output (the teacher under train.amp) stays as it is: restored exactly
            dtype = dtype or (self.store_dtype if t.dtype == torch.float32 else t.dtype)
            return t[i].detach().to(device="cpu", dtype=dtype, copy=True)

        e: dict[str, Any] = {"level_names": list(taps.level_names), "strides": torch.tensor(taps.strides),
                             "dtype": str(taps.features[0].dtype).removeprefix("torch.")}
        for j, f in enumerate(taps.features):
            e[f"features.{j}"] = own(f)
        if self.parts["proposals"]:
            e["proposals"] = taps.proposals[i].detach().to("cpu", torch.float32, copy=True)  # coordinates: full
        if self.parts["dense"]:
            # head outputs at full precision: logits through sigmoid / KL terms lose too much in float16
            full = taps.cls_logits.dtype
            e["cls_logits"] = own(taps.cls_logits, full)
            e["bbox_regression"] = own(taps.bbox_regression, full)
            if taps.bbox_ctrness is not None:
                e["bbox_ctrness"] = own(taps.bbox_ctrness, full)
            if taps.head_cls_features is not None:
                for j, (c, r) in enumerate(zip(taps.head_cls_features, taps.head_reg_features)):
                    e[f"head_cls.{j}"] = own(c)
                    e[f"head_reg.{j}"] = own(r)
        return e

    def from_entries(self, teacher: nn.Module, images: ImageList, targets: list[dict[str, Tensor]] | None,
                     request: TapRequest, student: Taps | None, entries: list[dict[str, Any]]) -> Taps:
        """Rebuild the teacher's taps from stored entries, computing the student-dependent parts live."""
        device = images.tensors.device
        arch = detector_arch(teacher)
        first = entries[0]
        levels = len(first["level_names"])

        dtype = getattr(torch, first["dtype"])  # the live teacher's output dtype

        def stack(name: str) -> Tensor:
            return torch.stack([e[name] for e in entries]).to(device=device, dtype=dtype)

        feats = [stack(f"features.{j}") for j in range(levels)]
        taps = Taps(arch=arch, features=feats, level_names=list(first["level_names"]),
                    strides=[int(s) for s in first["strides"].tolist()],
                    image_sizes=[(int(h), int(w)) for h, w in images.image_sizes],
                    batch_shape=(int(images.tensors.shape[-2]), int(images.tensors.shape[-1])),
                    targets=targets if targets is not None else [], num_classes=num_classes_of(teacher))
        with eval_mode(teacher):
            if arch == "faster_rcnn":
                if request.proposals:
                    taps.proposals = [e["proposals"].to(device) for e in entries]
                if request.roi_outputs:
                    self._roi_outputs(teacher, images, student, taps)
            elif self.parts["dense"]:
                taps.cls_logits = stack("cls_logits")
                taps.bbox_regression = stack("bbox_regression")
                taps.bbox_ctrness = stack("bbox_ctrness") if "bbox_ctrness" in first else None
                if request.head_layer >= 0:
                    taps.head_layer = request.head_layer
                    taps.head_cls_features = [stack(f"head_cls.{j}") for j in range(levels)]
                    taps.head_reg_features = [stack(f"head_reg.{j}") for j in range(levels)]
                taps.box_coder = teacher.head.box_coder if arch == "fcos" else teacher.head.regression_head.box_coder
                taps.anchors = teacher.anchor_generator(images, feats)
                hw = [int(f.shape[-2] * f.shape[-1]) for f in feats]
                per_location = int(taps.cls_logits.shape[1]) // sum(hw)
                taps.num_anchors_per_level = [n * per_location for n in hw]
                if targets is not None:
                    taps.matched_idxs = match_anchors(teacher, taps.anchors, targets, taps.num_anchors_per_level)
        if arch != "faster_rcnn" and request.head_layer >= 0:
            taps.head_tail = head_tail(teacher, request.head_layer)
        return taps

    def _roi_outputs(self, teacher: nn.Module, images: ImageList, student: Taps | None, taps: Taps) -> None:
        # as tap_teacher's two-stage branch: the teacher's box head on the student's sampled RoIs
        if student is None or student.rois is None:
            raise ValueError("roi_outputs need the student's sampled RoIs: pass the taps of a Faster R-CNN student")
        rh = teacher.roi_heads
        rois = [r.detach() for r in student.rois]
        features = OrderedDict(zip(taps.level_names, taps.features))
        taps.rois = rois
        taps.roi_labels = student.roi_labels
        taps.roi_matched_gt = student.roi_matched_gt
        taps.roi_regression_targets = student.roi_regression_targets
        with teacher_autocast(images.tensors.device.type, self.teacher_dtype):
            taps.roi_features = rh.box_roi_pool(features, rois, images.image_sizes)
            taps.roi_embeddings = rh.box_head(taps.roi_features)
            taps.class_logits, taps.box_deltas = rh.box_predictor(taps.roi_embeddings)
        if taps.class_logits.dtype != torch.float32 and self.teacher_dtype is not None:
            taps.roi_features, taps.roi_embeddings = taps.roi_features.float(), taps.roi_embeddings.float()
            taps.class_logits, taps.box_deltas = taps.class_logits.float(), taps.box_deltas.float()

    # ------------------------------------------------------------------------------------------------------
    # Store

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def get(self, key: str) -> dict[str, Any] | None:
        e = self.memory.get(key)
        if e is not None or self.folder is None:
            return e
        e = self._read(key)
        if e is not None:
            self.disk_reads += 1
            self._remember(key, e)
        return e

    def put(self, key: str, e: dict[str, Any]) -> None:
        self._remember(key, e)
        if self.folder is not None and not self.write_off:
            self._write(key, e)

    def _remember(self, key: str, e: dict[str, Any]) -> None:
        size = entry_bytes(e)
        if self.memory_used + size > self.memory_limit:
            if not self.memory_full:
                self.memory_full = True
                info(f"teacher cache: distill.cache_memory_mb ({self.memory_limit / 2**20:.0f} MB) reached at "
                     f"{len(self.memory)} images; further images are "
                     + ("read from and written to the folder only" if self.folder else "computed live"))
            return
        self.memory[key] = e
        self.memory_used += size

    def _write(self, key: str, e: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save({"version": CACHE_VERSION, "key": key, "digest": entry_digest(e), "entry": e}, buf)
        data = buf.getvalue()
        if self.disk_used + len(data) > self.disk_limit:
            self.write_off = f"distill.cache_disk_mb ({self.disk_limit / 2**20:.0f} MB) reached"
            info(f"teacher cache: {self.write_off} in {self.folder}; no further entries are written there")
            return
        path = self.path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # no fsync: a file cut short by a crash fails its digest check when read and is recomputed
            os.replace(tmp, path)
            tmp = None
            self.disk_used += len(data)
        except OSError as e:
            self.write_off = f"writing {path} failed ({e})"
            info(f"teacher cache: {self.write_off}; no further entries are written to {self.folder} in this "
                 "run (the teacher is computed live where the cache lacks an image: results are unaffected)")
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _read(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            e = blob["entry"]
            problem = ("another layout version" if blob.get("version") != CACHE_VERSION
                       else "another key" if blob.get("key") != key
                       else "a digest mismatch" if blob.get("digest") != entry_digest(e) else "")
        except Exception as exc:  # truncated zip, unpickling error, OS error: all mean "do not trust it"
            problem = f"{type(exc).__name__}: {exc}"
        if not problem:
            return e
        self.rebuilt += 1
        info(f"teacher cache: {path} is unreadable ({problem}); removed, the teacher recomputes it")
        try:
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            self.disk_used = max(0, self.disk_used - size)
        except OSError as exc:
            raise TeacherCacheError(f"teacher cache: cannot remove the corrupt file {path}: {exc}") from None
        return None


def build_teacher_cache(cfg: Config, teacher: nn.Module, request: TapRequest) -> TeacherCache:
    """The cache of a distilled run from ``cfg.distill`` (``teacher_cache``, ``cache_*``, ``teacher_dtype``).

    Turned off, with a log line, when the inputs cannot recur: ``data.photometric`` draws a new colour
    distortion for every image. (A horizontal flip can: the flipped image is another key.)"""
    dc = cfg.distill
    enabled = dc.teacher_cache
    if enabled and cfg.data.photometric:
        info("teacher cache: off: data.photometric distorts every image anew, so no teacher input recurs "
             "(distill.teacher_cache: false silences this line)")
        enabled = False
    # weights are hashed from the loaded tensors: their path is left out, so a moved file keeps its cache
    teacher_cfg = {k: v for k, v in dataclasses.asdict(dc.teacher).items() if k not in ("weights", "backbone_weights")}
    device = next(teacher.parameters()).device
    settings = {"teacher": teacher_cfg, "device": device.type, "channels_last": dc.teacher_channels_last}
    cache = TeacherCache(teacher, request, enabled=enabled, folder=dc.cache_dir or None,
                         memory_mb=dc.cache_memory_mb, disk_mb=dc.cache_disk_mb, dtype=dc.cache_dtype,
                         teacher_dtype=dc.teacher_dtype, settings=settings)
    if enabled:
        info(cache.describe())
    return cache


def prepare_teacher(teacher: nn.Module, channels_last: bool) -> nn.Module:
    """``distill.teacher_channels_last``: the teacher's weights in channels_last memory format."""
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    return teacher
