"""Inversion service: proto <-> method translation only (no tensor math here)."""
from __future__ import annotations

import dataclasses

import numpy as np

import torch

from atelier.core import codecs
from atelier.core.admission import charge_response
from atelier.core.catalog import ListModelsRpc
from atelier.core.errors import InvalidArgument, Violations, quoted
from atelier.core.models import SD, ModelRegistry, fit_to_vae
from atelier.core.streaming import stream_call
from atelier.inversion.editing import MasaCtrlParams, P2PParams, check_edit_options, edit
from atelier.inversion.inversion import invert
from atelier.sdk import codec
from atelier.v1 import common_pb2, inversion_pb2, inversion_pb2_grpc

SERVICE_NAME = inversion_pb2.DESCRIPTOR.services_by_name["Inversion"].full_name

_METHODS = {
    inversion_pb2.INVERSION_METHOD_UNSPECIFIED: "spdinv",
    inversion_pb2.DDIM: "ddim",
    inversion_pb2.SPDINV: "spdinv",
}
_METHOD_ENUMS = {"ddim": inversion_pb2.DDIM, "spdinv": inversion_pb2.SPDINV}
_ENGINES = {
    inversion_pb2.EDIT_ENGINE_UNSPECIFIED: "p2p",
    inversion_pb2.P2P: "p2p",
    inversion_pb2.MASACTRL: "masactrl",
}
# InvertRequest field -> the SDK argument that sets it, in invert() and in edit() of an image.
INVERT_ARGS = {name: name for name in ("image", "prompt", "method", "num_inference_steps", "model")}
EDIT_INVERT_ARGS = {**INVERT_ARGS, "image": "source", "prompt": "source_prompt"}
_P2P_MODES = {
    inversion_pb2.P2POptions.MODE_UNSPECIFIED: "auto",
    inversion_pb2.P2POptions.REPLACE: "replace",
    inversion_pb2.P2POptions.REFINE: "refine",
    inversion_pb2.P2POptions.REWEIGHT: "reweight",
}


