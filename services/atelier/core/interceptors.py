"""Server interceptors: go-grpc-prometheus metrics, readiness gate, error mapping.

Order on the server (outermost first): MetricsInterceptor, ErrorInterceptor.
The metrics interceptor sees the final status, including aborts and client
cancellations. The error interceptor is the one place where exceptions become
statuses: AtelierError/CodecError -> their code with google.rpc details; any
other exception -> INTERNAL with the traceback logged, never sent.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Callable, Iterable, Optional

import grpc

from atelier.core.control import remaining_seconds
from atelier.core.errors import AtelierError, InvalidArgument, Unavailable, from_codec_error, to_grpc_status
from atelier.core.handler_wrapping import CarriedError, wrap_behavior
from atelier.core.metrics import Metrics, grpc_code_name
from atelier.sdk.codec import CodecError

__all__ = ["MetricsInterceptor", "ErrorInterceptor", "Readiness"]

_LOG = logging.getLogger(__name__)


def _split_method(full_method: str) -> tuple[str, str]:
    # "/package.Service/Method"
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class _Undecodable(CarriedError):
    """Bytes that are not the request message: garbage from a caller is INVALID_ARGUMENT, so
    the parse error is carried to the handler wrapper and aborted there."""

    __slots__ = ()


def _tolerant(deserializer: Optional[Callable]) -> Optional[Callable]:
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - any parse failure is the caller's bytes
            return _Undecodable(error)

    return deserialize


def _check_decoded(request, context) -> None:
    if isinstance(request, _Undecodable):
        _LOG.info("undecodable request: %s", type(request.error).__name__)
        context.abort_with_status(to_grpc_status(
            InvalidArgument("", "the request is not a valid protobuf message of the method's request type")))


def _checked_stream(requests, context):
    for request in requests:
        _check_decoded(request, context)
        yield request


def _non_blocking_checked(behavior):
    def checked(request, context, send_response_callback):
        _check_decoded(request, context)
        return behavior(request, context, send_response_callback)

    checked.experimental_non_blocking = True
    checked.experimental_thread_pool = getattr(behavior, "experimental_thread_pool", None)
    return checked


class Readiness:
    """Whether application RPCs are admitted, and how many are in flight.

    Application services answer UNAVAILABLE while the models load and while the
    server drains (the SDK retries UNAVAILABLE, so clients move to a ready
    replica); health and reflection always answer.
    """

    def __init__(self, gated_services: Iterable[str]):
        self.gated_services = frozenset(gated_services)
        self._state = "loading"
        self._in_flight = 0
        self._condition = threading.Condition()

    @property
    def state(self) -> str:
        return self._state

    def set_state(self, state: str) -> None:
        with self._condition:
            self._state = state
            self._condition.notify_all()

    def admit(self, service: str) -> Optional[str]:
        """Count the RPC in; return a refusal message when it must not run."""
        if service not in self.gated_services:
            return None
        with self._condition:
            if self._state == "loading":
                return f"{service} is loading its models; retry shortly"
            if self._state == "failed":
                return f"{service} failed to load its models; see the server log"
            if self._state != "serving":
                return f"{service} is shutting down; retry on another replica"
            self._in_flight += 1
            return None

    def release(self) -> None:
        with self._condition:
            self._in_flight -= 1
            self._condition.notify_all()

    def wait_idle(self, timeout: Optional[float]) -> bool:
        """Wait until no admitted RPC is in flight; False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: self._in_flight == 0, timeout)


# A client ends its call at its own deadline, which the server receives a little later than
# the client set it (grpc-timeout counts from the send): the client's cancel arrives while the
# server still sees some time left. A call ended this close to its deadline ran out of time.
_DEADLINE_TOLERANCE_SECONDS = 0.25
_DEADLINE_TOLERANCE_FRACTION = 0.1


def _deadline_budget(context) -> Optional[float]:
    """Seconds the call had when it started, or None without a deadline."""
    return remaining_seconds(context)


def _ended_by_deadline(context, budget: Optional[float]) -> bool:
    if budget is None:
        return False
    tolerance = min(_DEADLINE_TOLERANCE_SECONDS, _DEADLINE_TOLERANCE_FRACTION * budget)
    return context.time_remaining() <= tolerance


