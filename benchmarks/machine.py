"""What the benchmarks print about the machine they ran on, and the plumbing the step-timing benchmarks
(bench_step.py, bench_teacher.py, bench_refresh.py) share: options, child processes, the header stamp."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable


def cpu_name() -> str:
    """The processor's model name from ``lscpu`` (falls back to ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


class RunStamp:
    """When a benchmark started and the machine's load then and at the end, for its header line: the load
    average tells a reader how much other work shared the cores while the ratios were measured."""

    def __init__(self) -> None:
        self.start = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        self.load0 = os.getloadavg()[0]

    def load(self) -> str:
        return f"load average {self.load0:.2f} -> {os.getloadavg()[0]:.2f}"


def device_name(device: str) -> str:
    """The processor's name for ``cpu``, the GPU's for ``cuda``."""
    import torch

    return cpu_name() if device == "cpu" else torch.cuda.get_device_name()


def add_timing_args(ap: argparse.ArgumentParser, steps: int, warmup: int, threads: int) -> None:
    """The options every step-timing benchmark shares, with its own defaults."""
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=threads, help="torch intra-op threads in the children")
    ap.add_argument("--child", help=argparse.SUPPRESS)


def run_child(child: str, work: Callable[[dict], dict]) -> None:
    """The child side of a benchmark that times each group of configurations in a fresh process: its
    arguments come as JSON, its threads are fixed before any work, its result goes to stdout as JSON."""
    import torch

    args = json.loads(child)
    torch.set_num_threads(args["threads"])
    torch.set_num_interop_threads(1)
    print(json.dumps(work(args)))


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
