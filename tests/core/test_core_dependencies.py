"""core.dependencies: what bounds a dependency call, and the one policy that turns its failure into
ours. The failures are real gRPC errors from loopback: a port that refuses, a socket that accepts
and never speaks (a hung dependency)."""
from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atelier.core.dependencies import DependencyTimeout, dependency_failure, dependency_timeout
from atelier.core.errors import Cancelled, DeadlineExceeded, Unavailable

WHERE = "the inversion service at somewhere:1"


class _Context:
    """The one thing dependency_timeout reads of a ServicerContext."""

    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


@pytest.mark.parametrize("remaining, cap, expected", [
    (None, None, DependencyTimeout(None, by_caller=False)),
    (None, 60.0, DependencyTimeout(60.0, by_caller=False)),
    (8.0, None, DependencyTimeout(6.0, by_caller=True)),      # a quarter of 8 s kept for our own work
    (8.0, 60.0, DependencyTimeout(6.0, by_caller=True)),      # the caller's deadline comes first
    (100.0, 60.0, DependencyTimeout(60.0, by_caller=False)),  # our cap comes first (100 - 5 s margin > 60)
    (65.0, 60.0, DependencyTimeout(60.0, by_caller=True)),    # a tie: the caller's budget is what ran out
])
def test_the_timeout_records_what_bounded_it(remaining, cap, expected):
    assert dependency_timeout(_Context(remaining), "the test", cap=cap) == expected


def test_no_time_left_is_deadline_exceeded_before_any_call():
    with pytest.raises(DeadlineExceeded, match="no time for the test"):
        dependency_timeout(_Context(0.0), "the test", cap=60.0)


@pytest.fixture(scope="module")
def silent_address():
    silent = socket.socket()  # accepts connections (backlog) and never speaks
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    yield f"127.0.0.1:{silent.getsockname()[1]}"
    silent.close()


def _error_of(address: str, timeout=None, cancel: bool = False) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            if cancel:
                call = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
                call.cancel()
                next(call)
            else:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as error:
            return error
    raise AssertionError("the call did not fail")


def test_a_hung_dependency_past_the_callers_deadline_is_deadline_exceeded(silent_address):
    error = _error_of(silent_address, timeout=0.2)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    mapped = dependency_failure(error, WHERE, DependencyTimeout(0.2, by_caller=True))
    assert isinstance(mapped, DeadlineExceeded) and WHERE in mapped.message


def test_a_hung_dependency_past_our_cap_is_unavailable(silent_address):
    error = _error_of(silent_address, timeout=0.2)
    mapped = dependency_failure(error, WHERE, DependencyTimeout(0.2, by_caller=False))
    assert isinstance(mapped, Unavailable) and WHERE in mapped.message and "0.2 s" in mapped.message


def test_a_deadline_the_dependency_reports_on_its_own_is_unavailable(silent_address):
    # Without a timeout of ours nothing of ours expired: DEADLINE_EXCEEDED is the dependency's failure.
    error = _error_of(silent_address, timeout=0.2)
    mapped = dependency_failure(error, WHERE, DependencyTimeout(None, by_caller=False))
    assert isinstance(mapped, Unavailable) and "DEADLINE_EXCEEDED" in mapped.message


def test_a_refusing_dependency_is_unavailable_naming_it():
    error = _error_of("127.0.0.1:1", timeout=5)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    for by_caller in (True, False):
        mapped = dependency_failure(error, WHERE, DependencyTimeout(5.0, by_caller=by_caller))
        assert isinstance(mapped, Unavailable) and WHERE in mapped.message


def test_a_cancelled_call_is_cancelled(silent_address):
    error = _error_of(silent_address, cancel=True)
    assert error.code() == grpc.StatusCode.CANCELLED
    mapped = dependency_failure(error, WHERE, DependencyTimeout(5.0, by_caller=True))
    assert isinstance(mapped, Cancelled) and WHERE in mapped.message