class MetricsInterceptor(grpc.ServerInterceptor):
    """grpc_server_{started,handled,msg_received,msg_sent}_total and handling_seconds."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        labels = (_rpc_type(handler), service, method)
        metrics = self._metrics

        def wrap(behavior, streaming_response):
            def begin(context) -> dict:
                outcome = {"finished": False}
                started = time.perf_counter()
                budget = _deadline_budget(context)
                metrics.started.labels(*labels).inc()
                if not handler.request_streaming:
                    metrics.msg_received.labels(*labels).inc()

                def on_termination():
                    # Runs once the RPC is over, whatever the reason: aborts set a
                    # code; a handler that returned means OK; otherwise the client
                    # went away (cancel or deadline).
                    code = context.code()
                    if code is None:
                        if outcome["finished"]:
                            code = grpc.StatusCode.OK
                        elif _ended_by_deadline(context, budget):
                            code = grpc.StatusCode.DEADLINE_EXCEEDED
                        else:
                            code = grpc.StatusCode.CANCELLED
                    metrics.handled.labels(*labels, grpc_code_name(code)).inc()
                    metrics.handling_seconds.labels(*labels).observe(time.perf_counter() - started)

                if not context.add_callback(on_termination):
                    on_termination()
                return outcome

            def counted(requests):
                for request in requests:
                    metrics.msg_received.labels(*labels).inc()
                    yield request

            def arguments(request):
                return counted(request) if handler.request_streaming else request

            if streaming_response:
                def stream_behavior(request, context):
                    outcome = begin(context)
                    for response in behavior(arguments(request), context):
                        metrics.msg_sent.labels(*labels).inc()
                        yield response
                    outcome["finished"] = True

                return stream_behavior

            def unary_behavior(request, context):
                outcome = begin(context)
                response = behavior(arguments(request), context)
                metrics.msg_sent.labels(*labels).inc()
                outcome["finished"] = True
                return response

            return unary_behavior

        return wrap_behavior(handler, wrap)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to statuses and gates application RPCs on readiness."""

    def __init__(self, readiness: Optional[Readiness] = None):
        self._readiness = readiness

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _ = _split_method(handler_call_details.method)
        full_method = handler_call_details.method
        readiness = self._readiness
        # Service-to-service calls carry the first caller's request id: log it where it arrives.
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "x-request-id":
                _LOG.info("%s x-request-id=%s", full_method, str(value)[:128])

        def arguments(request, context):
            if handler.request_streaming:
                return _checked_stream(request, context)
            _check_decoded(request, context)
            return request

        def wrap(behavior, streaming_response):
            if streaming_response:
                def stream_behavior(request, context):
                    _admit(readiness, service, context)
                    try:
                        yield from behavior(arguments(request, context), context)
                    except Exception as error:  # noqa: BLE001 - the one mapping point
                        _abort_for(error, context, full_method)

                return stream_behavior

            def unary_behavior(request, context):
                _admit(readiness, service, context)
                try:
                    return behavior(arguments(request, context), context)
                except Exception as error:  # noqa: BLE001 - the one mapping point
                    _abort_for(error, context, full_method)

            return unary_behavior

        wrapped = wrap_behavior(handler, wrap, _tolerant)
        if wrapped.unary_stream is not None and getattr(wrapped.unary_stream, "experimental_non_blocking", False):
            wrapped = wrapped._replace(unary_stream=_non_blocking_checked(wrapped.unary_stream))
        return wrapped


def _admit(readiness: Optional[Readiness], service: str, context) -> None:
    """Abort with UNAVAILABLE when not ready; otherwise count the RPC in until it
    terminates (a termination callback also covers client cancels, where the
    handler's generator is merely abandoned)."""
    if readiness is None:
        return
    refusal = readiness.admit(service)
    if refusal is not None:
        context.abort_with_status(to_grpc_status(Unavailable(refusal)))
    if service in readiness.gated_services and not context.add_callback(readiness.release):
        readiness.release()


def _abort_for(error: Exception, context: grpc.ServicerContext, full_method: str) -> None:
    if isinstance(error, CodecError):
        error = from_codec_error(error)
    if isinstance(error, AtelierError):
        context.abort_with_status(to_grpc_status(error))
    if context.code() not in (None, grpc.StatusCode.OK):
        raise error  # the handler aborted itself (context.abort): keep its status
    incident = uuid.uuid4().hex[:12]
    _LOG.error("unexpected error in %s (incident %s)", full_method, incident, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see the server log")
