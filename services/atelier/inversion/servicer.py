"""Inversion service: proto <-> method translation only (no tensor math here)."""
from __future__ import annotations

from atelier.core import codecs
from atelier.core.admission import charge_response
from atelier.core.catalog import ListModelsRpc
from atelier.core.dependencies import request_id_of
from atelier.core.errors import InvalidArgument
from atelier.core.models import SD, ModelRegistry
from atelier.core.streaming import stream_call
from atelier.inversion.concept_edit import prepare_concept
from atelier.inversion.concept_source import ConceptSource
from atelier.inversion.edit_request import EditJob, parse_edit
from atelier.inversion.editing import edit
from atelier.inversion.inversion import invert
from atelier.inversion.request_parsing import METHODS as _METHODS, InvertJob, Limits, RequestParser
from atelier.v1 import common_pb2, inversion_pb2, inversion_pb2_grpc

SERVICE_NAME = inversion_pb2.DESCRIPTOR.services_by_name["Inversion"].full_name

_METHOD_ENUMS = {name: enum for enum, name in _METHODS.items() if enum != inversion_pb2.INVERSION_METHOD_UNSPECIFIED}


class InversionServicer(ListModelsRpc, inversion_pb2_grpc.InversionServicer):
    def __init__(self, registry: ModelRegistry, executor, default_model: str, limits: Limits = Limits(),
                 concepts: ConceptSource | None = None):
        self._registry = registry
        self._concepts = concepts or ConceptSource(None)
        self._executor = executor
        self._parser = RequestParser(registry, default_model, limits)
        self.model_registry, self.default_model_name = registry, default_model  # ListModels

    # ---- RPCs -------------------------------------------------------------
    def Invert(self, request, context):
        # Errors raised here or in the work are mapped to statuses by the error interceptor.
        job = self._parser.parse_invert(request)
        charge_response(_invert_answer_bytes(job, self._registry.info(job.model).facts),
                        "return_chain" if job.return_chain else "num_inference_steps",
                        "ask without return_chain, or for fewer steps or a smaller image")
        model = self._model(job.model, context)
        guidance = self._registry.info(job.model).default_guidance_scale  # what NTI optimises for, unless given
        yield from stream_call(
            context,
            self._executor,
            lambda control: self._run_invert(job, control, model, guidance),
            lambda event: inversion_pb2.InvertEvent(progress=_progress(event)),
            lambda result, control: inversion_pb2.InvertEvent(result=_inversion_result(job, result, control)),
        )

    def Edit(self, request, context):
        job = parse_edit(request, self._parser)
        charge_response(_edit_answer_bytes(job), "return_source", "a smaller image")
        concept = None
        if job.concept_id:
            # Fetched on the RPC thread (another server's work, no executor slot), before queueing.
            concept = self._concepts.fetch(job.concept_id, job.model, context, request_id_of(context))
            token = concept.metadata.get("placeholder_token", "")
            if token not in job.target_prompt:
                raise InvalidArgument("target_prompt", f"must contain the concept's placeholder {token!r}")
        model = self._model(job.model, context)
        yield from stream_call(
            context,
            self._executor,
            lambda control: self._run_edit(job, control, model, concept),
            lambda event: inversion_pb2.EditEvent(progress=_progress(event)),
            lambda result, control: inversion_pb2.EditEvent(result=_edit_result(job, result, control)),
        )

    # ---- work (runs on the compute executor) ------------------------------
    def _model(self, name: str, context):
        """The loaded model, loaded off the compute worker (UNAVAILABLE while still loading)."""
        return self._registry.get(name, kind=SD, remaining=context.time_remaining())

    def _run_invert(self, job: InvertJob, control, model, guidance: float):
        nti_guidance = guidance if job.null_text_guidance is None else job.null_text_guidance
        return invert(
            model, job.image.to(device=model.device, dtype=model.dtype), job.prompt, method=job.method,
            steps=job.steps, control=control, guidance_scale=nti_guidance, **job.spdinv
        )

    def _run_edit(self, job: EditJob, control, model, concept=None):
        chain, null_embeddings = job.chain, job.null_embeddings
        # The concept's layers are built for this call only (never on the shared model).
        concept = prepare_concept(model, concept, job.target_prompt) if concept is not None else None
        if job.invert_job is not None:
            inverted = self._run_invert(job.invert_job, control, model, guidance=job.guidance)
            chain, null_embeddings = inverted.chain, inverted.extras.get("null_embeddings")
            z_t = chain[-1:]
        else:
            z_t = job.z_t.to(device=model.device, dtype=model.dtype)
        return edit(
            model,
            z_t,
            job.source_prompt,
            job.target_prompt,
            job.steps,
            engine=job.engine,
            guidance=job.guidance,
            p2p=job.p2p,
            masactrl=job.masactrl,
            control=control,
            prox_edit=job.prox_edit,
            method=job.method,
            chain=chain,
            null_embeddings=null_embeddings,
            preset=job.preset,
            concept=concept,
        )


def _invert_answer_bytes(job: InvertJob, facts) -> int:
    """Upper estimate of the InvertEvent stream: latents in FP32, diagnostics, progress."""
    height, width = job.image.shape[2:]
    latent = 4 * facts.latent_channels * (height // facts.vae_scale_factor) * (width // facts.vae_scale_factor)
    chain = (job.steps + 1) * latent if job.return_chain else 0
    null_embeddings = job.steps * 77 * 1024 * 4 if job.method == "nti" else 0  # CLIP L <= 77 tokens, D <= 1024
    return latent + chain + null_embeddings + 64 * job.steps + 4096


def _edit_answer_bytes(job: EditJob) -> int:
    """Upper estimate of the EditEvent stream: PNG images are at most raw RGB plus headers."""
    image = 3 * job.width * job.height + 4096
    return image * (2 if job.return_source else 1) + 64 * job.steps + 4096


def _progress(event) -> common_pb2.Progress:
    return common_pb2.Progress(
        stage=event.stage,
        step=event.step,
        total=event.total,
        message=event.message,
        elapsed_seconds=event.elapsed_seconds,
    )


def _inversion_result(job: InvertJob, out, control) -> inversion_pb2.InversionResult:
    height, width = job.image.shape[2:]
    chain = out.chain.detach().float().cpu()
    result = inversion_pb2.InversionResult(
        model=common_pb2.ModelRef(name=job.model),
        prompt=job.prompt,
        method=_METHOD_ENUMS[job.method],
        num_inference_steps=job.steps,
        width=width,
        height=height,
        z_t=codecs.tensor_from_torch(chain[-1:], name="z_T"),
        usage=codecs.usage_to_proto(control),
    )
    if job.return_chain:
        result.chain.CopyFrom(codecs.tensor_from_torch(chain, name="chain"))
    if "null_embeddings" in out.extras:
        result.null_embeddings.CopyFrom(codecs.tensor_from_torch(out.extras["null_embeddings"].float().cpu(),
                                                                 name="null_embeddings"))
    for index, (timestep, residual, rounds) in enumerate(zip(out.timesteps, out.residuals, out.rounds), 1):
        result.diagnostics.add(index=index, timestep=int(timestep), residual=float(residual), rounds=int(rounds))
    return result


def _edit_result(job: EditJob, out, control) -> inversion_pb2.EditResult:
    result = inversion_pb2.EditResult(image=codecs.image_from_torch(out.image), usage=codecs.usage_to_proto(control))
    if job.return_source and out.source_image is not None:
        result.source_image.CopyFrom(codecs.image_from_torch(out.source_image))
    return result