# The optimiser runs in float32 (AdamW turns lr and decay into float32 scalars: 1e308 raised
# "value cannot be converted to type float without overflow"). Bounds far above any useful
# value (the reference uses lr 1e-3, decay 1e-2, threshold 5e-6) that stay finite in float32.
_SPDINV_UPPER_BOUNDS = {"learning_rate": 1e3, "loss_threshold": 1e30, "weight_decay": 1e3}


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request limits: what a single call may ask of the service."""

    max_pixels: int = 1024 * 1024
    max_steps: int = 1000  # the scheduler's training timesteps: more is meaningless
    max_spdinv_rounds: int = 1000
    max_prompt_chars: int = 2000


@dataclasses.dataclass
class InvertJob:
    model: str
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    prompt: str
    method: str
    steps: int
    return_chain: bool
    spdinv: dict


@dataclasses.dataclass
class EditJob:
    model: str
    invert_job: InvertJob | None  # invert first, in the same call
    z_t: torch.Tensor | None  # (1, 4, h, w) float32
    source_prompt: str
    steps: int
    width: int
    height: int
    target_prompt: str
    engine: str
    guidance: float
    p2p: P2PParams
    masactrl: MasaCtrlParams
    return_source: bool


# How long a call waits for its model to load (on the registry's loader thread) before
# answering UNAVAILABLE; never longer than the call's deadline.
MODEL_LOAD_WAIT_SECONDS = 10.0


class InversionServicer(ListModelsRpc, inversion_pb2_grpc.InversionServicer):
    def __init__(self, registry: ModelRegistry, executor, default_model: str, limits: Limits = Limits()):
        self._registry = registry
        self._executor = executor
        self._default_model = default_model
        self._limits = limits
        self.model_registry, self.default_model_name = registry, default_model  # ListModels

    # ---- RPCs -------------------------------------------------------------
    def Invert(self, request, context):
        # Errors raised here or in the work are mapped to statuses by the error interceptor.
        job = self._parse_invert(request)
        charge_response(_invert_answer_bytes(job, self._registry.info(job.model).facts),
                        "return_chain" if job.return_chain else "num_inference_steps",
                        "ask without return_chain, or for fewer steps or a smaller image")
        model = self._model(job.model, context)
        yield from stream_call(
            context,
            self._executor,
            lambda control: self._run_invert(job, control, model),
            lambda event: inversion_pb2.InvertEvent(progress=_progress(event)),
            lambda result, control: inversion_pb2.InvertEvent(result=_inversion_result(job, result, control)),
        )

    def Edit(self, request, context):
        job = self._parse_edit(request)
        charge_response(_edit_answer_bytes(job), "return_source", "a smaller image")
        model = self._model(job.model, context)
        yield from stream_call(
            context,
            self._executor,
            lambda control: self._run_edit(job, control, model),
            lambda event: inversion_pb2.EditEvent(progress=_progress(event)),
            lambda result, control: inversion_pb2.EditEvent(result=_edit_result(job, result, control)),
        )

    # ---- work (runs on the compute executor) ------------------------------
    def _model(self, name: str, context):
        """The loaded model, loaded off the compute worker (UNAVAILABLE while still loading)."""
        remaining = context.time_remaining()
        wait = MODEL_LOAD_WAIT_SECONDS if remaining is None else min(MODEL_LOAD_WAIT_SECONDS, remaining)
        return self._registry.get(name, kind=SD, wait_seconds=wait)

    def _run_invert(self, job: InvertJob, control, model):
        return invert(
            model, job.image.to(device=model.device, dtype=model.dtype), job.prompt, method=job.method, steps=job.steps, control=control, **job.spdinv
        )

    def _run_edit(self, job: EditJob, control, model):
        if job.invert_job is not None:
            z_t = self._run_invert(job.invert_job, control, model).chain[-1:]
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
        )

    # ---- request parsing (cheap, before the call is queued) -------------
    # Field violations name the argument the SDK user passed (client.inversion.invert/edit),
    # not the proto path: ``args`` maps an InvertRequest field to that argument.
    def _model_name(self, ref: common_pb2.ModelRef, field: str) -> str:
        name = ref.name or self._default_model
        self._registry.check(name, kind=SD)  # NotFound if unknown, FailedPrecondition if not servable
        return name

    def _steps(self, request, field: str) -> int:
        steps = request.num_inference_steps if request.HasField("num_inference_steps") else 50
        if not 1 <= steps <= self._limits.max_steps:
            raise InvalidArgument(field, f"must be between 1 and {self._limits.max_steps}, got {steps}")
        return steps

    def _prompt(self, text: str, field: str) -> str:
        if len(text) > self._limits.max_prompt_chars:
            raise InvalidArgument(field, f"longer than {self._limits.max_prompt_chars} characters")
        return text

    def _parse_invert(self, request: inversion_pb2.InvertRequest, args: dict[str, str] = INVERT_ARGS,
                      violations: Violations | None = None) -> InvertJob | None:
        """The job for an InvertRequest. Every bad field is recorded in ``violations`` (then
        None is returned) or, without a collector, raised together as one InvalidArgument.
        The model comes first (NotFound / FAILED_PRECONDITION): the image is fitted to its VAE."""
        own = violations is None
        violations = Violations() if own else violations
        before = len(violations.items)
        model = self._model_name(request.model, args["model"])
        image = None
        if not request.HasField("image"):
            violations.add(args["image"], "an image is required")
        else:
            pixels = violations.attempt(codec.image_to_pil, request.image, field=args["image"],
                                        max_pixels=self._limits.max_pixels)
            if pixels is not None:
                fitted = violations.attempt(fit_to_vae, pixels, self._registry.info(model), args["image"])
                if fitted is not None:
                    image = codecs.array_to_torch(np.array(fitted))
        if request.method not in _METHODS:
            violations.add(args["method"], f"unknown inversion method {request.method}")
        opts = request.spdinv
        spdinv = {}
        if opts.HasField("max_rounds"):
            if not 0 <= opts.max_rounds <= self._limits.max_spdinv_rounds:
                violations.add("max_rounds", f"must be between 0 and {self._limits.max_spdinv_rounds}")
            spdinv["max_rounds"] = opts.max_rounds
        for name, upper in _SPDINV_UPPER_BOUNDS.items():
            if opts.HasField(name):
                value = getattr(opts, name)
                if not np.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0):
                    violations.add(name, f"must be a finite positive number, got {value}")
                elif value > upper:
                    violations.add(name, f"must be at most {upper:g}, got {value:g}")
                spdinv[name] = value
        prompt = violations.attempt(self._prompt, request.prompt, args["prompt"])
        steps = violations.attempt(self._steps, request, args["num_inference_steps"])
        if own:
            violations.raise_if_any()
        if len(violations.items) > before:
            return None
        return InvertJob(
            model=model,
            image=image,
            prompt=prompt,
            method=_METHODS[request.method],
            steps=steps,
            return_chain=request.return_chain,
            spdinv=spdinv,
        )

    def _parse_edit(self, request: inversion_pb2.EditRequest) -> EditJob:
        violations = Violations()
        source = request.WhichOneof("source")
        invert_job, z_t = None, None
        model = prompt = steps = height = width = None
        if source is None:
            violations.add("source", "set either inversion (a result of Invert) or invert (a request)")
        elif source == "invert":
            invert_job = self._parse_invert(request.invert, EDIT_INVERT_ARGS, violations)
            if invert_job is not None:
                model, prompt, steps = invert_job.model, invert_job.prompt, invert_job.steps
                height, width = invert_job.image.shape[2:]
            else:
                model = self._model_name(request.invert.model, EDIT_INVERT_ARGS["model"])
        else:
            # An Inversion sent back as is: whatever is wrong with it, the SDK argument is ``source``.
            inv = request.inversion
            model = self._model_name(inv.model if inv.model.name else request.model, "source")
            prompt = violations.attempt(self._prompt, inv.prompt, "source")
            steps = inv.num_inference_steps
            if not 1 <= steps <= self._limits.max_steps:
                violations.add("source", f"num_inference_steps must be between 1 and {self._limits.max_steps}")
            facts = self._registry.info(model).facts
            z_t = violations.attempt(codecs.tensor_to_torch, inv.z_t, field="source.z_t",
                                     shape=(1, facts.latent_channels, None, None))
            height, width = inv.height, inv.width
            if z_t is not None:
                z_t = z_t.float()
                factor = facts.vae_scale_factor
                if (height, width) != (z_t.shape[2] * factor, z_t.shape[3] * factor):
                    violations.add("source", f"width/height do not match z_t's spatial size x {factor} "
                                             "(the model's VAE factor)")
                if height * width > self._limits.max_pixels:
                    violations.add("source.z_t", f"larger than {self._limits.max_pixels} pixels")
                if not torch.isfinite(z_t).all():
                    violations.add("source.z_t", "contains NaN or infinite values")
        if model is not None and request.model.name and request.model.name != model:
            violations.add("model", f"differs from the inversion's model {quoted(model)}")
        engine = _ENGINES.get(request.engine)
        if engine is None:
            violations.add("engine", f"unknown editing engine {request.engine}")
        target = violations.attempt(self._prompt, request.target_prompt, "target_prompt")
        if request.HasField("guidance_scale"):
            guidance = request.guidance_scale
        else:
            guidance = self._registry.info(model).default_guidance_scale if model is not None else 7.5
        if not np.isfinite(guidance) or not 0.0 <= guidance <= 50.0:
            violations.add("guidance_scale", f"must be between 0 and 50, got {guidance}")
        p2p = violations.attempt(_p2p_params, request.p2p)
        masactrl = _masactrl_params(request.masactrl)
        if engine is not None and target is not None and p2p is not None and isinstance(steps, int):
            # The method's own checks, before the call is queued (and before any inversion in it).
            violations.attempt(check_edit_options, target, steps, engine, guidance, p2p, masactrl)
        violations.raise_if_any()
        return EditJob(
            model=model,
            invert_job=invert_job,
            z_t=z_t,
            source_prompt=prompt,
            steps=steps,
            width=width,
            height=height,
            target_prompt=target,
            engine=engine,
            guidance=guidance,
            p2p=p2p,
            masactrl=masactrl,
            return_source=request.return_source,
        )


def _invert_answer_bytes(job: InvertJob, facts) -> int:
    """Upper estimate of the InvertEvent stream: latents in FP32, diagnostics, progress."""
    height, width = job.image.shape[2:]
    latent = 4 * facts.latent_channels * (height // facts.vae_scale_factor) * (width // facts.vae_scale_factor)
    chain = (job.steps + 1) * latent if job.return_chain else 0
    return latent + chain + 64 * job.steps + 4096


def _edit_answer_bytes(job: EditJob) -> int:
    """Upper estimate of the EditEvent stream: PNG images are at most raw RGB plus headers."""
    image = 3 * job.width * job.height + 4096
    return image * (2 if job.return_source else 1) + 64 * job.steps + 4096


def _optional(opts, name: str, default):
    return getattr(opts, name) if opts.HasField(name) else default


def _p2p_params(opts: inversion_pb2.P2POptions) -> P2PParams:
    if opts.mode not in _P2P_MODES:
        raise InvalidArgument("mode", f"unknown mode {opts.mode}")
    defaults = P2PParams()
    return P2PParams(
        mode=_P2P_MODES[opts.mode],
        cross_replace_fraction=_optional(opts, "cross_replace_fraction", defaults.cross_replace_fraction),
        self_replace_fraction=_optional(opts, "self_replace_fraction", defaults.self_replace_fraction),
        reweight=dict(opts.reweight),
        blend_words=list(opts.blend_words),
        blend_threshold=_optional(opts, "blend_threshold", defaults.blend_threshold),
    )


def _masactrl_params(opts: inversion_pb2.MasaCtrlOptions) -> MasaCtrlParams:
    defaults = MasaCtrlParams()  # the reference's step 4, layer 10
    return MasaCtrlParams(start_step=_optional(opts, "start_step", defaults.start_step),
                          start_layer=_optional(opts, "start_layer", defaults.start_layer))


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
    for index, (timestep, residual, rounds) in enumerate(zip(out.timesteps, out.residuals, out.rounds), 1):
        result.diagnostics.add(index=index, timestep=int(timestep), residual=float(residual), rounds=int(rounds))
    return result


def _edit_result(job: EditJob, out, control) -> inversion_pb2.EditResult:
    result = inversion_pb2.EditResult(image=codecs.image_from_torch(out.image), usage=codecs.usage_to_proto(control))
    if job.return_source and out.source_image is not None:
        result.source_image.CopyFrom(codecs.image_from_torch(out.source_image))
    return result
