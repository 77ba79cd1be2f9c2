"""A small real service for exercising the core over gRPC (tests only).

It implements atelier.v1.Inversion with a fake "UNet loop": each step calls
``control.unet()`` (as real method code must), reports progress, then waits for
``step_seconds`` or until ``release`` is set. Tests hold calls in flight by
clearing ``release`` and let them go by setting it. It also serves a unary
``atelier.test.Echo/Double`` (Tensor -> Tensor) to exercise ``unary_call``.
"""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from atelier.core.control import CallControl
from atelier.core.errors import InvalidArgument, NotFound
from atelier.core.executor import ComputeExecutor
from atelier.core.streaming import stream_call, unary_call
from atelier.sdk import codec
from atelier.v1 import common_pb2, inversion_pb2, inversion_pb2_grpc, tensor_pb2

ECHO_METHOD = "/atelier.test.Echo/Double"


class FakeInversionServicer(inversion_pb2_grpc.InversionServicer):
    def __init__(self, app: "FakeInversionApp"):
        self.app = app

    def Invert(self, request, context):
        steps = request.num_inference_steps if request.HasField("num_inference_steps") else 50
        if steps <= 0 or steps > 100_000:
            raise InvalidArgument("num_inference_steps", f"must be in 1..100000, got {steps}")
        if request.model.name and request.model.name != "toy":
            raise NotFound(f"unknown model {request.model.name!r}; known: ['toy']")
        width = height = 8
        if request.HasField("image"):
            # CodecError escapes on purpose: the error interceptor must map it.
            image = codec.image_to_pil(request.image, "image", max_pixels=self.app.max_pixels, multiple_of=8)
            width, height = image.size

        if request.prompt == "many violations":
            raise InvalidArgument.many((f"points[{i}]", "x" * 1000) for i in range(40))

        def work(control: CallControl):
            if request.prompt == "boom":
                raise RuntimeError("secret internal detail")
            if request.prompt == "hang":  # a call whose code ignores its control (a hung device call)
                self.app.release.wait(60)
                return np.zeros((1, 4, 1, 1), dtype=np.float32)
            for step in range(1, steps + 1):
                control.unet()
                with self.app.lock:
                    self.app.evaluations += 1
                control.progress("invert", step, steps)
                self.app.release.wait(self.app.step_seconds)
            return np.full((1, 4, height // 8, width // 8), float(steps), dtype=np.float32)

        def progress_message(event):
            return inversion_pb2.InvertEvent(progress=common_pb2.Progress(
                stage=event.stage, step=event.step, total=event.total, message=event.message,
                elapsed_seconds=event.elapsed_seconds))

        def result_message(z_t, control):
            usage = common_pb2.Usage(
                unet_forward_evaluations=control.forward_evaluations,
                wall_seconds=control.elapsed(), queue_seconds=control.queue_seconds())
            return inversion_pb2.InvertEvent(result=inversion_pb2.InversionResult(
                num_inference_steps=steps, width=width, height=height, z_t=codec.tensor_from_numpy(z_t, "z_T"), usage=usage))

        return stream_call(context, self.app.executor, work, progress_message, result_message)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _echo_double(app: "FakeInversionApp"):
    def handle(request: tensor_pb2.Tensor, context) -> tensor_pb2.Tensor:
        from atelier.core import codecs  # torch: imported only by the tests that call Echo

        values = codecs.tensor_to_torch(request, "tensor")

        def work(control: CallControl):
            control.unet()
            return values * 2

        return codecs.tensor_from_torch(unary_call(context, app.executor, work), name="doubled")

    return grpc.method_handlers_generic_handler(
        "atelier.test.Echo",
        {"Double": grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=tensor_pb2.Tensor.FromString,
            response_serializer=tensor_pb2.Tensor.SerializeToString)},
    )


class FakeInversionApp:
    name = "inversion-fake"
    service_names = ("atelier.v1.Inversion",)

    def __init__(self, max_queue: int = 4, metrics=None, step_seconds: float = 0.005, max_pixels: int = 64 * 64):
        self.executor = ComputeExecutor(max_queue=max_queue, name="inversion", metrics=metrics)
        self.step_seconds = step_seconds
        self.max_pixels = max_pixels
        self.release = threading.Event()
        self.loaded = threading.Event()  # load() blocks until set
        self.loaded.set()
        self.lock = threading.Lock()
        self.evaluations = 0
        self.closed = False
        self.backend_ready = True  # what backend_readiness() reports (an external backend's health)

    def backend_readiness(self):
        return self.backend_ready, "backend up" if self.backend_ready else "backend down"

    def add_to_server(self, server) -> None:
        inversion_pb2_grpc.add_InversionServicer_to_server(FakeInversionServicer(self), server)
        server.add_generic_rpc_handlers((_echo_double(self),))

    def load(self) -> None:
        if not self.loaded.wait(60):
            raise TimeoutError("test never released load()")

    def close(self) -> None:
        self.release.set()
        self.executor.shutdown(wait=True)
        self.closed = True


def main(argv=None) -> int:
    """``python core_fakes.py [server flags] [--step-seconds S] [--fail-load]``: serve the fake."""
    from atelier.core.config import ServerConfig
    from atelier.core.server import serve

    def add_arguments(parser):
        parser.add_argument("--step-seconds", type=float, default=0.05)
        parser.add_argument("--fail-load", action="store_true")

    config = ServerConfig.from_args(argv, "inversion", add_arguments=add_arguments)
    app = FakeInversionApp(max_queue=config.max_queue, step_seconds=config.extras["step_seconds"])
    if config.extras["fail_load"]:
        def failing_load():
            raise RuntimeError("weights missing")
        app.load = failing_load
    return serve(app, config)


if __name__ == "__main__":
    raise SystemExit(main())
