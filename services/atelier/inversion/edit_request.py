"""An EditRequest's fields -> the edit's parameters, every independent bad field reported at once.

Proto in, params out (no gRPC status, no tensor math): field violations are collected in an
``atelier.core.errors.Violations`` and named after the SDK argument that sets the field
(``client.inversion.edit``). Checks that need the source (its model, steps or method) are
skipped when the source itself is bad; the option checks run whatever the source.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from atelier.core import codecs
from atelier.core.errors import InvalidArgument, Violations
from atelier.inversion.editing import MasaCtrlParams, P2PParams, check_edit_options
from atelier.inversion.proxedit import DEFAULT_INVERSION_GUIDANCE_TIMESTEP, ProxEditParams
from atelier.inversion.request_parsing import INVERT_ARGS, METHODS, InvertJob, RequestParser
from atelier.v1 import inversion_pb2

PRESETS = {inversion_pb2.EDIT_PRESET_UNSPECIFIED: "", inversion_pb2.SPDINV_PIPELINE: "spdinv"}
ENGINES = {
    inversion_pb2.EDIT_ENGINE_UNSPECIFIED: "p2p",
    inversion_pb2.P2P: "p2p",
    inversion_pb2.MASACTRL: "masactrl",
}
# InvertRequest field -> the SDK argument that sets it in edit() of an image.
EDIT_INVERT_ARGS = {**INVERT_ARGS, "image": "source", "prompt": "source_prompt"}
P2P_MODES = {
    inversion_pb2.P2POptions.MODE_UNSPECIFIED: "auto",
    inversion_pb2.P2POptions.REPLACE: "replace",
    inversion_pb2.P2POptions.REFINE: "refine",
    inversion_pb2.P2POptions.REWEIGHT: "reweight",
}


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
    method: str = "spdinv"
    chain: torch.Tensor | None = None  # (steps+1, 4, h, w) float32, when the client sent it back
    null_embeddings: torch.Tensor | None = None
    prox_edit: ProxEditParams = dataclasses.field(default_factory=ProxEditParams)
    preset: str = ""
    concept_id: str = ""


@dataclasses.dataclass
class _Source:
    model: str
    prompt: str
    steps: int
    method: str
    height: int
    width: int
    invert_job: InvertJob | None = None
    z_t: torch.Tensor | None = None
    chain: torch.Tensor | None = None
    null_embeddings: torch.Tensor | None = None


def parse_edit(request: inversion_pb2.EditRequest, parser: RequestParser) -> EditJob:
    """The job for an EditRequest (one InvalidArgument with every independent violation).

    ``parser`` holds the checks shared with Invert. NotFound / FAILED_PRECONDITION for the
    model still come first, as in Invert."""
    violations = Violations()
    source = _parse_source(request, parser, violations)
    if source is not None and request.model.name and request.model.name != source.model:
        violations.add("model", f"differs from the inversion's model {source.model!r}")
    engine = ENGINES.get(request.engine)
    if engine is None:
        violations.add("engine", f"unknown editing engine {request.engine}")
    target = violations.attempt(parser.prompt, request.target_prompt, "target_prompt")
    guidance = None
    if request.HasField("guidance_scale"):
        guidance = request.guidance_scale
        if not np.isfinite(guidance) or not 0.0 <= guidance <= 50.0:
            violations.add("guidance_scale", f"must be between 0 and 50, got {guidance}")
            guidance = None
    elif source is not None:
        guidance = parser.registry.info(source.model).default_guidance_scale
    p2p = p2p_params(request.p2p, violations)
    masactrl = masactrl_params(request.masactrl)
    if request.preset not in PRESETS:
        violations.add("preset", f"unknown preset {request.preset}")
    prox_edit = prox_edit_params(request.prox_edit, violations)
    concept = violations.attempt(concept_id, request.concept_id)
    if source is not None:
        _check_source_fits_method(source, prox_edit, violations)
    if engine is not None:
        # The method's own checks, before the call is queued (and before any inversion in it).
        # A bad source's steps or a bad guidance_scale are reported above: valid stand-ins let
        # the engine's options still be checked, without reporting those fields twice.
        violations.attempt(check_edit_options, request.target_prompt, source.steps if source else 1, engine,
                           0.0 if guidance is None else guidance, p2p, masactrl)
    violations.raise_if_any()
    return EditJob(
        model=source.model,
        invert_job=source.invert_job,
        z_t=source.z_t,
        source_prompt=source.prompt,
        steps=source.steps,
        width=source.width,
        height=source.height,
        target_prompt=target,
        engine=engine,
        guidance=guidance,
        p2p=p2p,
        masactrl=masactrl,
        return_source=request.return_source,
        method=source.method,
        chain=source.chain,
        null_embeddings=source.null_embeddings,
        prox_edit=prox_edit,
        preset=PRESETS[request.preset],
        concept_id=concept,
    )


def _parse_source(request, parser: RequestParser, violations: Violations) -> _Source | None:
    """The source to edit (None, with its violations recorded, when it is missing or bad)."""
    kind = request.WhichOneof("source")
    if kind is None:
        violations.add("source", "set either inversion (a result of Invert) or invert (a request)")
        return None
    if kind == "invert":
        job = violations.attempt(parser.parse_invert, request.invert, EDIT_INVERT_ARGS)
        if job is None:
            return None
        height, width = job.image.shape[2:]
        return _Source(job.model, job.prompt, job.steps, job.method, height, width, invert_job=job)
    return violations.attempt(_inversion_source, request, parser)


def _inversion_source(request, parser: RequestParser) -> _Source:
    """An Inversion sent back as is: whatever is wrong with it, the SDK argument is ``source``.
    Its checks depend on each other (the model fixes z_t's shape, z_t and the steps the
    chain's), so the first violation ends them (raises InvalidArgument)."""
    inv, limits = request.inversion, parser.limits
    model = parser.model_name(inv.model if inv.model.name else request.model, "source")
    prompt = parser.prompt(inv.prompt, "source")
    steps = inv.num_inference_steps
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument("source", f"num_inference_steps must be between 1 and {limits.max_steps}")
    facts = parser.registry.info(model).facts
    z_t = codecs.tensor_to_torch(inv.z_t, field="source.z_t", shape=(1, facts.latent_channels, None, None)).float()
    height, width = inv.height, inv.width
    factor = facts.vae_scale_factor
    if (height, width) != (z_t.shape[2] * factor, z_t.shape[3] * factor):
        raise InvalidArgument("source", f"width/height do not match z_t's spatial size x {factor} "
                                        "(the model's VAE factor)")
    if height * width > limits.max_pixels:
        raise InvalidArgument("source.z_t", f"larger than {limits.max_pixels} pixels")
    if not torch.isfinite(z_t).all():
        raise InvalidArgument("source.z_t", "contains NaN or infinite values")
    if inv.method not in METHODS:
        raise InvalidArgument("source", f"unknown inversion method {inv.method}")
    chain = null_embeddings = None
    if inv.HasField("chain"):
        chain = codecs.tensor_to_torch(inv.chain, field="source.chain", shape=(steps + 1, *z_t.shape[1:])).float()
        if not torch.isfinite(chain).all():
            raise InvalidArgument("source.chain", "contains NaN or infinite values")
    if inv.HasField("null_embeddings"):
        null_embeddings = codecs.tensor_to_torch(inv.null_embeddings, field="source.null_embeddings",
                                                 shape=(steps, None, None)).float()
        if not torch.isfinite(null_embeddings).all():
            raise InvalidArgument("source.null_embeddings", "contains NaN or infinite values")
    return _Source(model, prompt, steps, METHODS[inv.method], height, width, z_t=z_t, chain=chain,
                   null_embeddings=null_embeddings)


def _check_source_fits_method(source: _Source, prox_edit: ProxEditParams, violations: Violations) -> None:
    """What the inversion method (or inversion guidance) needs from a source sent back."""
    sent_back = source.invert_job is None
    if sent_back and source.method == "directinv" and source.chain is None:
        violations.add("source", "DirectInversion edits along the inverted chain: invert with "
                       "return_chain and send the result back, or invert in the same call")
    if sent_back and source.method == "nti" and source.null_embeddings is None:
        violations.add("source", "null-text inversion's embeddings are required "
                       "(send the Invert result back as returned)")
    if sent_back and prox_edit.inversion_guidance and source.chain is None:
        violations.add("source", "inversion guidance needs the inverted chain: invert with "
                       "return_chain and send the result back, or invert in the same call")


def concept_id(value: str) -> str:
    if len(value) > 256 or any(ord(c) < 32 for c in value):
        raise InvalidArgument("concept", "not a concept id")
    return value


def _optional(opts, name: str, default):
    return getattr(opts, name) if opts.HasField(name) else default


def p2p_params(opts: inversion_pb2.P2POptions, violations: Violations) -> P2PParams:
    """Prompt-to-Prompt's options (an unknown mode is recorded; "auto" stands in for it so that
    the other options are still checked)."""
    mode = P2P_MODES.get(opts.mode)
    if mode is None:
        violations.add("mode", f"unknown mode {opts.mode}")
        mode = "auto"
    defaults = P2PParams()
    return P2PParams(
        mode=mode,
        cross_replace_fraction=_optional(opts, "cross_replace_fraction", defaults.cross_replace_fraction),
        self_replace_fraction=_optional(opts, "self_replace_fraction", defaults.self_replace_fraction),
        reweight=dict(opts.reweight),
        blend_words=list(opts.blend_words),
        blend_threshold=_optional(opts, "blend_threshold", defaults.blend_threshold),
    )


def masactrl_params(opts: inversion_pb2.MasaCtrlOptions) -> MasaCtrlParams:
    """MasaCtrl's options (checked with the engine's other options in ``check_edit_options``)."""
    defaults = MasaCtrlParams()  # the reference's step 4, layer 10, total_steps 50
    return MasaCtrlParams(start_step=_optional(opts, "start_step", defaults.start_step),
                          start_layer=_optional(opts, "start_layer", defaults.start_layer),
                          end_step=_optional(opts, "end_step", defaults.end_step),
                          mask_source_words=list(opts.mask_source_words),
                          mask_target_words=list(opts.mask_target_words),
                          mask_threshold=_optional(opts, "mask_threshold", defaults.mask_threshold))


def prox_edit_params(opts: inversion_pb2.ProxEditOptions, violations: Violations) -> ProxEditParams:
    quantile = _optional(opts, "quantile", None)
    if quantile is not None and not (np.isfinite(quantile) and 0.0 < quantile < 1.0):
        violations.add("quantile", f"must be in (0, 1), got {quantile}")
    timestep = _optional(opts, "inversion_guidance_timestep", DEFAULT_INVERSION_GUIDANCE_TIMESTEP)
    if timestep < 0:
        violations.add("inversion_guidance_timestep", f"must not be negative, got {timestep}")
    return ProxEditParams(proximal_guidance=_optional(opts, "proximal_guidance", None), quantile=quantile,
                          inversion_guidance=_optional(opts, "inversion_guidance", None),
                          inversion_guidance_timestep=timestep)
