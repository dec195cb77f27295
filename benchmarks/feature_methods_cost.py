"""CPU cost of one forward + backward of the FPN feature distillers (fitnet, pkd, cwd, mgd) on random maps.

    OMP_NUM_THREADS=1 python benchmarks/feature_methods_cost.py

Faster R-CNN pyramid of a 2 x 320 x 320 batch (P2-P5 + pool: 80x80 .. 5x5), teacher 256 channels, student
256 or 128; default options (P2-P5 distilled). Prints trainable parameters, the best of 3 timed calls
after one warm-up, and the loss values (uncorrelated random maps, so PKD and CWD sit near 1 per level).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkd.distill import build_distiller  # noqa: E402
from detkd.taps import Taps  # noqa: E402

SHAPES = [(80, 80), (40, 40), (20, 20), (10, 10), (5, 5)]


def taps(channels: int, grad: bool) -> Taps:
    feats = [torch.randn(2, channels, h, w).requires_grad_(grad) for h, w in SHAPES]
    return Taps(arch="faster_rcnn", features=feats, level_names=["0", "1", "2", "3", "pool"],
                strides=[4, 8, 16, 32, 64], image_sizes=[(320, 320)] * 2, batch_shape=(320, 320), targets=[],
                num_classes=3)


def main() -> int:
    torch.manual_seed(0)
    for tc, sc in [(256, 256), (256, 128)]:
        teacher = taps(tc, False)
        for name in ["fitnet", "pkd", "cwd", "mgd"]:
            d = build_distiller(name, {}, [tc] * 5, [sc] * 5, "faster_rcnn")
            params = sum(p.numel() for p in d.parameters())
            times = []
            for _ in range(4):
                student = taps(sc, True)
                t0 = time.perf_counter()
                out = d(teacher, student, [])
                sum(out.values()).backward()
                times.append(time.perf_counter() - t0)
            values = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in out.items())
            print(f"teacher {tc} / student {sc}  {name:<7} {params / 1e6:6.3f} M params  "
                  f"{1000 * min(times[1:]):7.1f} ms  {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
