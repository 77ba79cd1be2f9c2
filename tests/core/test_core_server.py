"""The server bootstrap over real gRPC on loopback: health, reflection, metrics,
error statuses, deadlines, cancellation, the bounded queue, drain."""
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.server import start
from atelier.sdk import channel_options, codec
from atelier.v1 import inversion_pb2, inversion_pb2_grpc, tensor_pb2

from core_fakes import ECHO_METHOD, FakeInversionApp, wait_for

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _config(**overrides):
    values = dict(service="inversion", host="127.0.0.1", port=0, metrics_port=0, max_queue=4, grace_seconds=10)
    values.update(overrides)
    return ServerConfig(**values)


class Harness:
    def __init__(self, max_queue=4, step_seconds=0.005, hold_load=False, **config):
        self.metrics = Metrics(CollectorRegistry())
        self.app = FakeInversionApp(max_queue=max_queue, metrics=self.metrics, step_seconds=step_seconds)
        if hold_load:
            self.app.loaded.clear()
        else:
            self.app.release.set()
        self.server = start(self.app, _config(max_queue=max_queue, **config), metrics=self.metrics)
        self.channel = grpc.insecure_channel(self.server.address, options=channel_options.client_options())
        self.stub = inversion_pb2_grpc.InversionStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.echo = self.channel.unary_unary(ECHO_METHOD, request_serializer=tensor_pb2.Tensor.SerializeToString,
                                             response_deserializer=tensor_pb2.Tensor.FromString)

    def health_status(self, service=""):
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def evaluations(self):
        with self.app.lock:
            return self.app.evaluations

    def close(self):
        self.app.release.set()
        self.app.loaded.set()
        self.server.stop(grace=5)
        self.channel.close()


@pytest.fixture
def harness():
    h = Harness()
    assert h.server.wait_loaded(10)
    yield h
    h.close()


def _violations(error):
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details on the error"
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            return [(v.field, v.description) for v in bad_request.field_violations]
    return []


def test_streams_progress_then_exactly_one_result(harness):
    image = codec.image_from_array(np.zeros((16, 24, 3), np.uint8))
    events = list(harness.stub.Invert(inversion_pb2.InvertRequest(image=image, num_inference_steps=5), timeout=20))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress"] * 5 + ["result"]
    assert [e.progress.step for e in events[:5]] == [1, 2, 3, 4, 5]
    result = events[-1].result
    assert (result.width, result.height, result.usage.unet_forward_evaluations) == (24, 16, 5)
    np.testing.assert_array_equal(codec.tensor_to_numpy(result.z_t, "z_t"), np.full((1, 4, 2, 3), 5, np.float32))


def test_unary_call_and_large_messages(harness):
    values = np.arange(1_200_000, dtype=np.float32)  # 4.8 MB: beyond gRPC's 4 MiB default
    doubled = harness.echo(codec.tensor_from_numpy(values), timeout=30)
    np.testing.assert_array_equal(codec.tensor_to_numpy(doubled), values * 2)


def test_message_size_limit_is_configurable():
    harness = Harness(max_message_bytes=1 << 20)
    try:
        assert harness.server.wait_loaded(10)
        with pytest.raises(grpc.RpcError) as caught:
            harness.echo(codec.tensor_from_numpy(np.zeros(300_000, np.float32)), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        harness.close()


def test_invalid_argument_carries_field_violations(harness):
    cases = [
        (inversion_pb2.InvertRequest(num_inference_steps=0), "num_inference_steps"),
        (inversion_pb2.InvertRequest(image=tensor_pb2.Image(data=b"junk")), "image.encoding"),
        (inversion_pb2.InvertRequest(image=codec.image_from_array(np.zeros((12, 16, 3), np.uint8))), "image.height"),
        (inversion_pb2.InvertRequest(image=codec.image_from_array(np.zeros((128, 128, 3), np.uint8))), "image.width"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as caught:
            list(harness.stub.Invert(request, timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in _violations(caught.value)] == [field]
        assert field in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        harness.echo(tensor_pb2.Tensor(datatype="FP32", shape=[3, -1]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(caught.value)[0][0] == "tensor.shape"


def test_not_found_and_internal_errors(harness, caplog):
    with pytest.raises(grpc.RpcError) as caught:
        list(harness.stub.Invert(inversion_pb2.InvertRequest(model={"name": "nope"}, num_inference_steps=2), timeout=10))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        list(harness.stub.Invert(inversion_pb2.InvertRequest(prompt="boom", num_inference_steps=2), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details() and "incident" in caught.value.details()
    incident = caught.value.details().split("incident ")[1].split(")")[0]
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and "secret internal detail" in str(logged[0].exc_info[1])


def _run_until_stopped(harness, stop):
    """Start a long call, let it make progress, apply ``stop``; return the status
    code, the evaluation count when the client saw the end, and the final count."""
    harness.app.release.clear()
    harness.app.step_seconds = 0.02
    call = harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=100_000), timeout=stop.get("timeout"))
    code = None
    try:
        for index, event in enumerate(call):
            if index == 3 and stop.get("cancel"):
                call.cancel()
    except grpc.RpcError as error:
        code = error.code()
    seen = harness.evaluations()
    assert wait_for(lambda: not harness.app.executor.busy())
    return code, seen, harness.evaluations()


def test_deadline_mid_run_stops_within_one_evaluation(harness):
    code, seen, final = _run_until_stopped(harness, {"timeout": 0.5})
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen > 0 and final <= seen + 1


def test_client_cancel_stops_within_one_evaluation(harness):
    code, seen, final = _run_until_stopped(harness, {"cancel": True})
    assert code == grpc.StatusCode.CANCELLED
    assert seen >= 4 and final <= seen + 1


def test_full_queue_is_resource_exhausted():
    harness = Harness(max_queue=1, step_seconds=30)
    try:
        assert harness.server.wait_loaded(10)
        harness.app.release.clear()
        running = harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=2), timeout=30)
        assert next(running).progress.step == 1  # on the executor, waiting inside step 1
        queued = harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=2), timeout=30)
        queued_events = []
        def read_queued():
            try:
                queued_events.extend(queued)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.CANCELLED

        reader = threading.Thread(target=read_queued)
        reader.start()
        assert wait_for(lambda: harness.app.executor.queue_depth() == 1)
        with pytest.raises(grpc.RpcError) as caught:
            list(harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=2), timeout=10))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already waiting" in caught.value.details()
        # A queued call whose client gives up leaves the queue at once.
        queued.cancel()
        reader.join(10)
        assert wait_for(lambda: harness.app.executor.queue_depth() == 0)
        replacement = harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=2), timeout=30)
        harness.app.release.set()
        assert list(running)[-1].HasField("result")
        assert list(replacement)[-1].result.usage.unet_forward_evaluations == 2
        assert queued_events == [] and harness.evaluations() == 4
    finally:
        harness.close()


