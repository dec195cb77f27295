"""Samplers of the training and evaluation loaders: an evaluation shard per rank, a resumable training order."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, no padding: each image is evaluated exactly once."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipSampler(Sampler[int]):
    """The training sampler, able to start an epoch after its first ``skip`` indices (mid-epoch resume).

    ``base`` is a ``RandomSampler`` drawing from the loader's generator (the order of a plain
    ``shuffle=True`` loader) or a ``DistributedSampler``. The epoch's order is drawn in full, then the
    indices already trained are passed over without loading them, so the rest of the epoch sees exactly
    the images, in the order, of an uninterrupted run.
    """

    def __init__(self, base: Sampler[int] | None = None):
        self.base = base
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        it = iter(self.base)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)
