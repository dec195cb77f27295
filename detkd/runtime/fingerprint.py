"""A hash of a nested state (tensors, dicts, lists, plain values): equal iff bitwise equal. Used to check
that runs share a start (``detkd bench``) and that ranks hold the same distiller state."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor


def fingerprint(state: Any) -> str:
    h = hashlib.sha1()

    def visit(obj: Any) -> None:
        if isinstance(obj, Tensor):
            h.update(str((obj.dtype, tuple(obj.shape))).encode())
            h.update(obj.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                visit(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)
        else:
            h.update(repr(obj).encode())

    visit(state)
    return h.hexdigest()
