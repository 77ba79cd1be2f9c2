"""Fuzz every RPC of every service (fuzz_services.TARGETS) on real loopback servers.

Each RPC gets requests from the one shared strategy of its request type (fuzz_strategies)
and must never answer INTERNAL or UNKNOWN; afterwards the server is still SERVING and its
compute queue is empty. Undecodable request bytes must be INVALID_ARGUMENT. The example
count per RPC is bounded (ATELIER_FUZZ_EXAMPLES, default 20) and every call has a short
deadline, so the whole module runs in well under a minute; examples are derandomized so a
failure reproduces (ATELIER_FUZZ_RANDOM=1 explores new ones). Hypothesis prints the smallest
failing request. How a service joins: see fuzz_services.py (one list, TARGETS).
"""
from __future__ import annotations

import collections
import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.server import start
from atelier.sdk import channel_options
from fuzz_services import TARGETS
from fuzz_strategies import message_strategy

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("ATELIER_FUZZ_EXAMPLES", "20"))
# Derandomized by default (a failure reproduces); ATELIER_FUZZ_RANDOM=1 explores new examples.
DERANDOMIZE = os.environ.get("ATELIER_FUZZ_RANDOM", "") != "1"
CALL_TIMEOUT_SECONDS = 1.0
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)

RPCS = [(target, service, method) for target in TARGETS for service, method in target.methods()]
RPC_IDS = [f"{target.name}:{method.name}" for target, _, method in RPCS]


class Servers:
    """One real server per target, started on first use, stopped at the end of the module."""

    def __init__(self):
        self._running = {}

    def get(self, target):
        if target.name not in self._running:
            metrics = Metrics(CollectorRegistry())
            values = dict(service=target.name, host="127.0.0.1", port=0, metrics_port=-1,
                          max_queue=4, grace_seconds=2, max_image_pixels=128 * 128)
            values.update(target.config)
            config = ServerConfig(**values)
            running = start(target.build(config, metrics), config, metrics)
            assert running.wait_loaded(240) and running.load_error is None, running.load_error
            channel = grpc.insecure_channel(running.address, options=channel_options.client_options())
            seeds = target.seeds(running, channel) if target.seeds is not None else {}
            self._running[target.name] = (running, channel, seeds)
        return self._running[target.name]

    def close(self):
        for running, channel, _ in self._running.values():
            channel.close()
            running.stop(2)


@pytest.fixture(scope="module")
def servers():
    servers = Servers()
    yield servers
    servers.close()


@st.composite
def _mutated(draw, seeds, generic):
    """A seed request with a random subset of its fields replaced by a generic request's."""
    request = type(seeds[0])()
    request.CopyFrom(draw(st.sampled_from(seeds)))
    fuzzed = draw(generic)
    for field, _ in fuzzed.ListFields():
        if draw(st.integers(0, 99)) < 30:
            part = type(request)()
            part.MergeFrom(fuzzed)
            for other, _ in part.ListFields():
                if other.name != field.name:
                    part.ClearField(other.name)
            request.ClearField(field.name)
            request.MergeFrom(part)
    return request


def _request_strategy(method, seeds):
    generic = message_strategy(method.input_type)
    seeds = seeds.get(method.name)
    if not seeds:
        return generic
    # half mutated well-formed requests (they reach the work), half generic ones
    return st.one_of(_mutated(seeds, generic), generic)


def _callable(channel, service, method, serialize=True):
    path = f"/{service.full_name}/{method.name}"
    kind = (method.client_streaming, method.server_streaming)
    make = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[kind]
    if not serialize:
        return make(path)  # bytes in, bytes out
    return make(path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=lambda b: b)


def _invoke(call, method, request) -> grpc.StatusCode:
    try:
        argument = iter([request]) if method.client_streaming else request
        result = call(argument, timeout=CALL_TIMEOUT_SECONDS)
        if method.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _assert_healthy(target, running, channel):
    if target.settle is not None:
        target.settle(running, channel)
    executor = getattr(running.app, "executor", None)
    deadline = time.monotonic() + 20
    while executor is not None and (executor.busy() or executor.queue_depth()) and time.monotonic() < deadline:
        time.sleep(0.02)
    if executor is not None:
        assert executor.queue_depth() == 0 and not executor.busy(), "the compute queue did not drain"
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_every_service_in_protos_is_fuzzed():
    """A service added to protos/atelier/v1 without a FuzzTarget would go unfuzzed silently."""
    import re
    from pathlib import Path

    protos = Path(__file__).resolve().parents[2] / "protos" / "atelier" / "v1"
    declared = {f"atelier.v1.{name}" for path in protos.glob("*.proto")
                for name in re.findall(r"^service\s+(\w+)", path.read_text(), re.MULTILINE)}
    assert declared and declared == {service.full_name for _, service, _ in RPCS}


@pytest.mark.parametrize("target, service, method", RPCS, ids=RPC_IDS)
def test_fuzzed_requests_never_fail_internally(servers, target, service, method):
    running, channel, seeds = servers.get(target)
    call = _callable(channel, service, method)
    codes = collections.Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              phases=(Phase.explicit, Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))
    @given(request=_request_strategy(method, seeds))
    def fuzz(request):
        code = _invoke(call, method, request)
        codes[code.name] += 1
        assert code not in FORBIDDEN, f"{method.full_name} answered {code.name}"

    fuzz()
    print(f"{method.full_name}: {dict(codes)}")
    _assert_healthy(target, running, channel)


@pytest.mark.parametrize("target, service, method", RPCS, ids=RPC_IDS)
def test_garbled_request_bytes_are_invalid_argument(servers, target, service, method):
    running, channel, _ = servers.get(target)
    call = _callable(channel, service, method, serialize=False)
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x7fshort", b"\x12\x02\x08"):
        assert _invoke(call, method, garbage) == grpc.StatusCode.INVALID_ARGUMENT
    _assert_healthy(target, running, channel)
