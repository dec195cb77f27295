"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

import platform
import subprocess


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
