"""The distiller interface and its registry.

A distiller is an ``nn.Module`` (its parameters are adapters, trained with the student) built from a
typed options dataclass. ``forward(teacher, student, targets)`` takes the :class:`~detkd.taps.Taps` of
both detectors on the same transformed batch and returns a dict of named, already weighted loss terms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from detkd.config import ConfigError, from_dict
from detkd.taps import TapRequest, Taps


@dataclass
class DistillContext:
    """What :meth:`Distiller.on_epoch_start` may use: both detectors and a non-augmented training loader.

    ``loader`` yields ``(images, targets)`` like the training loader (this rank's shard under DDP) but
    without random augmentation. ``student`` is the bare model (not the DDP wrapper).
    """

    teacher: nn.Module
    student: nn.Module
    loader: Any
    device: Any
    epoch: int
    epochs: int
    log: Callable[[dict[str, float]], None] = field(default=lambda d: None)
    # (teacher level, student level) of equal stride when the pyramids differ (detkd.models.pair_levels):
    # a hook that taps the detectors itself restricts both to these levels (detkd.taps.select_levels)
    pairs: list[tuple[int, int]] | None = None


class Distiller(nn.Module):
    """Base class. Subclasses set ``Options`` (a dataclass), ``archs`` and ``request``."""

    Options: ClassVar[type]
    archs: ClassVar[tuple[str, ...]] = ("faster_rcnn", "retinanet", "fcos")
    # names of the terms the run-level ``distill.decay`` leaves alone (the engine multiplies every other term
    # by 1 - epoch / epochs); a distiller sets it from its options, e.g. global's ``decay_resp: false``
    undecayed: frozenset[str] = frozenset()

    def __init__(self, opts: Any, teacher_channels: list[int], student_channels: list[int], arch: str):
        super().__init__()
        self.opts = opts
        self.arch = arch

    def request(self) -> TapRequest:
        """What the teacher must compute for this distiller."""
        return TapRequest(features=True)

    def on_epoch_start(self, context: DistillContext) -> None:  # noqa: B027 - optional hook
        """Called before every training epoch (the global method refreshes prototypes here)."""

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        raise NotImplementedError


REGISTRY: dict[str, type[Distiller]] = {}


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    def deco(cls: type[Distiller]) -> type[Distiller]:
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def build_distiller(
    name: str,
    options: dict[str, Any],
    teacher_channels: list[int],
    student_channels: list[int],
    arch: str,
    where: str = "distill",
    pair: str = "",
) -> Distiller:
    """Look ``name`` up in the registry, validate its options, and check it supports ``arch`` (``pair``, e.g.
    "teacher X / student Y", is named in that refusal)."""
    from detkd.distill import load_builtin

    load_builtin()

    if name not in REGISTRY:
        raise ConfigError(f"{where}.name: unknown method {name!r} (known: {', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[name]
    if arch not in cls.archs:
        why = f": {cls.why}" if getattr(cls, "why", "") else ""
        raise ConfigError(
            f"{where}.name: method {name!r} does not support {arch} students (supported: "
            f"{', '.join(cls.archs)}){why}" + (f"; the pair is {pair}" if pair else "")
        )
    opts = from_dict(cls.Options, options, f"{where}.options")
    check_option_values(opts, where)
    try:
        return cls(opts, teacher_channels, student_channels, arch)
    except ConfigError as e:  # the method's own checks: say which entry of distill.methods they concern
        raise ConfigError(f"{where} ({name}): {e}") from None


# Options that may be negative: seeds, and score thresholds where a negative value means "keep all".
SIGNED_OPTIONS = frozenset({"seed", "min_score"})
# Options that must be strictly positive: temperatures divide the logits (or the maps: CWD's tau).
POSITIVE_OPTIONS = frozenset({"temperature", "temp", "tau"})


def check_option_values(opts: Any, where: str) -> None:
    """Value checks shared by every method, naming ``{where}.options.{option}`` (as an unknown option is
    named; in YAML the options may also sit next to ``name``): numbers must be finite; weights,
    counts, sizes, thresholds and lambda / K must not be negative (:data:`SIGNED_OPTIONS` excepted);
    temperatures must be positive. Each method checks its own ranges on top (e.g. an IoU in (0, 1])."""
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            key = f"{where}.options.{f.name}" + (f"[{i}]" if isinstance(value, (list, tuple)) else "")
            if not math.isfinite(v):
                raise ConfigError(f"{key}: must be a finite number, got {v}")
            if f.name in POSITIVE_OPTIONS and v <= 0:
                raise ConfigError(f"{key}: must be > 0, got {v}")
            if f.name not in SIGNED_OPTIONS and v < 0:
                raise ConfigError(f"{key}: must be >= 0, got {v}")
