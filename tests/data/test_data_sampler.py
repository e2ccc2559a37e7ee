"""Bucket batch sampler: no mixed buckets, seeded epochs, resume, DDP sharding."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraforge.data.sampler import BucketBatchSampler

# Three buckets; image 0 repeated 3 times (repeats), image 5 twice.
BUCKETS = [[0, 0, 0, 1, 2], [3, 4], [5, 5, 6, 7, 8, 9, 10]]
BUCKET_OF = {i: b for b, members in enumerate(BUCKETS) for i in members}


def indices(batches):
    return [[ref.index for ref in batch] for batch in batches]


def test_batches_never_mix_buckets_and_cover_every_sample() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=1)
    batches = indices(sampler)
    assert all(len({BUCKET_OF[i] for i in batch}) == 1 for batch in batches)
    assert Counter(i for batch in batches for i in batch) == Counter(i for b in BUCKETS for i in b)
    # ceil(5/2) + ceil(2/2) + ceil(7/2)
    assert len(batches) == len(sampler) == 3 + 1 + 4


def test_drop_last_drops_incomplete_batches() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, drop_last=True)
    batches = indices(sampler)
    assert all(len(b) == 2 for b in batches) and len(batches) == len(sampler) == 2 + 1 + 3


def test_epochs_are_seeded() -> None:
    a = BucketBatchSampler(BUCKETS, batch_size=2, seed=7)
    b = BucketBatchSampler(BUCKETS, batch_size=2, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(BucketBatchSampler(BUCKETS, batch_size=2, seed=8)) != first


def test_sample_refs_carry_epoch_and_distinct_seeds() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=3, seed=0)
    sampler.set_epoch(4)
    refs = [ref for batch in sampler for ref in batch]
    assert {ref.epoch for ref in refs} == {4}
    assert len({ref.seed for ref in refs}) == len(refs)


def test_without_shuffle_order_is_bucket_order() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=4, shuffle=False)
    assert indices(sampler) == [[0, 0, 0, 1], [2], [3, 4], [5, 5, 6, 7], [8, 9, 10]]


def test_skip_batches_resumes_mid_epoch_once() -> None:
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip_batches(5)
    assert len(sampler) == len(full) - 5
    assert list(sampler) == full[5:]
    assert list(sampler) == full  # the skip applies to one iteration only
    with pytest.raises(ValueError):
        sampler.skip_batches(-1)


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_ddp_ranks_get_equal_disjoint_shares(replicas: int) -> None:
    ranks = [
        BucketBatchSampler(BUCKETS, batch_size=2, seed=5, num_replicas=replicas, rank=r)
        for r in range(replicas)
    ]
    shares = [list(s) for s in ranks]
    assert len({len(s) for s in shares}) == 1
    assert all(len(s) == len(sampler) for s, sampler in zip(shares, ranks, strict=True))
    whole = BucketBatchSampler(BUCKETS, batch_size=2, seed=5).epoch_batches(0)
    seen = [batch for share in shares for batch in share]
    # Every batch is somewhere; padding repeats only as many batches as needed.
    assert all(batch in seen for batch in whole)
    assert len(seen) - len(whole) < replicas


def test_ddp_with_drop_last_trims() -> None:
    ranks = [
        BucketBatchSampler(BUCKETS, batch_size=2, num_replicas=3, rank=r, drop_last=True)
        for r in range(3)
    ]
    shares = [list(s) for s in ranks]
    assert [len(s) for s in shares] == [2, 2, 2] == [len(s) for s in ranks]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        BucketBatchSampler(BUCKETS, batch_size=0)
    with pytest.raises(ValueError):
        BucketBatchSampler(BUCKETS, batch_size=1, num_replicas=2, rank=2)


@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=6),
    batch_size=st.integers(1, 8),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 50),
)
def test_every_epoch_is_a_partition_into_single_bucket_batches(sizes, batch_size, seed, epoch):
    buckets, start = [], 0
    for size in sizes:
        buckets.append(list(range(start, start + size)))
        start += size
    owner = {i: b for b, members in enumerate(buckets) for i in members}
    sampler = BucketBatchSampler(buckets, batch_size, seed=seed)
    sampler.set_epoch(epoch)
    batches = indices(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(start))
    assert all(len({owner[i] for i in batch}) == 1 for batch in batches)
    assert all(1 <= len(batch) <= batch_size for batch in batches)
    assert len(batches) == len(sampler)
