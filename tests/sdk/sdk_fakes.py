"""A real in-process gRPC server on 127.0.0.1 with a scripted fake Inversion servicer.

Each test scripts the servicer through ``FakeInversion.invert_behaviour`` /
``edit_behaviour``: a generator ``(request, context, attempt) -> events``. The fake
records every request, its metadata and whether the server saw the call end early.
"""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import atelier
from atelier.sdk import codec
from atelier.v1 import common_pb2, inversion_pb2, inversion_pb2_grpc

LATENT_SHAPE = (1, 4, 2, 3)
ECHO_SERVICE = "atelier.test.Echo"


def latent_for(prompt: str) -> np.ndarray:
    """A deterministic z_T the fake returns, so tests can check the decoding."""
    return np.arange(np.prod(LATENT_SHAPE), dtype=np.float32).reshape(LATENT_SHAPE) + len(prompt)


def progress_event(stage: str, step: int, total: int, message: str = "") -> common_pb2.Progress:
    return common_pb2.Progress(stage=stage, step=step, total=total, message=message, elapsed_seconds=0.5 * step)


def inversion_result(request: inversion_pb2.InvertRequest) -> inversion_pb2.InversionResult:
    steps = request.num_inference_steps if request.HasField("num_inference_steps") else 50
    z_t = latent_for(request.prompt)
    result = inversion_pb2.InversionResult(
        model=common_pb2.ModelRef(name=request.model.name or "toy"),
        prompt=request.prompt,
        method=request.method or inversion_pb2.SPDINV,
        num_inference_steps=steps,
        width=24,
        height=16,
        z_t=codec.tensor_from_numpy(z_t, name="z_T"),
        usage=common_pb2.Usage(unet_forward_evaluations=7, unet_backward_evaluations=5, wall_seconds=1.5),
    )
    if request.return_chain:
        chain = np.stack([z_t[0] * k for k in range(steps + 1)]).astype(np.float32)
        result.chain.CopyFrom(codec.tensor_from_numpy(chain, name="chain"))
    for index in range(1, steps + 1):
        result.diagnostics.add(index=index, timestep=20 * index, residual=1e-3 / index, rounds=index % 3)
    return result


def default_invert(request, context, attempt):
    steps = request.num_inference_steps if request.HasField("num_inference_steps") else 50
    for step in (1, 2):
        yield inversion_pb2.InvertEvent(progress=progress_event("invert", step, steps))
    yield inversion_pb2.InvertEvent(result=inversion_result(request))


def default_edit(request, context, attempt):
    yield inversion_pb2.EditEvent(progress=progress_event("edit", 1, 1))
    red = codec.image_from_array(np.full((16, 24, 3), (200, 10, 10), dtype=np.uint8))
    result = inversion_pb2.EditResult(image=red, usage=common_pb2.Usage(unet_forward_evaluations=3))
    if request.return_source:
        result.source_image.CopyFrom(codec.image_from_array(np.zeros((16, 24, 3), dtype=np.uint8)))
    yield inversion_pb2.EditEvent(result=result)


def abort_with(context, code: grpc.StatusCode, message: str, violations=(), extra_details=()):
    """End the call with a google.rpc.Status carrying BadRequest field violations."""
    details = []
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in violations
            ]
        )
        details.append(bad_request)
    details.extend(extra_details)
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed)))


class FakeInversion(inversion_pb2_grpc.InversionServicer):
    def __init__(self):
        self.invert_behaviour = default_invert
        self.edit_behaviour = default_edit
        self.lock = threading.Lock()
        self.requests: list = []
        self.metadata: list[dict] = []
        self.time_remaining: list = []
        self.attempts = 0
        self.started = threading.Event()  # a call reached the handler
        self.ended_early = threading.Event()  # the server saw a call terminate before the handler finished
        self.handler_done = threading.Event()

    def _run(self, behaviour, request, context):
        with self.lock:
            self.attempts += 1
            attempt = self.attempts
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            self.time_remaining.append(context.time_remaining())
        finished = threading.Event()
        context.add_callback(lambda: None if finished.is_set() else self.ended_early.set())
        self.started.set()
        try:
            yield from behaviour(request, context, attempt)
        finally:
            finished.set()
            self.handler_done.set()

    def Invert(self, request, context):
        yield from self._run(self.invert_behaviour, request, context)

    def Edit(self, request, context):
        yield from self._run(self.edit_behaviour, request, context)


def wait_until_terminated(context, bound_seconds: float = 30.0) -> None:
    """Block the handler until the RPC ends (cancel or deadline); the bound only prevents a hang."""
    ended = threading.Event()
    context.add_callback(ended.set)
    ended.wait(bound_seconds)


class Echo:
    """A unary method for testing ``_Transport.unary``: returns the ModelRef it gets."""

    def __init__(self):
        self.behaviour = lambda request, context, attempt: request
        self.attempts = 0
        self.started = threading.Event()

    def __call__(self, request, context):
        self.attempts += 1
        self.started.set()
        return self.behaviour(request, context, self.attempts)


def echo_method(transport):
    return transport.channel.unary_unary(
        f"/{ECHO_SERVICE}/Ping",
        request_serializer=common_pb2.ModelRef.SerializeToString,
        response_deserializer=common_pb2.ModelRef.FromString,
    )


@pytest.fixture
def servers():
    """Starts servers on 127.0.0.1:0; ``start(credentials=None)`` returns (fake, echo, address)."""
    started = []

    def start(credentials=None):
        fake, echo = FakeInversion(), Echo()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        inversion_pb2_grpc.add_InversionServicer_to_server(fake, server)
        handler = grpc.unary_unary_rpc_method_handler(
            echo,
            request_deserializer=common_pb2.ModelRef.FromString,
            response_serializer=common_pb2.ModelRef.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Ping": handler}),))
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        started.append(server)
        return fake, echo, f"127.0.0.1:{port}"

    yield start
    for server in started:
        server.stop(grace=None)


FAST_RETRIES = atelier.RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.005)


@pytest.fixture
def fake_and_client(servers):
    fake, _, address = servers()
    with atelier.Client(address, retries=FAST_RETRIES, timeout=30) as client:
        yield fake, client
