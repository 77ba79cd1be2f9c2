"""RESOURCE_EXHAUSTED with google.rpc.RetryInfo is retried (bounded, jittered, within the
deadline); without RetryInfo it is not. Against real loopback servers."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from sdk_fakes import abort_with, default_invert

import atelier
from atelier.v1 import inversion_pb2_grpc

IMAGE = np.zeros((16, 16, 3), dtype=np.uint8)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=duration)


def test_resource_exhausted_with_retry_info_waits_at_least_the_delay_then_succeeds(fake_and_client):
    fake, client = fake_and_client
    seen = []

    def saturated_twice(request, context, attempt):
        seen.append(time.monotonic())
        if attempt <= 2:
            abort_with(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", extra_details=[retry_info(0.05)])
        yield from default_invert(request, context, attempt)

    fake.invert_behaviour = saturated_twice
    events = []
    inversion = client.inversion.invert(IMAGE, "x", num_inference_steps=2, progress=events.append)
    assert fake.attempts == 3 and inversion.num_inference_steps == 2
    # The server's delay is a floor for each wait (the gap also holds the round trip).
    assert all(later - earlier >= 0.05 for earlier, later in zip(seen, seen[1:]))
    assert [e.message.split(":")[0] for e in events if e.stage == "retry"] == ["retrying after RESOURCE_EXHAUSTED"] * 2


def test_resource_exhausted_without_retry_info_is_not_retried(fake_and_client):
    fake, client = fake_and_client

    def too_large(request, context, attempt):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger than max")
        yield  # pragma: no cover

    fake.invert_behaviour = too_large
    with pytest.raises(atelier.ResourceExhaustedError):
        client.inversion.invert(IMAGE, "x")
    assert fake.attempts == 1


def test_a_retry_delay_past_the_deadline_fails_at_once(servers):
    fake, _, address = servers()

    def saturated(request, context, attempt):
        abort_with(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", extra_details=[retry_info(30.0)])
        yield  # pragma: no cover

    fake.invert_behaviour = saturated
    with atelier.Client(address, timeout=2.0) as client:
        started = time.monotonic()
        with pytest.raises(atelier.ResourceExhaustedError) as caught:
            client.inversion.invert(IMAGE, "x")
    assert fake.attempts == 1 and caught.value.retry_delay == 30.0
    assert time.monotonic() - started < 2.0  # it did not sleep into the deadline


class OneAtATime(inversion_pb2_grpc.InversionServicer):
    """A server with room for one call: others are refused with RetryInfo, as a full queue is."""

    def __init__(self, delay: float):
        self.slot = threading.Semaphore(1)
        self.delay = delay
        self.refused = 0
        self.lock = threading.Lock()

    def Invert(self, request, context):
        if not self.slot.acquire(blocking=False):
            with self.lock:
                self.refused += 1
            abort_with(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "compute queue full",
                       extra_details=[retry_info(self.delay)])
        try:
            time.sleep(0.02)  # the work
            yield from default_invert(request, context, 1)
        finally:
            self.slot.release()


@pytest.fixture
def one_at_a_time():
    servicer = OneAtATime(delay=0.01)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    inversion_pb2_grpc.add_InversionServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_a_burst_against_a_full_server_completes_through_retry_info(one_at_a_time):
    servicer, address = one_at_a_time
    policy = atelier.RetryPolicy(max_attempts=50, initial_backoff=0.005, max_backoff=0.05)
    with atelier.Client(address, retries=policy, timeout=60) as client:
        with futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda i: client.inversion.invert(IMAGE, f"x{i}", num_inference_steps=1), range(8)))
    assert [r.prompt for r in results] == [f"x{i}" for i in range(8)]
    assert servicer.refused > 0  # the burst did hit the full server
