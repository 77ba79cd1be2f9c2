"""The Variations RPC: parse, resolve (load) our model, fetch the reference's inversion chain from
the inversion service over gRPC (the caller's deadline minus a margin, x-request-id propagated),
then ISA-DCA on the executor.

The inversion call runs on the RPC thread (it is another server's compute, not ours), so it holds
no executor slot; its progress is relayed to our caller as stage "invert".
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atelier.core import auth, codecs
from atelier.core.attention import controlled_attention
from atelier.core.dependencies import (REQUEST_ID_KEY, DependencyTimeout, dependency_failure, dependency_timeout,
                                       request_id_of)
from atelier.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from atelier.core.streaming import stream_call
from atelier.synthesis.ip_adapter import adapter_for
from atelier.synthesis.servicer import _event_message, check_seed, decode_rgb, preview_sink
from atelier.synthesis.variations import RIVAL_NEGATIVE, T_ALIGN, DCAContext, VariationParams, isa_dca_variations
from atelier.v1 import common_pb2, inversion_pb2, inversion_pb2_grpc, synthesis_pb2

_LOG = logging.getLogger(__name__)
HEALTH_POLL_SECONDS = 5.0

_INVERSIONS = {
    synthesis_pb2.INVERSION_CHOICE_UNSPECIFIED: inversion_pb2.DDIM,
    synthesis_pb2.INVERSION_DDIM: inversion_pb2.DDIM,
    synthesis_pb2.INVERSION_SPDINV: inversion_pb2.SPDINV,
}
_SCHEDULES = {
    synthesis_pb2.LAMBDA_SCHEDULE_UNSPECIFIED: "constant",
    synthesis_pb2.CONSTANT: "constant",
    synthesis_pb2.LINEAR: "linear",
}


@dataclass
class VariationsJob:
    model: str
    image: torch.Tensor  # (1, 3, H, W) in [0, 1]
    prompt: str
    negative_prompt: str
    dca_text: str
    inversion: int
    params: VariationParams


class VariationsHandler:
    def __init__(self, servicer, registry, executor, limits, inversion_address: str, metrics,
                 peer: auth.PeerCredentials = auth.PeerCredentials()):
        self._servicer = servicer
        self._registry = registry
        self._executor = executor
        self._limits = limits
        self.inversion_address = inversion_address
        # This service's peer credentials (TLS, token), as every service-to-service call carries.
        self._channel = auth.dial(inversion_address, peer)
        self._stub = inversion_pb2_grpc.InversionStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._up = metrics.dependency_up.labels(dependency="inversion", address=inversion_address)
        self._up.set(0)
        self._closed = threading.Event()
        threading.Thread(target=self._poll_health, name="synthesis-inversion-health", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._channel.close()

    def _poll_health(self) -> None:
        while not self._closed.is_set():
            try:
                reply = self._health.Check(health_pb2.HealthCheckRequest(service="atelier.v1.Inversion"), timeout=2.0)
                self._up.set(1 if reply.status == health_pb2.HealthCheckResponse.SERVING else 0)
            except (grpc.RpcError, ValueError):  # ValueError: the channel was closed meanwhile
                self._up.set(0)
            self._closed.wait(HEALTH_POLL_SECONDS)

    # ---- the RPC ------------------------------------------------------------
    def handle(self, request, context):
        job = self._parse(request)
        request_id = request_id_of(context)
        _LOG.info("Variations request_id=%s n=%d steps=%d inversion=%s", request_id, job.params.n,
                  job.params.steps, inversion_pb2.InversionMethod.Name(job.inversion))
        # Our model first: an unknown name (NOT_FOUND) or one of another kind (FAILED_PRECONDITION)
        # is refused before any remote work.
        model = self._servicer.model(job.model, context)
        inversion = None
        for message in self._invert(job, context, request_id):
            if isinstance(message, inversion_pb2.InversionResult):
                inversion = message
            else:
                yield synthesis_pb2.VariationsEvent(progress=message)
        chain = codecs.tensor_to_torch(inversion.chain, field="inversion.chain").float()
        previews: list = []
        yield from stream_call(
            context, self._executor,
            lambda control: self._run(job, model, chain, control, previews),
            lambda event: _event_message(synthesis_pb2.VariationsEvent, event, previews),
            lambda result, control: synthesis_pb2.VariationsEvent(result=synthesis_pb2.VariationsResult(
                images=[codecs.image_from_torch(image) for image in result[0]], seed=job.params.seed,
                dca_path=result[1], request_id=request_id, usage=codecs.usage_to_proto(control),
                inversion_usage=inversion.usage)),
        )

    def _invert(self, job: VariationsJob, context, request_id: str):
        """Yield the inversion's progress (as ours) and then its InversionResult."""
        timeout = dependency_timeout(context, "the inversion")
        request = inversion_pb2.InvertRequest(
            model=common_pb2.ModelRef(name=job.model), image=codecs.image_from_torch(job.image),
            prompt=job.prompt, method=job.inversion, num_inference_steps=job.params.steps, return_chain=True)
        call = self._stub.Invert(request, timeout=timeout.seconds, metadata=((REQUEST_ID_KEY, request_id),))
        # Our caller going away (cancel, deadline) cancels the inversion at once.
        if not context.add_callback(call.cancel):
            call.cancel()
        result = None
        try:
            for event in call:
                if event.HasField("progress"):
                    progress = common_pb2.Progress()
                    progress.CopyFrom(event.progress)
                    progress.stage = "invert"
                    yield progress
                elif event.HasField("result"):
                    result = event.result
        except grpc.RpcError as error:
            raise _dependency_error(error, self.inversion_address, timeout) from None
        if result is None or not result.HasField("chain"):
            raise Unavailable(f"the inversion service at {self.inversion_address} returned no chain")
        self._up.set(1)
        yield result

    # ---- work (runs on the compute executor) ------------------------------
    def _run(self, job: VariationsJob, model, chain: torch.Tensor, control, previews: list):
        texts = [job.prompt, "", job.negative_prompt, job.dca_text]
        cond, uncond_ref, uncond_gen, dca_text = model.encode_prompt(texts).chunk(4)
        adapter = adapter_for(model)  # loaded (once) with diffusers' load_ip_adapter, before our processors
        if adapter is not None:
            dca = DCAContext(adapter.image_tokens(job.image).to(model.dtype), adapter.layers)
        else:
            dca = DCAContext(dca_text)
        with controlled_attention(model.unet):
            images = isa_dca_variations(model, chain, cond, uncond_ref, uncond_gen, dca, job.params, control,
                                        preview=preview_sink(control, previews))
        return images.split(1), dca.path

    # ---- parsing ------------------------------------------------------------
    def _parse(self, request: synthesis_pb2.VariationsRequest) -> VariationsJob:
        servicer, limits = self._servicer, self._limits
        if not request.HasField("image"):
            raise InvalidArgument("image", "a reference image is required")
        model = servicer.model_name(request.model)
        image = decode_rgb(request.image, "image", limits.max_pixels)
        n = request.n if request.HasField("n") else 4
        if not 1 <= n <= limits.max_variations:
            raise InvalidArgument("n", f"must be between 1 and {limits.max_variations}, got {n}")
        lam = request.lam if request.HasField("lam") else 0.7
        if not np.isfinite(lam) or not 0.0 <= lam <= 1.0:
            raise InvalidArgument("lam", f"must be in [0, 1], got {lam}")
        if request.inversion not in _INVERSIONS:
            raise InvalidArgument("inversion", f"unknown inversion method {request.inversion}")
        if request.lambda_schedule not in _SCHEDULES:
            raise InvalidArgument("lambda_schedule", f"unknown schedule {request.lambda_schedule}")
        until = request.interpolation_until if request.HasField("interpolation_until") else T_ALIGN
        if not 0 <= until <= 1000:
            raise InvalidArgument("interpolation_until", f"must be between 0 and 1000, got {until}")
        scale = request.ip_adapter_scale if request.HasField("ip_adapter_scale") else 1.0
        if not np.isfinite(scale) or not 0.0 <= scale <= 10.0:
            raise InvalidArgument("ip_adapter_scale", f"must be in [0, 10], got {scale}")
        if request.preview_every < 0:
            raise InvalidArgument("preview_every", f"must be >= 0, got {request.preview_every}")
        prompt = servicer.prompt(request.prompt, "prompt")
        params = VariationParams(
            n=n, steps=servicer.steps(request), guidance=servicer.guidance(request, 7.0), seed=check_seed(request),
            lam=lam, schedule=_SCHEDULES[request.lambda_schedule], until=until, dca_scale=scale,
            permute=request.permute if request.HasField("permute") else True, preview_every=request.preview_every)
        negative = request.negative_prompt if request.negative_prompt else RIVAL_NEGATIVE
        return VariationsJob(model=model, image=image, prompt=prompt,
                             negative_prompt=servicer.prompt(negative, "negative_prompt"),
                             dca_text=servicer.prompt(request.dca_text or prompt, "dca_text"),
                             inversion=_INVERSIONS[request.inversion], params=params)


def _dependency_error(error: grpc.RpcError, address: str, timeout: DependencyTimeout):
    """The inversion service's failure as ours, naming it: its refusals of our request first, the
    rest by the shared policy (``core.dependencies.dependency_failure``)."""
    code, details = error.code(), error.details()
    where = f"the inversion service at {address}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument("image", f"{where} refused the reference: {details}")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
        return FailedPrecondition(f"{where} cannot invert with this model: {details}")
    return dependency_failure(error, where, timeout)
