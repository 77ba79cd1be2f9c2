"""Call semantics through a real loopback server: typed errors, retries, deadlines, cancellation."""
from __future__ import annotations

import signal
import threading

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from sdk_fakes import FAST_RETRIES, abort_with, default_invert, echo_method, progress_event, wait_until_terminated

import atelier
from atelier.sdk.transport import RetryPolicy
from atelier.v1 import common_pb2, inversion_pb2, inversion_pb2_grpc

IMAGE = np.zeros((16, 16, 3), dtype=np.uint8)


def fail_first(times: int, then=default_invert, *, progress_first: bool = False):
    def behaviour(request, context, attempt):
        if attempt <= times:
            if progress_first:
                yield inversion_pb2.InvertEvent(progress=progress_event("invert", 1, 2))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"model still loading (attempt {attempt})")
        yield from then(request, context, attempt)

    return behaviour


def test_invalid_argument_carries_field_violations_and_is_not_retried(fake_and_client):
    fake, client = fake_and_client

    def reject(request, context, attempt):
        abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, "bad request",
                   [("num_inference_steps", "must be between 1 and 1000, got 0"), ("image.width", "not a multiple of 8")])
        yield  # pragma: no cover - abort raises

    fake.invert_behaviour = reject
    with pytest.raises(atelier.InvalidArgumentError) as caught:
        client.inversion.invert(IMAGE, "x", num_inference_steps=0)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.message == "bad request"
    assert error.field_violations == [("num_inference_steps", "must be between 1 and 1000, got 0"), ("image.width", "not a multiple of 8")]
    assert isinstance(error.details[0], error_details_pb2.BadRequest)
    assert "num_inference_steps: must be between 1 and 1000" in str(error)
    assert fake.attempts == 1


@pytest.mark.parametrize(
    "code, error_class",
    [
        (grpc.StatusCode.NOT_FOUND, atelier.NotFoundError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, atelier.ResourceExhaustedError),
        (grpc.StatusCode.FAILED_PRECONDITION, atelier.FailedPreconditionError),
        (grpc.StatusCode.INTERNAL, atelier.InternalError),
        (grpc.StatusCode.UNAUTHENTICATED, atelier.UnauthenticatedError),
    ],
)
def test_status_codes_map_to_typed_errors_without_retry(fake_and_client, code, error_class):
    fake, client = fake_and_client

    def fail(request, context, attempt):
        context.abort(code, "nope")
        yield  # pragma: no cover

    fake.invert_behaviour = fail
    with pytest.raises(error_class) as caught:
        client.inversion.invert(IMAGE, "x")
    assert caught.value.code == code and caught.value.field_violations == []
    assert isinstance(caught.value, atelier.AtelierError) and fake.attempts == 1


