"""Core hardening over real gRPC on loopback: undecodable requests, bounded error details,
deadline accounting, port reuse, the health watchdog, reflection v1, threads, logs."""
import base64
import logging
import os
import urllib.parse

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from atelier.core import errors
from atelier.core.config import ServerConfig, cpu_limit
from atelier.core.metrics import Metrics
from atelier.core.reflection import V1_SERVICE_NAME
from atelier.core.server import quiet_third_party_logs, start
from atelier.v1 import inversion_pb2

from core_fakes import ECHO_METHOD, FakeInversionApp
from core_fakes import wait_for
from test_core_server import Harness, _handled, _violations

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def harness():
    h = Harness(health_interval_seconds=0.05, wedged_after_seconds=0.3)
    assert h.server.wait_loaded(10)
    yield h
    h.close()


def _raw(channel, method, streaming_response):
    make = channel.unary_stream if streaming_response else channel.unary_unary
    return make(method)  # no serializers: bytes in, bytes out


@pytest.mark.parametrize("method, streaming", [
    ("/atelier.v1.Inversion/Invert", True),
    (ECHO_METHOD, False),
    ("/grpc.health.v1.Health/Check", False),
    ("/grpc.health.v1.Health/Watch", True),
])
def test_undecodable_request_bytes_are_invalid_argument(harness, method, streaming):
    call = _raw(harness.channel, method, streaming)
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11):
        with pytest.raises(grpc.RpcError) as caught:
            result = call(garbage, timeout=5)
            if streaming:
                list(result)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert harness.health_status() == SERVING


