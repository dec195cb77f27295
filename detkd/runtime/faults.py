"""Fault injection for the reliability tests: make this process die at a named point, like a real crash.

``DETKD_FAULT=POINT`` kills the process with SIGKILL (no clean-up, no ``finally``) the
``DETKD_FAULT_AT``-th time (default 1) it reaches ``POINT``; ``DETKD_FAULT_ACTION=stop`` stops it with
SIGSTOP instead (a hung process: alive, sockets open, never answering). Points:

- ``train_step``: after an optimizer step (and its periodic checkpoint, if one was due);
- ``eval_batch``: after an evaluation batch;
- ``prototype_refresh``: when a prototype refresh has selected the new prototypes, before the distiller
  marks the epoch as refreshed (nothing of the refresh is on disk yet);
- ``write:NAME``: while writing file NAME (``write:last.pt``): the temporary file is complete, the rename
  that would publish it has not happened.

Without ``DETKD_FAULT`` (every normal run) a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Die here if ``DETKD_FAULT`` names this point and this is its ``DETKD_FAULT_AT``-th hit."""
    if os.environ.get("DETKD_FAULT") != name:
        return
    _hits[name] += 1
    if _hits[name] != int(os.environ.get("DETKD_FAULT_AT", "1")):
        return
    action = os.environ.get("DETKD_FAULT_ACTION", "kill")
    os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
