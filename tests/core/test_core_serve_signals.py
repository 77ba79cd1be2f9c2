"""serve() in a real process: SIGTERM drains in-flight calls, then exit 0."""
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atelier.v1 import inversion_pb2, inversion_pb2_grpc

pytestmark = pytest.mark.timeout(60)

FAKE = os.path.join(os.path.dirname(__file__), "core_fakes.py")


def _spawn(*flags):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, FAKE, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", *flags],
        stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    return process, lines


def _wait_for_line(lines, pattern, timeout=30):
    log = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line matching {pattern!r}; log so far: {''.join(log)}")
        log.append(line)
        match = re.search(pattern, line)
        if match:
            return match


def test_sigterm_drains_in_flight_call_and_exits_zero():
    process, lines = _spawn("--grace-seconds", "30", "--step-seconds", "0.05")
    try:
        port = _wait_for_line(lines, r"listening on 127\.0\.0\.1:(\d+)").group(1)
        _wait_for_line(lines, r"ready on")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = inversion_pb2_grpc.InversionStub(channel).Invert(inversion_pb2.InvertRequest(num_inference_steps=20), timeout=30)
            assert next(call).progress.step == 1
            process.send_signal(signal.SIGTERM)
            _wait_for_line(lines, r"draining")
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            events = list(call)
        assert events[-1].HasField("result") and events[-1].result.usage.unet_forward_evaluations == 20
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_failed_load_exits_nonzero():
    process, lines = _spawn("--fail-load")
    try:
        _wait_for_line(lines, r"loading failed")
        assert process.wait(30) == 1
    finally:
        if process.poll() is None:
            process.kill()


def test_calls_cut_off_after_the_grace_period_exit_nonzero():
    process, lines = _spawn("--grace-seconds", "0.5", "--step-seconds", "0.05")
    try:
        port = _wait_for_line(lines, r"listening on 127\.0\.0\.1:(\d+)").group(1)
        _wait_for_line(lines, r"ready on")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = inversion_pb2_grpc.InversionStub(channel).Invert(inversion_pb2.InvertRequest(num_inference_steps=10_000), timeout=30)
            assert next(call).progress.step == 1
            process.send_signal(signal.SIGTERM)
            _wait_for_line(lines, r"grace period over")
            with pytest.raises(grpc.RpcError):
                list(call)
        assert process.wait(30) == 2
    finally:
        if process.poll() is None:
            process.kill()
