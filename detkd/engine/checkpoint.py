"""Checkpoints: written atomically, loaded without executing pickled code, rotated to bound disk use."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from detkd.utils import atomic_write_bytes


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


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
