"""Admission control in bytes and RetryInfo on RESOURCE_EXHAUSTED, over real gRPC on loopback."""
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from atelier.v1 import inversion_pb2

from core_fakes import wait_for
from test_core_server import Harness

pytestmark = pytest.mark.timeout(60)


def _retry_delay(error: grpc.RpcError):
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def _inflight_bytes(harness) -> float:
    return harness.metrics.registry.get_sample_value("atelier_inflight_bytes", {"service": "inversion-fake"})


def test_requests_beyond_the_byte_budget_are_refused_with_retry_info_until_bytes_free_up():
    harness = Harness(max_queue=4, step_seconds=30, max_inflight_bytes=300_000)
    try:
        assert harness.server.wait_loaded(10)
        harness.app.release.clear()
        big = inversion_pb2.InvertRequest(num_inference_steps=2, prompt="x" * 200_000)
        running = harness.stub.Invert(big, timeout=30)
        assert next(running).progress.step == 1
        assert _inflight_bytes(harness) >= 200_000
        # Two calls would fit the queue (4) but not the byte budget: refused, retryable.
        with pytest.raises(grpc.RpcError) as caught:
            list(harness.stub.Invert(big, timeout=10))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "in flight" in caught.value.details() and _retry_delay(caught.value) > 0
        small = harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=1, prompt="fits"), timeout=30)
        harness.app.release.set()
        assert list(running)[-1].HasField("result") and list(small)[-1].HasField("result")
        assert wait_for(lambda: _inflight_bytes(harness) == 0)  # released when the calls end
        assert list(harness.stub.Invert(big, timeout=30))[-1].HasField("result")
    finally:
        harness.close()


def test_an_oversized_request_is_refused_from_its_length_before_it_is_parsed():
    harness = Harness(max_inflight_bytes=100_000)
    try:
        assert harness.server.wait_loaded(10)
        # Garbled bytes: had they been parsed, protobuf would fail (INTERNAL from grpcio).
        raw = harness.channel.unary_stream("/atelier.v1.Inversion/Invert", request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as caught:
            list(raw(b"\xff" * 200_000, timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds the inversion-fake service's in-flight limit" in caught.value.details()
        assert _inflight_bytes(harness) == 0
    finally:
        harness.close()


def test_a_full_queue_answers_with_retry_info():
    harness = Harness(max_queue=0, step_seconds=30)
    try:
        assert harness.server.wait_loaded(10)
        harness.app.release.clear()
        running = harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=2), timeout=30)
        assert next(running).progress.step == 1
        with pytest.raises(grpc.RpcError) as caught:
            list(harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=2), timeout=10))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0.05 <= _retry_delay(caught.value) <= 30
        harness.app.release.set()
        assert list(running)[-1].HasField("result")
    finally:
        harness.close()