def test_health_not_serving_while_loading_then_serving():
    harness = Harness(hold_load=True)
    try:
        for service in ("", "atelier.v1.Inversion"):
            assert harness.health_status(service) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            list(harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=1), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in caught.value.details()
        harness.app.loaded.set()
        assert harness.server.wait_loaded(10) and harness.server.load_error is None
        for service in ("", "atelier.v1.Inversion"):
            assert harness.health_status(service) == SERVING
    finally:
        harness.close()


def test_drain_reports_not_serving_and_lets_in_flight_calls_finish():
    harness = Harness(step_seconds=30)
    assert harness.server.wait_loaded(10)
    harness.app.release.clear()
    in_flight = harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=3), timeout=30)
    assert next(in_flight).progress.step == 1
    stopper = threading.Thread(target=harness.server.stop, kwargs={"grace": 20})
    stopper.start()
    try:
        assert wait_for(lambda: harness.health_status() == NOT_SERVING)
        assert harness.health_status("atelier.v1.Inversion") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            list(harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=1), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in caught.value.details()
        assert stopper.is_alive()  # still draining: the call holds it
    finally:
        harness.app.release.set()
    rest = list(in_flight)
    assert rest[-1].HasField("result") and rest[-1].result.usage.unet_forward_evaluations == 3
    stopper.join(20)
    assert not stopper.is_alive() and harness.app.closed and harness.server.wait(0)
    harness.channel.close()


def test_reflection_lists_the_services(harness):
    stub = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"atelier.v1.Inversion", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    received = 'grpc_server_msg_received_total{grpc_method="ServerReflectionInfo",' \
               'grpc_service="grpc.reflection.v1alpha.ServerReflection",grpc_type="bidi_stream"} 1.0'
    assert wait_for(lambda: received in _handled(harness)[1])


def _handled(harness):
    text = urllib.request.urlopen(f"http://127.0.0.1:{harness.server.metrics_port}/metrics", timeout=10).read().decode()
    counts = {}
    for family in text_string_to_metric_families(text):
        if family.name == "grpc_server_handled":
            for sample in family.samples:
                if sample.name == "grpc_server_handled_total":
                    key = (sample.labels["grpc_method"], sample.labels["grpc_type"], sample.labels["grpc_code"])
                    counts[key] = sample.value
    return counts, text


def test_metrics_endpoint_counts_handled_calls_with_codes(harness):
    list(harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=2), timeout=10))
    list(harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=3), timeout=10))
    with pytest.raises(grpc.RpcError):
        list(harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=0), timeout=10))
    harness.echo(codec.tensor_from_numpy(np.ones(2, np.float32)), timeout=10)
    harness.app.release.clear()
    harness.app.step_seconds = 0.02
    with pytest.raises(grpc.RpcError):
        list(harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=100_000), timeout=0.3))
    cancelled = harness.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=100_000), timeout=10)
    next(cancelled)
    cancelled.cancel()
    expected = {
        ("Invert", "server_stream", "Canceled"): 1,
        ("Invert", "server_stream", "OK"): 2,
        ("Invert", "server_stream", "InvalidArgument"): 1,
        ("Invert", "server_stream", "DeadlineExceeded"): 1,
        ("Double", "unary", "OK"): 1,
    }
    # Termination callbacks run just after the client sees the status: poll briefly.
    assert wait_for(lambda: all(_handled(harness)[0].get(k) == v for k, v in expected.items())), _handled(harness)[0]
    text = _handled(harness)[1]
    assert 'grpc_server_started_total{grpc_method="Invert",grpc_service="atelier.v1.Inversion",' \
           'grpc_type="server_stream"} 5.0' in text
    assert "grpc_server_handling_seconds_bucket" in text
    assert 'atelier_unet_evaluations_total{kind="forward"}' in text
    assert 'atelier_queue_depth{service="inversion"} 0.0' in text
    assert wait_for(lambda: not harness.app.executor.busy())
