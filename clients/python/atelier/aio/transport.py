"""The asyncio call helper: ``atelier.sdk.transport``'s rules (retry policy, what is
retryable, deadlines, stream collection, error mapping) on grpc.aio calls.

Cancelling the task that awaits a call cancels the RPC (asyncio.CancelledError propagates);
``cancel=CancelToken`` works as in the sync SDK, from any thread (atelier.CancelledError).
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncGenerator, Awaitable, Callable, Mapping, Optional, TypeVar

import grpc
from google.protobuf.message import Message

from atelier.sdk.progress import CancelToken, ProgressArg, _ProgressSink, make_sink
from atelier.sdk.transport import (
    RetryableFailure,
    StreamCollector,
    TransportSettings,
    call_deadline,
    caller_cancelled,
    failure,
    map_rpc_error,
    retry_progress,
    time_left,
)

__all__ = ["AsyncTransport"]

T = TypeVar("T")


class _OnLoop:
    """What a CancelToken holds for an asyncio call: its ``cancel()`` (from any thread) runs
    ``action`` on the call's event loop, where grpc.aio objects may be touched."""

    def __init__(self, action: Callable[[], object]):
        self._loop = asyncio.get_running_loop()
        self._action = action

    def cancel(self) -> bool:
        self._loop.call_soon_threadsafe(self._action)
        return True


class AsyncTransport(TransportSettings[grpc.aio.Channel]):
    """Runs RPCs on one grpc.aio channel with the client's metadata, deadline and retry settings."""

    async def unary(self, method: Any, request: Message, timeout: Optional[float] = None, *,
                    cancel: Optional[CancelToken] = None, retry: bool = True) -> Any:
        """Await a unary-unary stub method; returns the response message."""
        deadline = call_deadline(timeout, self.default_timeout)
        return await self._run(lambda remaining: self._unary_once(method, request, remaining, cancel), deadline,
                               cancel, None, retry)

    async def stream(
        self,
        method: Any,
        request: Message,
        timeout: Optional[float] = None,
        progress: ProgressArg = None,
        *,
        cancel: Optional[CancelToken] = None,
        retry: bool = True,
        progress_field: str = "progress",
        result_field: str = "result",
        handlers: Optional[Mapping[str, Callable[[Any], object]]] = None,
    ) -> Any:
        """Await a server-streaming method of ``progress``/``result`` events (other kinds to
        ``handlers``, as the sync transport); returns the result."""
        deadline = call_deadline(timeout, self.default_timeout)
        sink = make_sink(progress)
        try:
            return await self._run(
                lambda remaining: self._stream_once(
                    method, request, remaining, cancel, StreamCollector(sink, progress_field, result_field, handlers)
                ),
                deadline,
                cancel,
                sink,
                retry,
            )
        finally:
            sink.close()

    async def iterate(self, method: Any, request: Message, timeout: Optional[float] = None, *,
                      cancel: Optional[CancelToken] = None) -> AsyncGenerator[Any, None]:
        """Yield the raw messages of a server-streaming call (no retries: the caller knows how
        to resume), as the sync transport's ``iterate``. Closing the generator cancels the RPC."""
        deadline = call_deadline(timeout, self.default_timeout)
        self._channel_getter()  # raises RuntimeError once the client is closed
        if cancel is not None and cancel.cancelled:
            raise caller_cancelled()
        call = method(request, timeout=time_left(deadline), metadata=self.metadata)
        canceller = _OnLoop(call.cancel)
        if cancel is not None:
            cancel._attach(canceller)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, cancel) from exc
        except asyncio.CancelledError:
            call.cancel()
            if cancel is not None and cancel.cancelled:
                raise caller_cancelled() from None
            raise
        except BaseException:  # GeneratorExit included: the caller stopped reading
            call.cancel()
            raise
        finally:
            if cancel is not None:
                cancel._detach(canceller)

    async def _run(self, attempt: Callable[[Optional[float]], Awaitable[T]], deadline: Optional[float],
                   cancel: Optional[CancelToken], sink: Optional[_ProgressSink], retry: bool) -> T:
        self._channel_getter()  # raises RuntimeError once the client is closed
        policy = self.retry_policy
        attempt_number = 1
        while True:
            if cancel is not None and cancel.cancelled:
                raise caller_cancelled()
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
            if await self._sleep(delay, cancel):
                raise caller_cancelled()

    @staticmethod
    async def _sleep(seconds: float, cancel: Optional[CancelToken]) -> bool:
        """Sleep up to ``seconds``; True when woken by the token's cancellation."""
        if cancel is None:
            await asyncio.sleep(seconds)
            return False
        woken = asyncio.Event()
        waker = _OnLoop(woken.set)
        cancel._attach(waker)
        try:
            await asyncio.wait_for(woken.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            cancel._detach(waker)

    async def _unary_once(self, method: Any, request: Message, remaining: Optional[float],
                          cancel: Optional[CancelToken]) -> Any:
        call = method(request, timeout=remaining, metadata=self.metadata)
        canceller = _OnLoop(call.cancel)
        if cancel is not None:
            cancel._attach(canceller)
        try:
            return await call
        except grpc.RpcError as exc:
            raise failure(exc, cancel) from exc
        except asyncio.CancelledError:
            call.cancel()
            if cancel is not None and cancel.cancelled:
                raise caller_cancelled() from None
            raise  # the awaiting task was cancelled
        except BaseException:
            call.cancel()
            raise
        finally:
            if cancel is not None:
                cancel._detach(canceller)

    async def _stream_once(self, method: Any, request: Message, remaining: Optional[float],
                           cancel: Optional[CancelToken], collector: StreamCollector) -> Any:
        call = method(request, timeout=remaining, metadata=self.metadata)
        canceller = _OnLoop(call.cancel)
        if cancel is not None:
            cancel._attach(canceller)
        try:
            async for event in call:
                collector.take(event)
        except grpc.RpcError as exc:
            raise failure(exc, cancel, result_arrived=collector.result is not None) from exc
        except asyncio.CancelledError:
            call.cancel()
            if cancel is not None and cancel.cancelled:
                raise caller_cancelled() from None
            raise  # the awaiting task was cancelled
        except BaseException:  # a progress callback raised, a protocol error
            call.cancel()
            raise
        finally:
            if cancel is not None:
                cancel._detach(canceller)
        return collector.finish()
