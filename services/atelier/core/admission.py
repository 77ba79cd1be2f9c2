"""Admission control in bytes: the requests and (estimated) answers of the calls in flight stay
within one per-service budget (``--max-inflight-bytes``, default 1 GiB).

Memory, not the call count, is what runs out: one call may carry a 256 MiB request or produce
an 800 MB answer. Two checks:

* the request's size is read from its raw bytes before protobuf parses them (a deserializer
  wrapper, ``admit_request_bytes``): a call beyond the budget is refused before its images are
  parsed or decoded, with RESOURCE_EXHAUSTED and google.rpc.RetryInfo;
* the servicer estimates the answer's size before any work (``charge_response``): an answer
  that could never be sent (over the max message size) is INVALID_ARGUMENT naming the limit;
  one that does not fit the budget now is RESOURCE_EXHAUSTED with RetryInfo.

The reservation is released when the RPC ends (a termination callback, and a finalizer for
calls that never reach their handler).
"""
from __future__ import annotations

import contextvars
import threading
import weakref
from typing import Callable, Iterable, Optional

import grpc

from atelier.core.errors import InvalidArgument, ResourceExhausted
from atelier.core.handler_wrapping import CarriedError, wrap_behavior

__all__ = ["ByteBudget", "AdmissionInterceptor", "admit_request_bytes", "charge_response"]

# Seconds a refused caller is told to wait: about one typical call.
RETRY_DELAY_SECONDS = 1.0
_MIB = 1 << 20

_current: contextvars.ContextVar[Optional["Reservation"]] = contextvars.ContextVar("atelier_reservation",
                                                                                  default=None)


def _mib(nbytes: int) -> str:
    return f"{nbytes / _MIB:.1f} MiB"


class ByteBudget:
    """A counter of bytes in flight with a hard limit (thread-safe)."""

    def __init__(self, limit_bytes: int, name: str, max_message_bytes: Optional[int] = None, gauge=None):
        if limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be positive, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self.name = name
        self.max_message_bytes = max_message_bytes
        self._in_use = 0
        self._lock = threading.Lock()
        self._gauge = gauge

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._in_use

    def reserve(self, nbytes: int, what: str, field: str = "") -> None:
        """Take ``nbytes`` or raise: InvalidArgument when they could never fit, else
        ResourceExhausted with RetryInfo."""
        if nbytes > self.limit_bytes:
            raise InvalidArgument(field, f"{what} of {_mib(nbytes)} exceeds the {self.name} service's in-flight "
                                         f"limit of {_mib(self.limit_bytes)} (--max-inflight-bytes)")
        with self._lock:
            if self._in_use + nbytes > self.limit_bytes:
                raise ResourceExhausted(
                    f"the {self.name} service is busy: {_mib(self._in_use)} of requests and answers are in "
                    f"flight, this call needs {_mib(nbytes)} more (limit {_mib(self.limit_bytes)}); retry later",
                    retry_delay=RETRY_DELAY_SECONDS)
            self._in_use += nbytes
            self._set_gauge()

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._in_use -= nbytes
            self._set_gauge()

    def _set_gauge(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self._in_use)


class Reservation:
    """The bytes one call holds; released once (idempotent)."""

    def __init__(self, budget: ByteBudget):
        self.budget = budget
        self._held = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int, what: str, field: str = "") -> None:
        self.budget.reserve(nbytes, what, field)
        with self._lock:
            self._held += nbytes

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, 0
        if held:
            self.budget.release(held)


class _Admitted:
    __slots__ = ("message", "reservation", "__weakref__")

    def __init__(self, message, reservation: Reservation):
        self.message = message
        self.reservation = reservation


class _Refused(CarriedError):
    """A request refused by the budget before it was parsed; its behaviour wrapper raises it."""

    __slots__ = ()


def admit_request_bytes(deserializer: Optional[Callable[[bytes], object]], budget: ByteBudget):
    """Wrap a request deserializer: reserve ``len(raw)`` before parsing. Returns an
    ``_Admitted`` (message + reservation) or a ``_Refused`` for the behaviour wrapper."""

    def deserialize(raw: bytes):
        reservation = Reservation(budget)
        try:
            reservation.add(len(raw), "the request", "")
        except (ResourceExhausted, InvalidArgument) as error:
            return _Refused(error)
        try:
            message = deserializer(raw) if deserializer is not None else raw
        except BaseException:
            reservation.release()
            raise
        admitted = _Admitted(message, reservation)
        weakref.finalize(admitted, reservation.release)  # a call that never reaches its handler
        return admitted

    return deserialize


def charge_response(nbytes: int, field: str, hint: str = "") -> None:
    """Reserve a call's estimated answer size before its work starts (servicers call this).

    INVALID_ARGUMENT naming ``field`` when the answer would exceed the max message size; the
    budget's RESOURCE_EXHAUSTED (with RetryInfo) when it does not fit now. A no-op outside an
    admitted call (in-process use)."""
    reservation = _current.get()
    if reservation is None:
        return
    limit = reservation.budget.max_message_bytes
    if limit is not None and nbytes > limit:
        raise InvalidArgument(field, f"the answer would be about {_mib(nbytes)}, over the "
                                     f"{_mib(limit)} message size limit{': ' + hint if hint else ''}")
    reservation.add(nbytes, "the answer", field)


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Applies ``admit_request_bytes`` to the unary-request RPCs of ``services``. Place it after
    (inside) the error interceptor, which maps its refusals to statuses."""

    def __init__(self, budget: ByteBudget, services: Iterable[str]):
        self._budget = budget
        self._services = frozenset(services)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if handler is None or handler.request_streaming or service not in self._services:
            return handler
        if getattr(handler.unary_unary or handler.unary_stream, "experimental_non_blocking", False):
            return handler  # a callback-style handler takes no wrapped requests

        def wrap(behavior, streaming_response):
            if streaming_response:
                def stream_behavior(admitted, context):
                    message, reservation = _enter(admitted, context)
                    token = _current.set(reservation)
                    try:
                        yield from behavior(message, context)
                    finally:
                        _reset(token)

                return stream_behavior

            def unary_behavior(admitted, context):
                message, reservation = _enter(admitted, context)
                token = _current.set(reservation)
                try:
                    return behavior(message, context)
                finally:
                    _current.reset(token)

            return unary_behavior

        return wrap_behavior(handler, wrap, lambda deserializer: admit_request_bytes(deserializer, self._budget))


def _reset(token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # a generator closed from another thread (garbage collection)
        pass


def _enter(admitted, context):
    if isinstance(admitted, _Refused):
        raise admitted.error
    if not context.add_callback(admitted.reservation.release):
        admitted.reservation.release()
    return admitted.message, admitted.reservation
