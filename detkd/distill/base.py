"""The distiller interface, and the option ranges: declared on each method's options fields, checked here.

A distiller is an ``nn.Module`` (its parameters are adapters, trained with the student) built from a
typed options dataclass. ``forward(teacher, student, targets)`` takes the :class:`~detkd.taps.Taps` of
both detectors on the same transformed batch and returns a dict of named, already weighted loss terms.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from detkd.config import ConfigError
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
    """Base class. Subclasses set ``name`` (their key in :data:`detkd.distill.REGISTRY`), ``Options`` (a
    dataclass), and ``archs`` and ``request`` where they differ from these defaults."""

    name: ClassVar[str]
    Options: ClassVar[type]
    archs: ClassVar[tuple[str, ...]] = ("faster_rcnn", "retinanet", "fcos")
    # names of the terms the run-level ``distill.decay`` leaves alone (the engine multiplies every other term
    # by 1 - epoch / epochs); a distiller sets it from its options, e.g. global's ``decay_resp: false``
    undecayed: frozenset[str] = frozenset()
    # True where a step may leave one of the distiller's parameters without a gradient: DDP then traverses the
    # autograd graph every iteration to find them (find_unused_parameters). Every built-in method keeps all
    # its adapters in the graph (graph_zero anchors empty terms), so none needs it.
    unused_parameters: ClassVar[bool] = False

    def __init__(self, opts: Any, teacher_channels: list[int], student_channels: list[int], arch: str):
        super().__init__()
        # the declared ranges (build_distiller has checked them already, naming the config entry; this covers a
        # distiller built directly from its Options)
        check_options(opts, getattr(self, "name", type(self).__name__))
        self.opts = opts
        self.arch = arch

    def request(self) -> TapRequest:
        """What the teacher must compute for this distiller."""
        return TapRequest(features=True)

    def on_epoch_start(self, context: DistillContext) -> None:  # noqa: B027 - optional hook
        """Called before every training epoch (the global method refreshes prototypes here)."""

    def forward(self, teacher: Taps, student: Taps, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# Option ranges: declared on the options dataclasses' fields (:func:`opt`), checked by :func:`check_options`


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: ``ge`` / ``gt`` a lower bound (``>=`` / ``>``), ``le`` / ``lt`` an
    upper one; None = no bound on that side (all None: any finite number)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    @property
    def bounded(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def __str__(self) -> str:
        """What :func:`check_options` says a value must be: ``>= 1``, ``> 0``, ``in (0, 1]``, ``any number``."""
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if self.ge is not None else "> ") + low[1:]
        if high:
            return ("<= " if self.le is not None else "< ") + high[:-1]
        return "any number"


RANGE = "range"  # the metadata key of a field's Range
# the range of a numeric option whose field declares none (an options dataclass written without opt())
DEFAULT_RANGE = Range(ge=0)


def opt(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
        ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
        unbounded: bool = False) -> Any:
    """A numeric option's dataclass field with its range: ``k: int = opt(10, ge=1)``, ``iou: float =
    opt(0.5, gt=0, le=1)``, ``levels: list[int] = opt(factory=list, ge=0)`` (a list: every element).
    ``unbounded=True`` says that any finite number is fine (seeds, a score threshold where a negative value
    keeps all). None (for an ``X | None`` option) is always accepted. :func:`check_options` checks the
    ranges and ``detkd methods NAME`` prints them."""
    rng = Range(ge=ge, gt=gt, le=le, lt=lt)
    if rng.bounded == unbounded:
        raise TypeError("opt(): give a bound (ge, gt, le, lt) or unbounded=True, not both or neither")
    metadata = {RANGE: rng}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def option_range(f: dataclasses.Field) -> Range | None:
    """The range declared on an options field (:func:`opt`), None where it declares none."""
    return f.metadata.get(RANGE)


def is_numeric(tp: Any) -> bool:
    """Whether an option's annotation holds numbers, the values :func:`check_options` checks: ``int``,
    ``float``, ``X | None`` or ``list[X]`` of them (not ``bool``)."""
    if tp in (int, float):
        return True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (list, tuple, typing.Union, types.UnionType):
        return bool(args) and all(is_numeric(a) for a in args if a is not Ellipsis)
    return False


def range_error(key: str, allowed: Range | str, value: Any) -> ConfigError:
    """The one wording of an option outside its range, ``{key}: must be {allowed}, got {value}``; also for the
    checks that depend on two options or on the detectors (``allowed``: e.g. ``">= top_k (10)"``)."""
    return ConfigError(f"{key}: must be {allowed}, got {value}")


def check_options(opts: Any, where: str) -> None:
    """Check every numeric option of ``opts`` (an options dataclass; lists element by element) against the
    range its field declares (:func:`opt`; :data:`DEFAULT_RANGE` where it declares none): it must be a finite
    number in that range. Errors name ``{where}.options.{option}`` (as an unknown option is named; in YAML the
    options may also sit next to ``name``) and the range, e.g. ``distill.methods[0].options.k: must be >= 1,
    got 0``. :func:`detkd.distill.build_distiller` calls it with the config's ``where``, and every
    :class:`Distiller` on its own options with its name as ``where``."""
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        rng = option_range(f) or DEFAULT_RANGE
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            key = f"{where}.options.{f.name}" + (f"[{i}]" if isinstance(value, (list, tuple)) else "")
            if not math.isfinite(v):
                raise ConfigError(f"{key}: must be a finite number, got {v}")
            if v not in rng:
                raise range_error(key, rng, v)
