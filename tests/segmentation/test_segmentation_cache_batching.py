"""Embedding cache (LRU, bounded in bytes) and the micro-batcher, in-process."""
from __future__ import annotations

import threading
import time

import pytest

from atelier.core.control import CallControl
from atelier.core.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from atelier.segmentation.batching import MicroBatcher, wait_for
from atelier.segmentation.cache import EmbeddingCache


def _cache(max_bytes):
    return EmbeddingCache(max_bytes, nbytes=len)


def test_cache_counts_hits_and_misses_and_returns_the_value():
    cache = _cache(100)
    assert cache.get("a") is None
    cache.put("a", b"x" * 10)
    assert cache.get("a") == b"x" * 10
    assert (cache.hits, cache.misses, cache.bytes_used, len(cache)) == (1, 1, 10, 1)


def test_cache_evicts_least_recently_used_to_stay_within_bytes():
    cache = _cache(100)
    for key in "abc":
        cache.put(key, b"x" * 40)  # the third does not fit beside the first two
    assert "a" not in cache and cache.bytes_used == 80 and cache.evictions == 1
    cache.get("b")  # b is now the most recently used
    cache.put("d", b"x" * 40)
    assert "c" not in cache and "b" in cache and "d" in cache
    assert cache.bytes_used <= cache.max_bytes


def test_cache_refuses_an_entry_larger_than_the_budget_and_replaces_same_key():
    cache = _cache(100)
    cache.put("a", b"x" * 30)
    assert cache.put("big", b"x" * 101) is False and "big" not in cache and "a" in cache
    cache.put("a", b"x" * 50)
    assert cache.bytes_used == 50 and len(cache) == 1
    disabled = _cache(0)
    disabled.put("a", b"x")
    assert disabled.get("a") is None


class _SlowDouble:
    """run_batch that records batch sizes and holds the worker until released."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sizes = []

    def __call__(self, items):
        self.entered.set()
        self.release.wait(10)
        self.sizes.append(len(items))
        return [2 * item for item in items]


def test_concurrent_items_run_as_one_batch_and_each_gets_its_own_result():
    run = _SlowDouble()
    batcher = MicroBatcher(run, max_batch_size=8, max_wait_seconds=0.5)
    try:
        futures = [batcher.submit(i) for i in range(5)]
        run.release.set()
        results = [wait_for(f) for f in futures]
    finally:
        batcher.close()
    assert [r for r, _ in results] == [0, 2, 4, 6, 8]
    assert run.sizes == [5] and batcher.batch_sizes == {5: 1}
    assert (batcher.executions, batcher.items) == (1, 5)
    assert all(size == 5 for _, size in results)


def test_batches_are_capped_at_max_batch_size_and_size_one_turns_batching_off():
    for max_batch, expected in ((2, [2, 2, 1]), (1, [1, 1, 1, 1, 1])):
        run = _SlowDouble()
        run.release.set()
        batcher = MicroBatcher(run, max_batch_size=max_batch, max_wait_seconds=0.2)
        entered, blocker = threading.Event(), threading.Event()
        # Hold the worker on a first batch so the five items queue up together.
        original = batcher.run_batch
        batcher.run_batch = lambda items: (entered.set(), blocker.wait(10), original(items))[2]
        first = batcher.submit(100)
        assert entered.wait(10)
        futures = [batcher.submit(i) for i in range(5)]
        blocker.set()
        assert wait_for(first)[0] == 200
        assert [wait_for(f)[0] for f in futures] == [0, 2, 4, 6, 8]
        batcher.close()
        assert run.sizes == [1] + expected


def test_full_queue_is_resource_exhausted_and_errors_reach_every_caller():
    run = _SlowDouble()
    batcher = MicroBatcher(run, max_batch_size=1, max_wait_seconds=0, max_queue=2)
    try:
        running = batcher.submit(1)
        assert run.entered.wait(10)  # taken by the worker, which now waits for release
        batcher.submit(2)
        batcher.submit(3)
        with pytest.raises(ResourceExhausted, match="busy") as refused:
            batcher.submit(4)
        assert 0.05 <= refused.value.retry_delay <= 30  # sent as google.rpc.RetryInfo
        run.release.set()
        assert wait_for(running)[0] == 2
    finally:
        batcher.close()

    def boom(items):
        raise RuntimeError("encoder exploded")

    failing = MicroBatcher(boom, max_batch_size=4, max_wait_seconds=0.1)
    try:
        futures = [failing.submit(i) for i in range(3)]
        for future in futures:
            with pytest.raises(RuntimeError, match="exploded"):
                wait_for(future)
    finally:
        failing.close()


def test_items_whose_caller_gave_up_are_dropped_before_running():
    run = _SlowDouble()
    batcher = MicroBatcher(run, max_batch_size=1, max_wait_seconds=0)
    try:
        first = batcher.submit(1)
        assert run.entered.wait(10)
        cancelled = threading.Event()
        expired = batcher.submit(2, CallControl(deadline=time.monotonic() + 0.1))
        gone = batcher.submit(3, CallControl(is_cancelled=cancelled.is_set))
        with pytest.raises(DeadlineExceeded):
            wait_for(expired, CallControl(deadline=time.monotonic() + 0.1))
        cancelled.set()
        with pytest.raises(Cancelled):
            wait_for(gone, CallControl(is_cancelled=cancelled.is_set))
        run.release.set()
        wait_for(first)
        last = batcher.submit(4)
        assert wait_for(last)[0] == 8
    finally:
        batcher.close()
    assert run.sizes == [1, 1], "the expired and the cancelled item must not have run"


def test_with_a_hint_the_worker_waits_only_while_more_items_are_coming():
    coming = threading.Event()
    run = _SlowDouble()
    run.release.set()
    batcher = MicroBatcher(run, max_batch_size=2, max_wait_seconds=60, more_coming=coming.is_set)
    try:
        # Nothing else on its way: the lone item runs at once instead of waiting 60 s for company.
        assert wait_for(batcher.submit(1), CallControl(deadline=time.monotonic() + 20))[0] == 2
        coming.set()  # now a second item is announced: the first waits for it
        first = batcher.submit(2)
        batcher.submit(3)
        assert wait_for(first, CallControl(deadline=time.monotonic() + 20)) == (4, 2)
    finally:
        batcher.close()
    assert run.sizes == [1, 2]
