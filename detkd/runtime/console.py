"""Rank-0 printing: progress and status lines go to stderr once per job, not once per rank."""

from __future__ import annotations

import sys

from detkd.runtime.dist import is_main


def info(msg: str) -> None:
    """Print a progress/status line once (rank 0), flushed so logs stay in order."""
    if is_main():
        print(msg, file=sys.stderr, flush=True)


def result(line: str) -> None:
    """Print a command's result to stdout once: under ``torchrun`` every rank ends with the same metrics."""
    if is_main():
        print(line, flush=True)