def test_rich_details_other_than_bad_request_are_unpacked(fake_and_client):
    fake, client = fake_and_client
    retry_info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=2_000_000))
    error_info = error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="atelier")

    def saturated(request, context, attempt):
        abort_with(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", extra_details=[retry_info, error_info])
        yield  # pragma: no cover

    fake.invert_behaviour = saturated
    with pytest.raises(atelier.ResourceExhaustedError) as caught:
        client.inversion.invert(IMAGE, "x")
    assert caught.value.retry_delay == 0.002
    assert error_info in caught.value.details
    assert fake.attempts == FAST_RETRIES.max_attempts  # RetryInfo makes it retryable, within the bound


def test_unavailable_is_retried_until_it_succeeds(fake_and_client):
    fake, client = fake_and_client
    fake.invert_behaviour = fail_first(2, progress_first=True)
    events = []
    inversion = client.inversion.invert(IMAGE, "x", num_inference_steps=2, progress=events.append)
    assert fake.attempts == 3 and inversion.num_inference_steps == 2
    retries = [event for event in events if event.stage == "retry"]
    assert [(event.step, event.total) for event in retries] == [(2, 4), (3, 4)]
    assert "model still loading" in retries[0].message


def test_retries_are_bounded(fake_and_client):
    fake, client = fake_and_client
    fake.invert_behaviour = fail_first(100)
    with pytest.raises(atelier.UnavailableError, match="attempt 4"):
        client.inversion.invert(IMAGE, "x")
    assert fake.attempts == FAST_RETRIES.max_attempts


def test_unavailable_after_the_result_is_not_retried(fake_and_client):
    fake, client = fake_and_client

    def result_then_unavailable(request, context, attempt):
        yield from default_invert(request, context, attempt)
        context.abort(grpc.StatusCode.UNAVAILABLE, "going away")

    fake.invert_behaviour = result_then_unavailable
    with pytest.raises(atelier.UnavailableError):
        client.inversion.invert(IMAGE, "x")
    assert fake.attempts == 1


def test_retries_zero_disables_retrying(servers):
    fake, _, address = servers()
    fake.invert_behaviour = fail_first(1)
    with atelier.Client(address, retries=0) as client:
        with pytest.raises(atelier.UnavailableError):
            client.inversion.invert(IMAGE, "x")
    assert fake.attempts == 1


def test_a_stream_without_a_result_is_a_protocol_error(fake_and_client):
    fake, client = fake_and_client

    def only_progress(request, context, attempt):
        yield inversion_pb2.InvertEvent(progress=progress_event("invert", 1, 1))

    fake.invert_behaviour = only_progress
    with pytest.raises(atelier.StreamProtocolError, match="without a result"):
        client.inversion.invert(IMAGE, "x")
    assert fake.attempts == 1


def test_deadline_expiry_raises_deadline_exceeded(fake_and_client):
    fake, client = fake_and_client  # client default timeout: 30 s

    def slow(request, context, attempt):
        yield inversion_pb2.InvertEvent(progress=progress_event("invert", 1, 50))
        wait_until_terminated(context)

    fake.invert_behaviour = slow
    with pytest.raises(atelier.DeadlineExceededError):
        client.inversion.invert(IMAGE, "x", timeout=0.2)
    assert fake.time_remaining[0] <= 0.25  # the per-call timeout (not the 30 s default); grpc rounds deadlines up slightly
    assert fake.handler_done.wait(10) and fake.ended_early.is_set()


def test_client_default_timeout_applies_to_every_call(servers):
    fake, _, address = servers()
    fake.invert_behaviour = lambda request, context, attempt: iter(wait_until_terminated(context) or ())
    with atelier.Client(address, timeout=0.2) as client:
        with pytest.raises(atelier.DeadlineExceededError):
            client.inversion.invert(IMAGE, "x")
    assert fake.time_remaining[0] <= 0.25  # 0.2 s, not unlimited; grpc rounds deadlines up slightly


def blocks_after_first_progress(request, context, attempt):
    yield inversion_pb2.InvertEvent(progress=progress_event("invert", 1, 50))
    wait_until_terminated(context)
    yield inversion_pb2.InvertEvent(progress=progress_event("invert", 2, 50))


def test_cancel_token_from_the_progress_callback_cancels_the_server_call(fake_and_client):
    fake, client = fake_and_client
    fake.invert_behaviour = blocks_after_first_progress
    token = atelier.CancelToken()
    with pytest.raises(atelier.CancelledError, match="cancelled by the caller"):
        client.inversion.invert(IMAGE, "x", progress=lambda event: token.cancel(), cancel=token)
    assert fake.handler_done.wait(10) and fake.ended_early.is_set()
    with pytest.raises(atelier.CancelledError):  # a cancelled token refuses later calls
        client.inversion.invert(IMAGE, "x", cancel=token)
    assert fake.attempts == 1


def test_cancel_token_from_another_thread(fake_and_client):
    fake, client = fake_and_client
    fake.invert_behaviour = blocks_after_first_progress
    token = atelier.CancelToken()
    canceller = threading.Thread(target=lambda: fake.started.wait(10) and token.cancel())
    canceller.start()
    with pytest.raises(atelier.CancelledError):
        client.inversion.invert(IMAGE, "x", cancel=token)
    canceller.join()
    assert fake.handler_done.wait(10) and fake.ended_early.is_set()


class StopRequested(Exception):
    pass


@pytest.mark.parametrize("interruption", [StopRequested, KeyboardInterrupt])
def test_an_exception_in_the_callback_cancels_the_call_and_propagates(fake_and_client, interruption):
    fake, client = fake_and_client
    fake.invert_behaviour = blocks_after_first_progress

    def callback(event):
        raise interruption()

    with pytest.raises(interruption) as caught:
        client.inversion.invert(IMAGE, "x", progress=callback)
    # ``caught`` keeps the call object alive: the server sees the SDK's explicit cancel, not garbage collection.
    assert fake.handler_done.wait(10) and fake.ended_early.is_set()
    assert caught.type is interruption


def test_unary_calls_retry_unavailable_and_map_errors(servers):
    _, echo, address = servers()

    def flaky(request, context, attempt):
        if attempt == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if request.name == "":
            abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, "bad", [("name", "must not be empty")])
        return common_pb2.ModelRef(name=request.name.upper())

    echo.behaviour = flaky
    with atelier.Client(address, retries=FAST_RETRIES) as client:
        transport = client.transport("inversion")
        assert transport.unary(echo_method(transport), common_pb2.ModelRef(name="toy")).name == "TOY"
        assert echo.attempts == 2
        with pytest.raises(atelier.InvalidArgumentError) as caught:
            transport.unary(echo_method(transport), common_pb2.ModelRef(name=""))
        assert caught.value.field_violations == [("name", "must not be empty")] and echo.attempts == 3


