"""Run a call's work on the compute executor from a gRPC handler thread.

The work runs on the executor's worker; progress events travel back through a
thread-safe queue to the RPC thread, which yields them. Errors are raised to
the caller unchanged: the error interceptor maps them to a status.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Iterator, Optional

import grpc

from atelier.core.control import CallControl, ProgressEvent, remaining_seconds
from atelier.core.errors import Cancelled
from atelier.core.executor import ComputeExecutor

__all__ = ["stream_call", "unary_call", "control_for_context"]

_WORK_DONE = object()


def control_for_context(
    context: grpc.ServicerContext,
    executor: ComputeExecutor,
    on_progress: Optional[Callable[[ProgressEvent], None]] = None,
) -> CallControl:
    """A CallControl bound to the RPC: its deadline, and a cancel flag set when the
    client cancels (or the RPC otherwise terminates before the work ends)."""
    remaining = remaining_seconds(context)
    deadline = None if remaining is None else time.monotonic() + remaining
    terminated = threading.Event()
    if not context.add_callback(terminated.set):
        terminated.set()  # the RPC already ended
    return CallControl(
        deadline=deadline,
        is_cancelled=terminated.is_set,
        on_progress=on_progress,
        metrics=executor.metrics,
    )


def stream_call(
    context: grpc.ServicerContext,
    executor: ComputeExecutor,
    work: Callable[[CallControl], Any],
    progress_message: Callable[[ProgressEvent], Any],
    result_message: Callable[[Any, CallControl], Any],
) -> Iterator[Any]:
    """Generator for a server-streaming RPC: progress messages, then exactly one result."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    control = control_for_context(context, executor, on_progress=events.put)
    future = _submit(context, executor, work, control)
    # The worker always resolves the future (result, error, or skipped when the
    # call ended while queued), so this loop always ends.
    future.add_done_callback(lambda _: events.put(_WORK_DONE))
    while True:
        event = events.get()
        if event is _WORK_DONE:
            break
        yield progress_message(event)
    result = _result(future)
    yield result_message(result, control)


def unary_call(
    context: grpc.ServicerContext,
    executor: ComputeExecutor,
    work: Callable[[CallControl], Any],
) -> Any:
    """Run ``work(control)`` on the executor and return its result (unary RPCs)."""
    control = control_for_context(context, executor)
    return _result(_submit(context, executor, work, control))


def _result(future: Future) -> Any:
    try:
        return future.result()
    except CancelledError:  # withdrawn from the queue because the RPC ended
        raise Cancelled("the call was cancelled while waiting for the executor") from None


def _submit(context, executor: ComputeExecutor, work, control: CallControl) -> Future:
    future = executor.submit(lambda: work(control), control)
    # A call that ends while still queued leaves the queue at once (cancel() is a
    # no-op once the work runs; then the control stops it at its next unet()).
    if not context.add_callback(future.cancel):
        future.cancel()
    return future
