"""Distillation methods. Importing a method module registers it (see :mod:`detkd.distill.base`)."""

from __future__ import annotations

import importlib

BUILTIN_MODULES = ("fitnet", "fgfi", "defeat", "kd", "rkd", "fgd", "gid", "global_kd", "pkd", "cwd", "mgd", "crosskd")


def load_builtin() -> None:
    """Import every built-in method module so that the registry is complete."""
    for name in BUILTIN_MODULES:
        importlib.import_module(f"detkd.distill.{name}")