def test_unary_call_cancelled_from_another_thread(servers):
    _, echo, address = servers()
    echo.behaviour = lambda request, context, attempt: wait_until_terminated(context) or request
    token = atelier.CancelToken()
    canceller = threading.Thread(target=lambda: echo.started.wait(10) and token.cancel())
    canceller.start()
    with atelier.Client(address) as client:
        transport = client.transport("inversion")
        with pytest.raises(atelier.CancelledError):
            transport.unary(echo_method(transport), common_pb2.ModelRef(name="x"), cancel=token)
    canceller.join()


class FixedRandom:
    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_grows_exponentially_with_bounded_jitter():
    policy = RetryPolicy(max_attempts=6, initial_backoff=0.1, max_backoff=0.5, multiplier=2.0, jitter=0.5)
    assert [policy.backoff(n, FixedRandom(0.0)) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.4, 0.5])
    assert policy.backoff(2, FixedRandom(0.999999)) == pytest.approx(0.1, rel=1e-4)
    assert RetryPolicy.coerce(2).max_attempts == 3
    with pytest.raises(ValueError):
        RetryPolicy.coerce(-1)


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt), with SIGINT unblocked in this thread, for
    the test: in the whole suite the interrupt twice never arrived (DEADLINE_EXCEEDED after 30 s)
    while the test alone passed. Cause not found: probes of the handler and of the signal mask
    after every earlier test saw neither change; the test now sets both rather than assume them."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_waiting_for_the_stream_cancels_the_server_call(fake_and_client, python_sigint_handler):
    fake, client = fake_and_client
    fake.invert_behaviour = blocks_after_first_progress
    main_thread = threading.get_ident()
    sent = threading.Event()

    def interrupt_once_the_server_runs():
        # Generous bound: on a loaded machine the handler can take seconds to start.
        if fake.started.wait(60):
            signal.pthread_kill(main_thread, signal.SIGINT)
            sent.set()

    interrupter = threading.Thread(target=interrupt_once_the_server_runs)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt) as caught:
        client.inversion.invert(IMAGE, "x")
    interrupter.join()
    assert sent.is_set()
    assert fake.handler_done.wait(10) and fake.ended_early.is_set()
    assert caught.type is KeyboardInterrupt


def test_iterate_yields_raw_events_and_closing_it_cancels_the_call(fake_and_client):
    fake, client = fake_and_client
    fake.invert_behaviour = blocks_after_first_progress
    transport = client.transport("inversion")
    stub = inversion_pb2_grpc.InversionStub(transport.channel)
    events = transport.iterate(stub.Invert, inversion_pb2.InvertRequest(prompt="x"))
    first = next(events)
    assert first.progress.step == 1
    events.close()
    assert fake.handler_done.wait(10) and fake.ended_early.is_set()
