"""Progress reporting and cancellation for long-running calls.

``progress=`` on a streaming call is ``None`` (silent), ``True`` (a tqdm bar per
stage, needs the ``progress`` extra) or a callable receiving ``Progress`` events.
A callback that raises cancels the RPC and the exception propagates.

``CancelToken`` cancels calls from any thread: ``token.cancel()`` cancels the RPC
at once and the call raises ``CancelledError``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Union

import grpc

from atelier.v1 import common_pb2

__all__ = ["Progress", "CancelToken", "ProgressArg"]


@dataclass(frozen=True)
class Progress:
    """One progress event: ``step`` of ``total`` in ``stage`` (e.g. "invert", "edit").

    ``elapsed`` is seconds since the server started computing. The SDK itself emits
    ``stage="retry"`` (``step`` = the attempt about to start, ``total`` = max attempts)
    before retrying a call that failed with UNAVAILABLE.
    """

    stage: str
    step: int
    total: int
    message: str = ""
    elapsed: float = 0.0

    @classmethod
    def from_proto(cls, msg: common_pb2.Progress) -> "Progress":
        return cls(msg.stage, msg.step, msg.total, msg.message, msg.elapsed_seconds)


ProgressCallback = Callable[[Progress], object]


class Cancellable(Protocol):
    """An in-flight call (a grpc call or future) that a CancelToken can cancel."""

    def cancel(self) -> bool: ...
ProgressArg = Union[None, bool, ProgressCallback]


class CancelToken:
    """Thread-safe cancellation for one or more calls.

    Pass it as ``cancel=`` to a call; ``cancel()`` from any thread (or from a progress
    callback) cancels the in-flight RPC immediately, interrupts a retry backoff, and
    makes every later call that gets this token raise ``CancelledError`` before sending.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._calls: set[Cancellable] = set()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def _attach(self, call: Cancellable) -> None:
        """Track an in-flight call; cancels it at once if the token is already cancelled."""
        with self._lock:
            self._calls.add(call)
            cancelled = self._event.is_set()
        if cancelled:
            call.cancel()

    def _detach(self, call: Cancellable) -> None:
        with self._lock:
            self._calls.discard(call)

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when woken by cancellation."""
        return self._event.wait(seconds)


class _ProgressSink:
    """What the transport drives: a callable plus ``close()`` at the end of a call."""

    def __call__(self, event: Progress) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class _NullSink(_ProgressSink):
    def __call__(self, event: Progress) -> None:
        pass


class _CallbackSink(_ProgressSink):
    def __init__(self, callback: ProgressCallback):
        self._callback = callback

    def __call__(self, event: Progress) -> None:
        self._callback(event)


class _TqdmSink(_ProgressSink):
    """One tqdm bar per stage; a new stage closes the previous bar."""

    def __init__(self, tqdm_class: Any):
        self._tqdm = tqdm_class
        self._bar: Any = None
        self._stage: Optional[str] = None

    def __call__(self, event: Progress) -> None:
        if self._bar is None or event.stage != self._stage:
            self.close()
            self._stage = event.stage
            self._bar = self._tqdm(total=event.total or None, desc=event.stage, unit="step", leave=True)
        if event.total and self._bar.total != event.total:
            self._bar.total = event.total
        self._bar.n = event.step
        if event.message:
            self._bar.set_postfix_str(event.message, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def make_sink(progress: ProgressArg) -> _ProgressSink:
    """Resolve a ``progress=`` argument; fails before any RPC is sent."""
    if progress is None or progress is False:
        return _NullSink()
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError(
                "progress=True needs tqdm: pip install 'atelier-client[progress]' "
                "(or pass a callable that receives atelier.Progress events)"
            ) from None
        return _TqdmSink(tqdm)
    if callable(progress):
        return _CallbackSink(progress)
    raise TypeError(f"progress must be None, True or a callable, got {type(progress).__name__}")
