"""Run logging: one JSON line per record (``metrics.jsonl``), TensorBoard scalars, and a progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from detkd.runtime.console import info
from detkd.runtime.dist import is_main


class RunLogger:
    """Appends records to ``OUT/metrics.jsonl`` and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.active = is_main()
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if self.active and tensorboard:
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        if not self.active:
            return
        record = {k: (float(v) if hasattr(v, "item") else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.tb is not None and step is not None:
            tag = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{tag}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


class Progress:
    """Progress on rank 0 with loss, lr, images/s and ETA: a tqdm bar on a terminal, and a plain line every
    tenth of the work when stderr is a file or pipe (logs of batch jobs); silent on other ranks."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.bar = None
        self.lines = False
        self.total, self.desc, self.done = total, desc, 0
        self.t0 = time.perf_counter()
        self.images = 0
        if enabled and is_main():
            if sys.stderr.isatty():
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True,
                                mininterval=1.0)
            else:
                self.lines = True

    def update(self, n_images: int, **fields: float | str) -> None:
        self.images += n_images
        self.done += 1
        if self.bar is None and not self.lines:
            return
        elapsed = max(1e-9, time.perf_counter() - self.t0)
        post = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
        post["img/s"] = f"{self.images / elapsed:.1f}"
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
            return
        step = max(1, self.total // 10)
        if self.done % step == 0 or self.done == self.total:
            eta = elapsed / self.done * max(0, self.total - self.done)
            info(f"{self.desc}: {self.done}/{self.total} " + " ".join(f"{k} {v}" for k, v in post.items())
                 + f" eta {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def images_per_s(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.t0)
