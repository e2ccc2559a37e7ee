"""Bucket batch sampler: batches never mix buckets; the order is a pure function of seed and epoch.

Torch-free: a ``torch.utils.data.DataLoader`` accepts any iterable of index lists as
``batch_sampler``. Each yielded element is a :class:`SampleRef` carrying its own random seed, so
crops, flips, colour augmentation and caption shuffles are reproducible whatever the number of
data-loader workers, and a resumed run sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple


class SampleRef(NamedTuple):
    """One sample to produce: image ``index``, the 0-based ``epoch``, and its random ``seed``."""

    index: int
    epoch: int
    seed: int


class BucketBatchSampler:
    """Yields batches of :class:`SampleRef`, each batch from a single bucket.

    Per epoch (like sd-scripts' ``shuffle_buckets``): every bucket's samples are shuffled, cut into
    batches (the last one of a bucket may be smaller), and the batches of all buckets are
    shuffled together. With several processes, each rank takes every ``num_replicas``-th batch;
    the batch list is first padded by repeating batches from its start (or, with ``drop_last``,
    trimmed) so every rank gets the same number.

    Args:
        bucket_samples: per bucket, the image indices of one epoch (repeats included), e.g.
            :meth:`loraforge.data.plan.BucketPlan.bucket_samples`.
        batch_size: samples per batch (>= 1).
        seed: base seed (default 0).
        shuffle: shuffle samples and batches each epoch (default True).
        num_replicas: number of data-parallel processes (default 1).
        rank: this process (0-based, < num_replicas).
        drop_last: drop each bucket's incomplete last batch (default False).

    Raises:
        ValueError: batch_size < 1, or rank outside ``[0, num_replicas)``.
    """

    def __init__(
        self,
        bucket_samples: Sequence[Sequence[int]],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.bucket_samples = [list(samples) for samples in bucket_samples]
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the (0-based) epoch the next iteration produces."""
        self.epoch = epoch

    def skip_batches(self, count: int) -> None:
        """Make the next iteration start after this rank's first ``count`` batches (resume)."""
        if count < 0:
            raise ValueError(f"cannot skip {count} batches")
        self._skip = count

    def epoch_batches(self, epoch: int) -> list[list[SampleRef]]:
        """All batches of ``epoch`` across ranks, before sharding (deterministic)."""
        rng = random.Random(f"loraforge-buckets:{self.seed}:{epoch}")
        batches: list[list[int]] = []
        for samples in self.bucket_samples:
            order = list(samples)
            if self.shuffle:
                rng.shuffle(order)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return [
            [SampleRef(index, epoch, rng.getrandbits(63)) for index in batch] for batch in batches
        ]

    def rank_batches(self, epoch: int) -> list[list[SampleRef]]:
        """This rank's batches of ``epoch`` (no skipping)."""
        batches = self.epoch_batches(epoch)
        if self.num_replicas == 1 or not batches:
            return batches
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.num_replicas]
        else:
            total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
            batches = (batches * math.ceil(total / len(batches)))[:total]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[SampleRef]]:
        skip, self._skip = self._skip, 0
        yield from self.rank_batches(self.epoch)[skip:]

    def __len__(self) -> int:
        count = sum(self._bucket_batches(len(samples)) for samples in self.bucket_samples)
        if self.num_replicas > 1:
            count = count // self.num_replicas if self.drop_last else -(-count // self.num_replicas)
        return max(0, count - self._skip)

    def _bucket_batches(self, samples: int) -> int:
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)
