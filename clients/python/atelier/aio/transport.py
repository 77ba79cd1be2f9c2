"""The asyncio call helper: ``atelier.sdk.transport``'s rules (retry policy, what is
retryable, deadlines, stream collection, error mapping) on grpc.aio calls.

Cancellation is asyncio's own: cancelling the task that awaits a call cancels the RPC.
"""
from __future__ import annotations

import asyncio
import random
from typing import Any, Awaitable, Callable, Optional, TypeVar

import grpc
from google.protobuf.message import Message

from atelier.sdk.progress import ProgressArg, _ProgressSink, make_sink
from atelier.sdk.transport import (
    Metadata,
    RetryableFailure,
    RetryPolicy,
    StreamCollector,
    call_deadline,
    failure,
    retry_progress,
    time_left,
)

__all__ = ["AsyncTransport"]

T = TypeVar("T")


class AsyncTransport:
    """Runs RPCs on one grpc.aio channel with the client's metadata, deadline and retry settings."""

    def __init__(
        self,
        channel_getter: Callable[[], grpc.aio.Channel],
        *,
        metadata: Metadata = (),
        default_timeout: Optional[float] = None,
        retry_policy: RetryPolicy = RetryPolicy(),
        rng: Optional[random.Random] = None,
    ):
        self._channel_getter = channel_getter
        self.metadata = tuple(metadata)
        self.default_timeout = default_timeout
        self.retry_policy = retry_policy
        self._rng = rng or random.Random()

    @property
    def channel(self) -> grpc.aio.Channel:
        """The (lazily created, shared) channel to this service's address."""
        return self._channel_getter()

    async def unary(self, method: Any, request: Message, timeout: Optional[float] = None, *,
                    retry: bool = True) -> Any:
        """Await a unary-unary stub method; returns the response message."""
        deadline = call_deadline(timeout, self.default_timeout)
        return await self._run(lambda remaining: self._unary_once(method, request, remaining), deadline, None, retry)

    async def stream(
        self,
        method: Any,
        request: Message,
        timeout: Optional[float] = None,
        progress: ProgressArg = None,
        *,
        retry: bool = True,
        progress_field: str = "progress",
        result_field: str = "result",
    ) -> Any:
        """Await a server-streaming method of ``progress``/``result`` events; returns the result."""
        deadline = call_deadline(timeout, self.default_timeout)
        sink = make_sink(progress)
        try:
            return await self._run(
                lambda remaining: self._stream_once(
                    method, request, remaining, StreamCollector(sink, progress_field, result_field)
                ),
                deadline,
                sink,
                retry,
            )
        finally:
            sink.close()

    async def _run(self, attempt: Callable[[Optional[float]], Awaitable[T]], deadline: Optional[float],
                   sink: Optional[_ProgressSink], retry: bool) -> T:
        self._channel_getter()  # raises RuntimeError once the client is closed
        policy = self.retry_policy
        attempt_number = 1
        while True:
            try:
                return await attempt(time_left(deadline))
            except RetryableFailure as failed:
                error = failed.error
                delay = policy.next_delay(error, attempt_number, deadline, self._rng) if retry else None
                if delay is None:
                    raise error from failed.cause
            attempt_number += 1
            if sink is not None:
                sink(retry_progress(error, attempt_number, policy))
            await asyncio.sleep(delay)

    async def _unary_once(self, method: Any, request: Message, remaining: Optional[float]) -> Any:
        call = method(request, timeout=remaining, metadata=self.metadata)
        try:
            return await call
        except grpc.RpcError as exc:
            raise failure(exc, None) from exc
        except BaseException:  # the awaiting task was cancelled
            call.cancel()
            raise

    async def _stream_once(self, method: Any, request: Message, remaining: Optional[float],
                           collector: StreamCollector) -> Any:
        call = method(request, timeout=remaining, metadata=self.metadata)
        try:
            async for event in call:
                collector.take(event)
        except grpc.RpcError as exc:
            raise failure(exc, None, result_arrived=collector.result is not None) from exc
        except BaseException:  # task cancelled, a progress callback raised, a protocol error
            call.cancel()
            raise
        return collector.finish()
