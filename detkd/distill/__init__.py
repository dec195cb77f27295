"""Distillation methods: :data:`REGISTRY` maps a method's name (``distill.methods[].name``) to its class."""

from __future__ import annotations

from typing import Any

from detkd.config import ConfigError, from_dict
from detkd.distill.base import Distiller, check_options
from detkd.distill.crosskd import CrossKD
from detkd.distill.cwd import CWD
from detkd.distill.defeat import DeFeat
from detkd.distill.fgd import FGD
from detkd.distill.fgfi import FGFI
from detkd.distill.fitnet import FitNet
from detkd.distill.gid import GID
from detkd.distill.global_kd.distiller import GlobalKD
from detkd.distill.global_kd.variants import DeFeatProto, KDProto, RKDProto
from detkd.distill.kd import KD
from detkd.distill.mgd import MGD
from detkd.distill.pkd import PKD
from detkd.distill.rkd import RKD

REGISTRY: dict[str, type[Distiller]] = {
    "fitnet": FitNet,
    "fgfi": FGFI,
    "defeat": DeFeat,
    "kd": KD,
    "rkd": RKD,
    "fgd": FGD,
    "gid": GID,
    "global": GlobalKD,
    "defeat_proto": DeFeatProto,
    "kd_proto": KDProto,
    "rkd_proto": RKDProto,
    "pkd": PKD,
    "cwd": CWD,
    "mgd": MGD,
    "crosskd": CrossKD,
}


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
    check_options(opts, where)
    try:
        return cls(opts, teacher_channels, student_channels, arch)
    except ConfigError as e:  # the method's own checks: say which entry of distill.methods they concern
        raise ConfigError(f"{where} ({name}): {e}") from None