def test_undecodable_stream_request_on_reflection_is_invalid_argument(harness):
    call = harness.channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter([b"\xff\xff\xff"]), timeout=5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_many_long_violations_stay_under_the_trailer_limit(harness):
    with pytest.raises(grpc.RpcError) as caught:
        list(harness.stub.Invert(inversion_pb2.InvertRequest(prompt="many violations"), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    violations = _violations(caught.value)
    assert violations[0][0] == "points[0]" and len(violations[0][1]) <= errors.MAX_DESCRIPTION_CHARS
    assert violations[-1] == ("", f"{40 - (len(violations) - 1)} more violations omitted")
    assert len(caught.value.details()) <= errors.MAX_MESSAGE_CHARS


def test_status_details_are_bounded_whatever_the_error_holds():
    error = errors.InvalidArgument.many((f"field{i}" * 100, "\u00e9" * 5000) for i in range(500))
    status = errors.to_grpc_status(error)
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert len(status.details) <= errors.MAX_MESSAGE_CHARS
    # On the wire: details base64-encoded, the message percent-encoded; gRPC's limit is 8 KiB.
    wire = len(base64.b64encode(details)) + len(urllib.parse.quote(status.details.encode()))
    assert wire < 7 * 1024, wire
    assert errors.shorten("a" * 10_000, 40).endswith("... (10000 chars)") and len(errors.shorten("a" * 10_000, 40)) == 40


def test_client_deadline_is_counted_deadline_exceeded_not_cancelled():
    # Each step outlasts the deadline: the client's own deadline ends the call before the
    # server's code notices, so only the metrics interceptor can tell what happened.
    h = Harness(step_seconds=2.0)
    try:
        assert h.server.wait_loaded(10)
        h.app.release.clear()
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                list(h.stub.Invert(inversion_pb2.InvertRequest(num_inference_steps=100), timeout=0.3))
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        key = ("Invert", "server_stream", "DeadlineExceeded")
        assert wait_for(lambda: _handled(h)[0].get(key) == 3), _handled(h)[0]
        assert _handled(h)[0].get(("Invert", "server_stream", "Canceled"), 0) == 0
    finally:
        h.close()


class _EndingContext:
    """A ServicerContext at the moment a client's deadline ends the call: gRPC reports a
    cancel and, since the server received the call a little after the client sent it, its
    own clock still shows a little time left."""

    def __init__(self, budget):
        self.remaining = budget
        self.callbacks = []

    def time_remaining(self):
        return self.remaining

    def add_callback(self, callback):
        self.callbacks.append(callback)
        return True

    def code(self):
        return None

    def end(self, remaining):
        self.remaining = remaining
        for callback in self.callbacks:
            callback()


@pytest.mark.parametrize("budget, remaining_at_end, expected", [
    (1.0, 0.004, "DeadlineExceeded"),  # the client's deadline, seen 4 ms early
    (1.0, -0.01, "DeadlineExceeded"),
    (1.0, 0.6, "Canceled"),  # a client cancel well before the deadline
    (None, None, "Canceled"),  # no deadline at all
])
def test_metrics_tell_a_client_deadline_from_a_cancel(budget, remaining_at_end, expected):
    from atelier.core.interceptors import MetricsInterceptor

    metrics = Metrics(CollectorRegistry())
    handler = grpc.unary_stream_rpc_method_handler(lambda request, context: iter((b"progress", b"result")))
    details = type("Details", (), {"method": "/atelier.v1.Inversion/Invert", "invocation_metadata": ()})()
    wrapped = MetricsInterceptor(metrics).intercept_service(lambda _: handler, details)
    context = _EndingContext(budget if budget is not None else 10 * 365 * 24 * 3600.0)
    assert next(wrapped.unary_stream(b"", context)) == b"progress"  # the client leaves mid-stream
    context.end(remaining_at_end if remaining_at_end is not None else 10 * 365 * 24 * 3600.0)
    counted = {sample.labels["grpc_code"]: sample.value for family in metrics.registry.collect()
               if family.name == "grpc_server_handled" for sample in family.samples
               if sample.name == "grpc_server_handled_total"}
    assert counted == {expected: 1.0}


def test_a_second_server_on_the_same_port_fails_to_start(harness):
    port = harness.server.port
    config = ServerConfig(service="inversion", host="127.0.0.1", port=port, metrics_port=-1)
    app = FakeInversionApp(metrics=Metrics(CollectorRegistry()))
    with pytest.raises(OSError, match=str(port)):
        start(app, config, metrics=Metrics(CollectorRegistry()))
    app.close()


def test_health_is_not_serving_while_the_worker_is_wedged(harness):
    harness.app.release.clear()
    call = harness.stub.Invert(inversion_pb2.InvertRequest(prompt="hang"), timeout=0.2)
    with pytest.raises(grpc.RpcError):
        list(call)
    # The call's code ignores its control: it runs on past its deadline, then past the
    # wedge threshold (0.3 s), and nothing else can run meanwhile.
    assert wait_for(lambda: harness.health_status() == NOT_SERVING, 10)
    assert harness.health_status("atelier.v1.Inversion") == NOT_SERVING
    harness.app.release.set()
    assert wait_for(lambda: harness.health_status() == SERVING, 10)


def test_executor_reports_a_dead_worker():
    app = FakeInversionApp()
    executor = app.executor
    assert executor.wedged(1.0) is None
    executor._ensure_worker()
    worker = executor._worker
    with executor._condition:  # the worker waits for work; pretend it died holding a call
        executor._running = 1
        executor._closed = True
        executor._condition.notify_all()
    worker.join(5)
    executor._closed = False
    assert "died" in executor.wedged(1.0)


def test_ready_is_logged_and_served_only_when_the_backend_is_up(caplog):
    caplog.set_level(logging.INFO, logger="atelier.core.server")
    h = Harness(health_interval_seconds=0.05, hold_load=True)
    try:
        h.app.backend_ready = False
        h.app.loaded.set()
        assert h.server.wait_loaded(10)
        assert wait_for(lambda: "backend down" in caplog.text, 5)
        assert h.health_status() == NOT_SERVING
        assert "ready on" not in caplog.text
        h.app.backend_ready = True
        assert wait_for(lambda: h.health_status() == SERVING, 5)
        assert wait_for(lambda: "ready on" in caplog.text, 5)
    finally:
        h.close()


def _v1_reflection_messages():
    """Message classes of grpc.reflection.v1 built from the descriptor the server registers
    (grpcio-reflection ships no v1 stubs): a genuine v1 client, not the v1alpha one."""
    pool = descriptor_pool.Default()
    request = pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    response = pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    return message_factory.GetMessageClass(request), message_factory.GetMessageClass(response)


def test_reflection_v1_lists_and_describes_services(harness):
    request_class, response_class = _v1_reflection_messages()
    call = harness.channel.stream_stream(
        f"/{V1_SERVICE_NAME}/ServerReflectionInfo",
        request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString)
    responses = list(call(iter([request_class(list_services=""),
                                request_class(file_containing_symbol="atelier.v1.Inversion")]), timeout=10))
    names = {service.name for service in responses[0].list_services_response.service}
    assert {"atelier.v1.Inversion", "grpc.health.v1.Health", V1_SERVICE_NAME,
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto


def test_threads_come_from_flags_env_or_the_cgroup_limit(tmp_path):
    assert ServerConfig.from_args(["--threads", "3"], "inversion", environ={}).threads == 3
    assert ServerConfig.from_args([], "inversion", environ={"ATELIER_THREADS": "2"}).threads == 2
    with pytest.raises(SystemExit):
        ServerConfig.from_args(["--threads", "0"], "inversion", environ={})
    available = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2 threads
    assert cpu_limit(str(v2)) == min(2, available)
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a CPU -> 1
    assert cpu_limit(str(v2)) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_limit(str(v2)) == available
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_limit(str(tmp_path / "v1")) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_limit(str(tmp_path / "v1")) == available
    assert cpu_limit(str(tmp_path / "none")) == available
    assert ServerConfig(service="x").resolved_threads(str(v2), environ={}) == available
    assert ServerConfig(service="x").resolved_threads(str(v2), environ={"OMP_NUM_THREADS": "3"}) == 3
    assert ServerConfig(service="x", threads=5).resolved_threads(str(v2), environ={"OMP_NUM_THREADS": "3"}) == 5


def test_server_start_applies_the_thread_setting():
    import torch

    before = torch.get_num_threads()
    h = Harness(threads=1)
    try:
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        h.close()
        torch.set_num_threads(before)


def test_server_logs_show_no_progress_bars_or_third_party_warnings():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    quiet_third_party_logs()
    assert not diffusers_logging.is_progress_bar_enabled()
    assert not transformers_logging.is_progress_bar_enabled()
    assert logging.getLogger("torchvision").getEffectiveLevel() >= logging.ERROR


def test_tensors_with_too_many_dims_are_codec_errors_naming_the_field(harness):
    from atelier.sdk import codec
    from atelier.v1 import tensor_pb2

    message = tensor_pb2.Tensor(datatype="FP32", shape=[1] * 65, raw=b"\0\0\0\0")
    with pytest.raises(codec.CodecError) as caught:  # numpy raised ValueError from reshape
        codec.tensor_to_numpy(message, "z_t")
    assert caught.value.field == "z_t.shape"
    with pytest.raises(grpc.RpcError) as error:
        harness.echo(message, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(error.value)[0][0] == "tensor.shape"


def test_image_errors_carry_no_heap_addresses():
    from atelier.sdk import codec
    from atelier.v1 import tensor_pb2

    with pytest.raises(codec.CodecError) as caught:
        codec.image_to_pil(tensor_pb2.Image(encoding=tensor_pb2.Image.PNG, data=b"\x89PNG\r\n\x1a\nnot really"))
    assert "0x" not in str(caught.value) and "BytesIO" not in str(caught.value), caught.value
    assert caught.value.field == "image.data"


def test_loading_models_in_a_server_process_writes_no_bars_or_warnings():
    import subprocess
    import sys

    script = (
        "from atelier.core.server import quiet_third_party_logs\n"
        "quiet_third_party_logs()\n"
        "from atelier.core.models import ModelRegistry\n"
        "from atelier.segmentation.sam import SamPredictor\n"
        "SamPredictor.load(ModelRegistry().resolve('toy-sam'))\n"
        "ModelRegistry().load_sd('toy')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    # Without it: "Loading pipeline components...: 40%|..." with carriage returns, and
    # transformers' "requires torchvision (not installed)" notes, on every start.
    assert "\r" not in done.stderr and "Loading" not in done.stderr and "torchvision" not in done.stderr, done.stderr


def test_model_errors_name_only_the_callers_model(monkeypatch):
    from atelier.core.errors import AtelierError
    from atelier.core.models import ModelRegistry

    monkeypatch.delenv("ATELIER_ALLOW_DOWNLOADS", raising=False)
    registry = ModelRegistry({"gone": "/srv/secret/models/gone", "hub": "some-org/uncached-model"})
    for name in ("nope", "gone", "hub"):
        with pytest.raises(AtelierError) as caught:
            registry.check(name)
        message = caught.value.message
        assert f"'{name}'" in message, message
        for secret in ("/srv", "some-org", "toy,", "known:"):  # folders, hub ids, the model list
            assert secret not in message, message
