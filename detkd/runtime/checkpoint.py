"""Checkpoints: written atomically, loaded without executing pickled code, rotated to bound disk use."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detkd.errors import CheckpointError  # defined there, so the CLI catches it without importing torch
from detkd.runtime.console import info
from detkd.runtime.files import atomic_write_bytes, partial_files

FINAL_METRICS = "final.json"  # in a run folder: the final evaluation, written when the run ends (detkd bench reads it)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise to memory, then write through a temp file + rename: a crash never leaves half a file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, never arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(detkd loads checkpoints with weights_only=True and refuses pickled code)"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")


def rotate_epoch_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` ``epoch_N.pt`` files (``last.pt`` and ``best.pt`` are never touched)."""
    files = sorted(
        (int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := _EPOCH_RE.match(p.name))
    )
    for _, p in files[: max(0, len(files) - keep)]:
        p.unlink(missing_ok=True)


def remove_partial_checkpoints(out_dir: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a killed process left in ``out_dir``.

    :func:`save_checkpoint` publishes a file by renaming a complete temporary file, so such leftovers are
    never a checkpoint: they are removed, never loaded."""
    removed = partial_files(out_dir)
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        info(f"removed {len(removed)} half-written file(s) of an interrupted run: "
             f"{', '.join(p.name for p in removed)}")
    return removed


def latest_checkpoint(out_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint of a run folder: ``last.pt``, else the newest ``epoch_N.pt``.

    A file that cannot be loaded (damaged on disk, or written by a tool that does not write atomically)
    is reported and the next candidate is tried. None when the folder holds no checkpoint at all; an error
    when it holds some but none loads."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    epochs = sorted(
        ((int(m.group(1)), p) for p in out_dir.iterdir() if (m := _EPOCH_RE.match(p.name))), reverse=True
    )
    candidates = [out_dir / "last.pt"] if (out_dir / "last.pt").is_file() else []
    candidates += [p for _, p in epochs]
    errors = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            info(f"warning: {e}; trying an older checkpoint")
            continue
        if "epoch" not in ckpt or "model" not in ckpt:
            errors.append(f"{path} is not a training checkpoint (no epoch/model entries)")
            continue
        return path, ckpt
    if errors:
        raise CheckpointError(f"no checkpoint of {out_dir} can be resumed: {'; '.join(errors)}")
    return None


def first_non_finite(named: dict[str, Tensor]) -> str | None:
    """Name of the first floating-point tensor of ``named`` that holds a NaN or Inf, or None."""
    for name, t in named.items():
        if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def pick_checkpoint(run_dir: Path, name: str) -> Path:
    """The checkpoint ``name`` of a run folder; ``best.pt`` falls back to ``last.pt``."""
    path = run_dir / name
    if path.is_file():
        return path
    if name == "best.pt" and (run_dir / "last.pt").is_file():
        return run_dir / "last.pt"  # runs without evaluation have no best.pt
    raise CheckpointError(f"no checkpoint {name} in run directory {run_dir}")
