"""One compute worker per device: a bounded FIFO queue in front of one thread.

GPU work is serialised (pipelines and schedulers carry per-call state, and two
diffusion loops on one device only thrash). ``concurrent.futures.ThreadPoolExecutor``
has an unbounded queue and cannot skip work whose caller went away, hence this
small class.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Optional

from atelier.core.control import CallControl, active
from atelier.core.errors import ResourceExhausted
from atelier.core.metrics import Metrics, default_metrics

__all__ = ["ComputeExecutor"]

# How long shutdown() waits for the worker: after a server's drain, a call still running was
# cancelled and stops at its next UNet evaluation.
SHUTDOWN_JOIN_SECONDS = 30.0


class ComputeExecutor:
    """Runs submitted calls one at a time; at most ``max_queue`` calls wait."""

    def __init__(self, max_queue: int, name: str, metrics: Optional[Metrics] = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self.name = name
        self.metrics = metrics if metrics is not None else default_metrics()
        self._waiting: collections.deque = collections.deque()
        self._running = 0
        self._current: Optional[CallControl] = None  # the running call's control
        self._closed = False
        self._condition = threading.Condition()
        self._worker: Optional[threading.Thread] = None
        self._mean_run_seconds = 0.0  # moving average of a call's run time: the RetryInfo hint
        self._queue_depth = self.metrics.queue_depth.labels(service=name)
        self._in_flight = self.metrics.in_flight.labels(service=name)
        self._queue_depth.set(0)
        self._in_flight.set(0)

    def submit(self, fn: Callable[[], Any], control: CallControl) -> Future:
        """Queue ``fn`` (no arguments). Raises ``ResourceExhausted`` when full."""
        future: Future = Future()
        with self._condition:
            if self._closed:
                raise ResourceExhausted(f"the {self.name} executor is shutting down")
            if len(self._waiting) + self._running > self.max_queue:
                raise ResourceExhausted(
                    f"the {self.name} service is busy: {len(self._waiting)} calls are already waiting "
                    f"(limit {self.max_queue}); retry later",
                    retry_delay=self._retry_delay(),
                )
            self._waiting.append((fn, control, future))
            self._queue_depth.set(len(self._waiting))
            self._ensure_worker()
            self._condition.notify()
        future.add_done_callback(self._forget_if_cancelled)
        return future

    def _retry_delay(self) -> float:
        """When a slot is likely free: one average call, within [0.05, 30] s (caller holds the lock)."""
        return min(30.0, max(0.05, self._mean_run_seconds))

    def _forget_if_cancelled(self, future: Future) -> None:
        """A future cancelled while waiting gives its queue slot back at once."""
        if not future.cancelled():
            return
        with self._condition:
            for entry in self._waiting:
                if entry[2] is future:
                    self._waiting.remove(entry)
                    self._queue_depth.set(len(self._waiting))
                    break

    def queue_depth(self) -> int:
        with self._condition:
            return len(self._waiting)

    def busy(self) -> bool:
        with self._condition:
            return bool(self._waiting or self._running)

    def wedged(self, after_seconds: float) -> Optional[str]:
        """Why the worker cannot take new work, or None: it died with calls waiting, or the
        running call is ``after_seconds`` past its deadline (its code ignores its control,
        e.g. a hung device call). Health reports NOT_SERVING while this is not None."""
        with self._condition:
            worker, control = self._worker, self._current
            pending = bool(self._waiting or self._running)
        if pending and worker is not None and not worker.is_alive() and not self._closed:
            return f"the {self.name} compute worker died"
        if control is not None and control.deadline is not None:
            overdue = time.monotonic() - control.deadline
            if overdue > after_seconds:
                return f"a {self.name} call has run {overdue:.0f} s past its deadline"
        return None

    def shutdown(self, wait: bool = True, timeout: Optional[float] = SHUTDOWN_JOIN_SECONDS) -> None:
        """Stop accepting work; queued calls still run (their controls decide). With ``wait``,
        join the worker (for up to ``timeout`` s): a daemon thread still freeing tensors when
        the interpreter exits is killed inside torch's C++ deallocator, which aborts the
        process ("terminate called without an active exception")."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            worker = self._worker
        if wait and worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work_loop, name=f"compute-{self.name}", daemon=True)
            self._worker.start()

    def _work_loop(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._closed:
                    self._condition.wait()
                if not self._waiting:
                    return
                fn, control, future = self._waiting.popleft()
                self._queue_depth.set(len(self._waiting))
                self._running = 1
                self._current = control
                self._in_flight.set(1)
            started = time.monotonic()
            try:
                self._run_one(fn, control, future)
            finally:
                seconds = time.monotonic() - started
                # Drop the call (its closure holds its tensors) now, not when the next call
                # arrives: an idle worker must not keep the last request's memory.
                del fn, control, future
                with self._condition:
                    self._running = 0
                    self._current = None
                    self._in_flight.set(0)
                    self._mean_run_seconds += 0.2 * (seconds - self._mean_run_seconds)

    @staticmethod
    def _run_one(fn: Callable[[], Any], control: CallControl, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            # A call cancelled or expired while waiting never runs.
            control.check()
            control.mark_started()
            with active(control):  # the model blocks' stop points check this call (sd_model)
                result = fn()
        except BaseException as error:  # noqa: BLE001 - the caller maps it; the worker must survive
            future.set_exception(error)
        else:
            future.set_result(result)
