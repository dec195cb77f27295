"""Tensors inside Python objects sent between ranks.

Tensors inside objects sent with ``all_gather_object`` / ``broadcast_object_list`` do not always unpickle
on the other side (torch 2.14, gloo: "UntypedStorage has no attribute dtype"): send ``torch.save`` bytes
instead, and load them back with ``weights_only=True``."""

from __future__ import annotations

import io
from typing import Any

import torch


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
