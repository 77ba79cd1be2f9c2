"""The call helper every service sub-client uses, and the call rules it shares with ``atelier.aio``.

``_Transport`` wraps one channel with the client's settings and runs calls:
metadata (token) on every call, a deadline per call (covering all retry attempts),
retries with exponential backoff and jitter on UNAVAILABLE and on RESOURCE_EXHAUSTED
that carries a google.rpc.RetryInfo (the server says when to come back), mapping of
``grpc.RpcError`` to typed ``AtelierError``s, cancellation (``CancelToken``,
KeyboardInterrupt, a raising progress callback) and progress delivery.

The rules themselves (``RetryPolicy``, ``is_retryable``, ``call_deadline``,
``time_left``, ``StreamCollector``, ``retry_progress``) are plain functions and
classes so that the asyncio transport (``atelier.aio``) applies exactly the same ones.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Mapping, Optional, TypeVar

import grpc
from google.protobuf.message import Message

from atelier.sdk.errors import (
    AtelierError,
    CancelledError,
    DeadlineExceededError,
    ResourceExhaustedError,
    StreamProtocolError,
    UnavailableError,
    from_rpc_error,
)
from atelier.sdk.progress import CancelToken, Progress, ProgressArg, _ProgressSink, make_sink

__all__ = ["RetryPolicy", "is_retryable", "DEFAULT_TIMEOUT"]

# The default deadline of every call, in seconds (Client(timeout=None) disables it).
DEFAULT_TIMEOUT = 600.0

Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")
ChannelT = TypeVar("ChannelT")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that fail before any result arrived with UNAVAILABLE, or with
    RESOURCE_EXHAUSTED carrying a google.rpc.RetryInfo.

    Attempt n+1 waits ``min(max_backoff, initial_backoff * multiplier**(n-1))`` scaled
    by a random factor in ``[1 - jitter, 1]``, or, when the server sent a RetryInfo
    delay, at least that delay (stretched by up to ``jitter``). ``max_attempts`` counts
    the first attempt, so 1 disables retries. The call's deadline bounds the attempts
    and waits together: a wait that would end past it is not started.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    @classmethod
    def coerce(cls, retries: "int | RetryPolicy") -> "RetryPolicy":
        """``retries=`` accepts a policy or an int: the number of retries after the first try."""
        if isinstance(retries, RetryPolicy):
            return retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a RetryPolicy or an int >= 0, got {retries!r}")
        return cls(max_attempts=retries + 1)

    def backoff(self, retry_number: int, rng: random.Random) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry_number - 1))
        return ceiling * (1.0 - self.jitter * rng.random())

    def delay(self, error: AtelierError, retry_number: int, rng: random.Random) -> float:
        """Seconds to wait before retry ``retry_number`` after ``error``.

        A server's RetryInfo delay is a floor: the wait is that delay stretched by up to
        ``jitter`` (so a burst of refused clients does not come back in lockstep), and
        never shorter than the exponential backoff.
        """
        backoff = self.backoff(retry_number, rng)
        asked = error.retry_delay
        if asked is None:
            return backoff
        return max(backoff, asked * (1.0 + self.jitter * rng.random()))

    def next_delay(
        self, error: AtelierError, attempt_number: int, deadline: Optional[float], rng: random.Random
    ) -> Optional[float]:
        """The wait before another attempt after attempt ``attempt_number`` failed retryably,
        or None when the call must give up (attempts spent, or the wait would pass the deadline)."""
        if attempt_number >= self.max_attempts:
            return None
        delay = self.delay(error, attempt_number, rng)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


def is_retryable(error: AtelierError) -> bool:
    """UNAVAILABLE (server down, loading, draining) and RESOURCE_EXHAUSTED when the server
    attached RetryInfo (a full queue that will drain); a RESOURCE_EXHAUSTED without it
    (e.g. a message over the size limit) would fail the same way again."""
    if isinstance(error, UnavailableError):
        return True
    return isinstance(error, ResourceExhaustedError) and error.retry_delay is not None


def call_deadline(timeout: Optional[float], default_timeout: Optional[float]) -> Optional[float]:
    """The ``time.monotonic()`` instant a call must end by (``timeout=None``: the client's default)."""
    seconds = default_timeout if timeout is None else timeout
    if seconds is None:
        return None
    if seconds <= 0:
        raise ValueError(f"timeout must be positive seconds, got {seconds}")
    return time.monotonic() + seconds


def time_left(deadline: Optional[float]) -> Optional[float]:
    """Seconds until ``deadline`` for the next attempt; DeadlineExceededError when none are left."""
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceededError("the deadline expired before the call could be sent")
    return remaining


def retry_progress(error: AtelierError, attempt_number: int, policy: RetryPolicy) -> Progress:
    """The ``stage="retry"`` event emitted before attempt ``attempt_number``."""
    return Progress("retry", attempt_number, policy.max_attempts, f"retrying after {error.code.name}: {error.message}")


class StreamCollector:
    """Consumes the events of a ``oneof {Progress progress; Result result}`` stream: progress
    goes to the sink, the single result is kept (a second one is a protocol error); the event
    kinds named in ``handlers`` go to their handler."""

    def __init__(self, sink: _ProgressSink, progress_field: str = "progress", result_field: str = "result",
                 handlers: Optional[Mapping[str, Callable[[Any], object]]] = None):
        self._sink = sink
        self._handlers = dict(handlers or {})
        self._progress_field = progress_field
        self._result_field = result_field
        self.result: Optional[Any] = None

    def take(self, event: Message) -> None:
        if event.HasField(self._result_field):
            if self.result is not None:
                raise StreamProtocolError("the stream sent more than one result")
            self.result = getattr(event, self._result_field)
        elif event.HasField(self._progress_field):
            self._sink(Progress.from_proto(getattr(event, self._progress_field)))
        else:
            for field_name, handler in self._handlers.items():
                if event.HasField(field_name):
                    handler(getattr(event, field_name))
        # other event kinds are newer than this SDK: skipped

    def finish(self) -> Any:
        if self.result is None:
            raise StreamProtocolError("the stream ended without a result")
        return self.result


class RetryableFailure(Exception):
    """An attempt failed retryably (``is_retryable``) before any result: the loop may retry it."""

    def __init__(self, error: AtelierError, cause: BaseException):
        super().__init__(error.message)
        self.error = error
        self.cause = cause


def caller_cancelled() -> CancelledError:
    return CancelledError("the call was cancelled by the caller")


def map_rpc_error(exc: grpc.RpcError, cancel: Optional[CancelToken] = None) -> AtelierError:
    if cancel is not None and cancel.cancelled and exc.code() == grpc.StatusCode.CANCELLED:
        return caller_cancelled()
    return from_rpc_error(exc)


def failure(exc: grpc.RpcError, cancel: Optional[CancelToken], result_arrived: bool = False) -> BaseException:
    """What a failed attempt raises: RetryableFailure for the retry loop, else the typed error."""
    error = map_rpc_error(exc, cancel)
    if is_retryable(error) and not result_arrived:
        return RetryableFailure(error, exc)
    return error


class TransportSettings(Generic[ChannelT]):
    """What the sync and asyncio transports hold alike: the channel getter and the client's
    metadata, default deadline and retry policy."""

    def __init__(
        self,
        channel_getter: Callable[[], ChannelT],
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
    def channel(self) -> ChannelT:
        """The (lazily created, shared) channel to this service's address."""
        return self._channel_getter()


class _Transport(TransportSettings[grpc.Channel]):
    """Runs RPCs on one channel with the client's metadata, deadline and retry settings.

    Sub-clients get one from the ``Client`` and use ``.channel`` to build their stub,
    then ``unary(...)``, ``stream(...)`` or ``iterate(...)`` to call it.
    """

    # ------------------------------------------------------------------ public helpers

    def unary(
        self,
        method: Any,
        request: Message,
        timeout: Optional[float] = None,
        *,
        cancel: Optional[CancelToken] = None,
        retry: bool = True,
    ) -> Any:
        """Call a unary-unary stub method; returns the response message.

        ``retry=False`` for calls that are not safe to repeat (UNAVAILABLE is then raised).
        """
        deadline = call_deadline(timeout, self.default_timeout)
        return self._run(lambda remaining: self._unary_once(method, request, remaining, cancel), deadline, cancel,
                         None, retry)

    def stream(
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
        """Call a server-streaming method whose events are ``progress`` or ``result``.

        Delivers progress events, returns the single result message; ``handlers`` maps other
        event kinds (oneof field names, e.g. "preview") to callables taking their message. Raises
        ``StreamProtocolError`` when the stream ends without a result (or sends two).
        """
        deadline = call_deadline(timeout, self.default_timeout)
        sink = make_sink(progress)
        try:
            return self._run(
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

    def iterate(
        self,
        method: Any,
        request: Message,
        timeout: Optional[float] = None,
        *,
        cancel: Optional[CancelToken] = None,
    ) -> Iterator[Any]:
        """Yield the raw messages of a server-streaming call (no retries: the caller
        knows how to resume). Closing the generator early cancels the RPC."""
        deadline = call_deadline(timeout, self.default_timeout)
        self._channel_getter()  # raises RuntimeError once the client is closed
        if cancel is not None and cancel.cancelled:
            raise caller_cancelled()
        call = None
        try:  # started inside the try, as in _stream_once
            call = method(request, timeout=time_left(deadline), metadata=self.metadata)
            if cancel is not None:
                cancel._attach(call)
            for message in call:
                yield message
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, cancel) from exc
        except BaseException:
            if call is not None:
                call.cancel()
            raise
        finally:
            if cancel is not None and call is not None:
                cancel._detach(call)

    # ------------------------------------------------------------------ internals

    def _run(
        self,
        attempt: Callable[[Optional[float]], T],
        deadline: Optional[float],
        cancel: Optional[CancelToken],
        sink: Optional[_ProgressSink],
        retry: bool,
    ) -> T:
        self._channel_getter()  # raises RuntimeError once the client is closed
        policy = self.retry_policy
        attempt_number = 1
        while True:
            if cancel is not None and cancel.cancelled:
                raise caller_cancelled()
            try:
                return attempt(time_left(deadline))
            except RetryableFailure as failed:
                error = failed.error
                delay = policy.next_delay(error, attempt_number, deadline, self._rng) if retry else None
                if delay is None:
                    raise error from failed.cause
            attempt_number += 1
            if sink is not None:
                sink(retry_progress(error, attempt_number, policy))
            if cancel is not None:
                if cancel._sleep(delay):
                    raise caller_cancelled()
            else:
                time.sleep(delay)

    def _unary_once(self, method: Any, request: Message, remaining: Optional[float],
                    cancel: Optional[CancelToken]) -> Any:
        future = method.future(request, timeout=remaining, metadata=self.metadata)
        if cancel is not None:
            cancel._attach(future)
        try:
            return future.result()
        except grpc.FutureCancelledError:
            raise caller_cancelled() from None
        except grpc.RpcError as exc:
            raise failure(exc, cancel) from exc
        except BaseException:
            future.cancel()
            raise
        finally:
            if cancel is not None:
                cancel._detach(future)

    def _stream_once(self, method: Any, request: Message, remaining: Optional[float],
                     cancel: Optional[CancelToken], collector: StreamCollector) -> Any:
        call = None
        # Started inside the try: a KeyboardInterrupt landing right after the call began must
        # still cancel it (otherwise the server works on until the deadline).
        try:
            call = method(request, timeout=remaining, metadata=self.metadata)
            if cancel is not None:
                cancel._attach(call)
            for event in call:
                collector.take(event)
        except grpc.RpcError as exc:
            raise failure(exc, cancel, result_arrived=collector.result is not None) from exc
        except BaseException:
            if call is not None:
                call.cancel()
            raise
        finally:
            if cancel is not None and call is not None:
                cancel._detach(call)
        return collector.finish()
