"""The call helper every service sub-client uses.

``_Transport`` wraps one channel with the client's settings and runs calls:
metadata (token) on every call, a deadline per call (covering all retry attempts),
retries with exponential backoff and jitter on UNAVAILABLE and on RESOURCE_EXHAUSTED
that carries a google.rpc.RetryInfo (the server says when to come back), mapping of
``grpc.RpcError`` to typed ``AtelierError``s, cancellation (``CancelToken``,
KeyboardInterrupt, a raising progress callback) and progress delivery.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import grpc

from atelier.sdk.errors import (
    AtelierError,
    CancelledError,
    DeadlineExceededError,
    ResourceExhaustedError,
    StreamProtocolError,
    UnavailableError,
    from_rpc_error,
)
from atelier.sdk.progress import CancelToken, Progress, ProgressArg, make_sink

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that fail before any result arrived with UNAVAILABLE, or with
    RESOURCE_EXHAUSTED carrying a google.rpc.RetryInfo.

    Attempt n+1 waits ``min(max_backoff, initial_backoff * multiplier**(n-1))`` scaled
    by a random factor in ``[1 - jitter, 1]``, or, when the server sent a RetryInfo
    delay, at least that delay (stretched by up to ``jitter``). ``max_attempts`` counts the first attempt, so 1
    disables retries. The call's deadline bounds the attempts and waits together.
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


def is_retryable(error: AtelierError) -> bool:
    """UNAVAILABLE (server down, loading, draining) and RESOURCE_EXHAUSTED when the server
    attached RetryInfo (a full queue that will drain); a RESOURCE_EXHAUSTED without it
    (e.g. a message over the size limit) would fail the same way again."""
    if isinstance(error, UnavailableError):
        return True
    return isinstance(error, ResourceExhaustedError) and error.retry_delay is not None


class _RetryableFailure(Exception):
    """An attempt failed retryably (``is_retryable``) before any result: the loop may retry it."""

    def __init__(self, error: AtelierError, cause: BaseException):
        super().__init__(error.message)
        self.error = error
        self.cause = cause


def _caller_cancelled() -> CancelledError:
    return CancelledError("the call was cancelled by the caller")


class _Transport:
    """Runs RPCs on one channel with the client's metadata, deadline and retry settings.

    Sub-clients get one from the ``Client`` and use ``.channel`` to build their stub,
    then ``unary(...)``, ``stream(...)`` or ``iterate(...)`` to call it.
    """

    def __init__(
        self,
        channel_getter: Callable[[], grpc.Channel],
        *,
        metadata: tuple[tuple[str, str], ...] = (),
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
    def channel(self) -> grpc.Channel:
        """The (lazily created, shared) channel to this service's address."""
        return self._channel_getter()

    # ------------------------------------------------------------------ public helpers

    def unary(
        self,
        method,
        request,
        timeout: Optional[float] = None,
        *,
        cancel: Optional[CancelToken] = None,
        retry: bool = True,
    ):
        """Call a unary-unary stub method; returns the response message.

        ``retry=False`` for calls that are not safe to repeat (UNAVAILABLE is then raised).
        """
        deadline = self._deadline(timeout)
        attempt = lambda remaining: self._unary_once(method, request, remaining, cancel)  # noqa: E731
        return self._run(attempt, deadline, cancel, None, retry)

    def stream(
        self,
        method,
        request,
        timeout: Optional[float] = None,
        progress: ProgressArg = None,
        *,
        cancel: Optional[CancelToken] = None,
        retry: bool = True,
        progress_field: str = "progress",
        result_field: str = "result",
    ):
        """Call a server-streaming method whose events are ``progress`` or ``result``.

        Delivers progress events, returns the single result message. Raises
        ``StreamProtocolError`` when the stream ends without a result (or sends two).
        """
        deadline = self._deadline(timeout)
        sink = make_sink(progress)
        try:
            return self._run(
                lambda remaining: self._stream_once(
                    method, request, remaining, cancel, sink, progress_field, result_field
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
        method,
        request,
        timeout: Optional[float] = None,
        *,
        cancel: Optional[CancelToken] = None,
    ) -> Iterator:
        """Yield the raw messages of a server-streaming call (no retries: the caller
        knows how to resume). Closing the generator early cancels the RPC."""
        deadline = self._deadline(timeout)
        self._channel_getter()  # raises RuntimeError once the client is closed
        if cancel is not None and cancel.cancelled:
            raise _caller_cancelled()
        call = method(request, timeout=self._remaining(deadline), metadata=self.metadata)
        if cancel is not None:
            cancel._attach(call)
        try:
            for message in call:
                yield message
        except grpc.RpcError as exc:
            raise self._map(exc, cancel) from exc
        except BaseException:
            call.cancel()
            raise
        finally:
            if cancel is not None:
                cancel._detach(call)

    # ------------------------------------------------------------------ internals

    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        seconds = self.default_timeout if timeout is None else timeout
        if seconds is None:
            return None
        if seconds <= 0:
            raise ValueError(f"timeout must be positive seconds, got {seconds}")
        return time.monotonic() + seconds

    @staticmethod
    def _remaining(deadline: Optional[float]) -> Optional[float]:
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError("the deadline expired before the call could be sent")
        return remaining

    @staticmethod
    def _map(exc: grpc.RpcError, cancel: Optional[CancelToken]) -> AtelierError:
        if cancel is not None and cancel.cancelled and exc.code() == grpc.StatusCode.CANCELLED:
            return _caller_cancelled()
        return from_rpc_error(exc)

    def _run(self, attempt, deadline, cancel, sink, retry: bool):
        self._channel_getter()  # raises RuntimeError once the client is closed
        policy = self.retry_policy
        attempt_number = 1
        while True:
            if cancel is not None and cancel.cancelled:
                raise _caller_cancelled()
            try:
                return attempt(self._remaining(deadline))
            except _RetryableFailure as failure:
                error = failure.error
                if not retry or attempt_number >= policy.max_attempts:
                    raise error from failure.cause
                delay = policy.delay(error, attempt_number, self._rng)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise error from failure.cause
            attempt_number += 1
            if sink is not None:
                message = f"retrying after {error.code.name}: {error.message}"
                sink(Progress("retry", attempt_number, policy.max_attempts, message))
            if cancel is not None:
                if cancel._sleep(delay):
                    raise _caller_cancelled()
            else:
                time.sleep(delay)

    def _unary_once(self, method, request, remaining, cancel):
        future = method.future(request, timeout=remaining, metadata=self.metadata)
        if cancel is not None:
            cancel._attach(future)
        try:
            return future.result()
        except grpc.FutureCancelledError:
            raise _caller_cancelled() from None
        except grpc.RpcError as exc:
            error = self._map(exc, cancel)
            if is_retryable(error):
                raise _RetryableFailure(error, exc) from None
            raise error from exc
        except BaseException:
            future.cancel()
            raise
        finally:
            if cancel is not None:
                cancel._detach(future)

    def _stream_once(self, method, request, remaining, cancel, sink, progress_field, result_field):
        call = method(request, timeout=remaining, metadata=self.metadata)
        if cancel is not None:
            cancel._attach(call)
        result = None
        try:
            for event in call:
                if event.HasField(result_field):
                    if result is not None:
                        raise StreamProtocolError("the stream sent more than one result")
                    result = getattr(event, result_field)
                elif event.HasField(progress_field):
                    sink(Progress.from_proto(getattr(event, progress_field)))
                # other event kinds are newer than this SDK: skipped
        except grpc.RpcError as exc:
            error = self._map(exc, cancel)
            if is_retryable(error) and result is None:
                raise _RetryableFailure(error, exc) from None
            raise error from exc
        except BaseException:
            call.cancel()
            raise
        finally:
            if cancel is not None:
                cancel._detach(call)
        if result is None:
            raise StreamProtocolError("the stream ended without a result")
        return result
