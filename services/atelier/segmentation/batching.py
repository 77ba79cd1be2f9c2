"""Micro-batching: concurrent callers' items run through one function call per batch.

Like Triton's dynamic batcher: the worker takes the first waiting item, then waits up
to ``max_wait_seconds`` for more, up to ``max_batch_size``, and runs them together. The
queue is bounded (full -> ResourceExhausted); an item whose caller went away (cancelled,
deadline passed) while queued is dropped before it runs. ``max_batch_size=1`` turns
batching off (one worker, no waiting). With a ``more_coming`` hint the worker waits only
while it says more items are on their way, so a lone caller does not pay the wait. Counts match Triton's: ``executions`` (exec_count)
and ``items`` (inference_count), plus a histogram of batch sizes.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

from atelier.core.control import CallControl
from atelier.core.errors import AtelierError, Cancelled, ResourceExhausted

__all__ = ["MicroBatcher", "BatchStats", "wait_for"]

_LOG = logging.getLogger(__name__)
_HINT_POLL_SECONDS = 0.0005
T = TypeVar("T")
R = TypeVar("R")


class BatchStats:
    """Hook points for metrics."""

    def executed(self, batch_size: int, seconds: float) -> None: ...
    def queue_depth(self, depth: int) -> None: ...


class MicroBatcher(Generic[T, R]):
    """``run_batch(items) -> results`` (same length and order) on one worker thread."""

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], max_batch_size: int = 8,
                 max_wait_seconds: float = 0.005, max_queue: int = 64, name: str = "batcher",
                 stats: Optional[BatchStats] = None, more_coming: Optional[Callable[[], bool]] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_seconds < 0 or max_queue < 1:
            raise ValueError("max_wait_seconds must be >= 0 and max_queue >= 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self.max_queue = max_queue
        self.name = name
        self._stats = stats or BatchStats()
        self._more_coming = more_coming
        self._waiting: collections.deque = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=f"{name}-worker", daemon=True)
        self._worker.start()
        self.executions = 0
        self.items = 0
        self._mean_batch_seconds = 0.0  # moving average: the RetryInfo hint when the queue is full
        self.batch_sizes: collections.Counter = collections.Counter()

    def submit(self, item: T, control: Optional[CallControl] = None) -> Future:
        """Queue one item; the Future resolves to ``(result, batch_size)`` or the batch's error."""
        future: Future = Future()
        with self._condition:
            if self._closed:
                raise ResourceExhausted(f"the {self.name} is shutting down")
            if len(self._waiting) >= self.max_queue:
                # RetryInfo: the time to run the waiting batches at the recent pace.
                batches = -(-len(self._waiting) // self.max_batch_size)
                raise ResourceExhausted(
                    f"the {self.name} is busy: {len(self._waiting)} items are waiting (limit {self.max_queue}); "
                    "retry later", retry_delay=min(30.0, max(0.05, batches * self._mean_batch_seconds)))
            self._waiting.append((item, control, future))
            self._stats.queue_depth(len(self._waiting))
            self._condition.notify()
        return future

    def close(self) -> None:
        """Stop accepting work; queued items are failed; the running batch completes."""
        with self._condition:
            self._closed = True
            pending = list(self._waiting)
            self._waiting.clear()
            self._condition.notify_all()
        for _, _, future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(ResourceExhausted(f"the {self.name} shut down"))
        self._worker.join(timeout=10)

    # ------------------------------------------------------------------ worker
    def _take_batch(self) -> list[tuple[T, Future]]:
        with self._condition:
            while not self._waiting and not self._closed:
                self._condition.wait()
            if self._closed:
                return []
            batch = [self._waiting.popleft()]
            flush_at = time.monotonic() + self.max_wait_seconds
            while len(batch) < self.max_batch_size:
                if self._waiting:
                    batch.append(self._waiting.popleft())
                    continue
                remaining = flush_at - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                if self._more_coming is None:
                    self._condition.wait(remaining)
                elif self._more_coming():
                    self._condition.wait(min(remaining, _HINT_POLL_SECONDS))  # the hint can turn False silently
                else:
                    break
            self._stats.queue_depth(len(self._waiting))
        runnable = []
        for item, control, future in batch:
            if not future.set_running_or_notify_cancel():
                continue  # the caller cancelled the future
            if control is not None:
                try:
                    control.check()
                except AtelierError as error:
                    future.set_exception(error)
                    continue
            runnable.append((item, future))
        return runnable

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                if self._closed:
                    return
                continue
            started = time.perf_counter()
            try:
                results = self.run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: run_batch returned {len(results)} results for {len(batch)} items")
            except Exception as error:  # every waiter must hear about it
                for _, future in batch:
                    future.set_exception(error)
                continue
            seconds = time.perf_counter() - started
            self._mean_batch_seconds += 0.2 * (seconds - self._mean_batch_seconds)
            self.executions += 1
            self.items += len(batch)
            self.batch_sizes[len(batch)] += 1
            self._stats.executed(len(batch), seconds)
            for (_, future), result in zip(batch, results):
                future.set_result((result, len(batch)))


def wait_for(future: Future, control: Optional[CallControl] = None, poll_seconds: float = 0.05) -> Any:
    """``future.result()`` that honours the call's deadline and cancellation.

    On stop, the future is cancelled (a still-queued item is then dropped) and
    Cancelled/DeadlineExceeded is raised."""
    if control is None:
        return future.result()
    while True:
        try:
            control.check()
        except AtelierError:
            future.cancel()
            raise
        timeout = poll_seconds
        if control.deadline is not None:
            timeout = max(0.0, min(poll_seconds, control.deadline - time.monotonic()))
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            continue
        except Exception as error:
            if future.cancelled():
                raise Cancelled("the call was cancelled") from error
            raise
