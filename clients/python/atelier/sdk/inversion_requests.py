"""Request building for the Inversion service, shared by the sync and asyncio clients.

Argument names are the SDK's (diffusers-style); the server's field violations use the same
names, so an ``InvalidArgumentError`` names the argument the caller passed.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union, cast

from atelier.sdk.common import ImageLike, choice, set_present, to_image_proto
from atelier.v1 import common_pb2, inversion_pb2

__all__ = ["METHODS", "METHOD_NAMES", "PRESETS", "EditSourceProto", "HasInversionProto", "invert_request", "edit_request"]

# SDK method name -> InversionMethod. The method also picks Edit's pipeline (unconditional
# embedding, ProxEdit defaults): see the proto's InversionMethod.
METHODS: dict[str, inversion_pb2.InversionMethod] = {
    "ddim": inversion_pb2.DDIM,
    "spdinv": inversion_pb2.SPDINV,
    "npi": inversion_pb2.NPI,
    "proxnpi": inversion_pb2.PROXNPI,
    "direct_inversion": inversion_pb2.DIRECT_INVERSION,
    "null_text": inversion_pb2.NULL_TEXT,
    "fixed_point": inversion_pb2.FIXED_POINT,
}
METHOD_NAMES: dict[int, str] = {value: name for name, value in METHODS.items()}
METHOD_NAMES[inversion_pb2.INVERSION_METHOD_UNSPECIFIED] = "spdinv"
PRESETS: dict[Optional[str], inversion_pb2.EditPreset] = {
    None: inversion_pb2.EDIT_PRESET_UNSPECIFIED,
    "spdinv": inversion_pb2.SPDINV_PIPELINE,
}
_ENGINES: dict[str, inversion_pb2.EditEngine] = {"p2p": inversion_pb2.P2P, "masactrl": inversion_pb2.MASACTRL}
_P2P_MODES: dict[Optional[str], inversion_pb2.P2POptions.Mode] = {
    None: inversion_pb2.P2POptions.MODE_UNSPECIFIED,
    "replace": inversion_pb2.P2POptions.REPLACE,
    "refine": inversion_pb2.P2POptions.REFINE,
    "reweight": inversion_pb2.P2POptions.REWEIGHT,
}
# Inversion options -> the methods they apply to (the others ignore them on the server, so
# the SDK refuses them rather than let a caller believe they took effect).
_METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "max_rounds": ("spdinv", "fixed_point"),
    "loss_threshold": ("spdinv", "fixed_point"),
    "learning_rate": ("spdinv",),
    "weight_decay": ("spdinv",),
    "check_first": ("spdinv",),
    "anderson_memory": ("fixed_point",),
    "null_text_guidance_scale": ("null_text",),
}


class HasInversionProto(Protocol):
    """What carries an InversionResult (``atelier.Inversion``)."""

    @property
    def proto(self) -> inversion_pb2.InversionResult: ...


# An Edit's source: an Inversion, the server's result as is, or an image to invert in the same call.
EditSourceProto = Union[HasInversionProto, inversion_pb2.InversionResult, ImageLike]


def _foreign(options: dict[str, object], applies: dict[str, tuple[str, ...]], key: str, what: str) -> None:
    foreign = [name for name, value in options.items() if value is not None and key not in applies[name]]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} do not apply to {what}={key!r}")


def invert_request(
    image: ImageLike,
    prompt: str,
    method: str = "spdinv",
    num_inference_steps: int = 50,
    return_chain: bool = False,
    max_rounds: Optional[int] = None,
    learning_rate: Optional[float] = None,
    loss_threshold: Optional[float] = None,
    weight_decay: Optional[float] = None,
    model: Optional[str] = None,
    image_argument: str = "image",
    *,
    check_first: Optional[bool] = None,
    anderson_memory: Optional[int] = None,
    null_text_guidance_scale: Optional[float] = None,
) -> inversion_pb2.InvertRequest:
    """The InvertRequest for ``invert``'s arguments (see ``InversionClient.invert``)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    method_value = choice(method, METHODS, "inversion method")
    method_name = METHOD_NAMES[method_value]
    options: dict[str, object] = {
        "max_rounds": max_rounds, "learning_rate": learning_rate, "loss_threshold": loss_threshold,
        "weight_decay": weight_decay, "check_first": check_first, "anderson_memory": anderson_memory,
        "null_text_guidance_scale": null_text_guidance_scale}
    _foreign(options, _METHOD_OPTIONS, method_name, "method")
    request = inversion_pb2.InvertRequest(
        model=common_pb2.ModelRef(name=model or ""),
        image=to_image_proto(image, image_argument),
        prompt=prompt,
        method=method_value,
        num_inference_steps=num_inference_steps,
        return_chain=return_chain,
    )
    rounds = request.fixed_point if method_name == "fixed_point" else request.spdinv
    if max_rounds is not None:
        rounds.max_rounds = max_rounds
    if loss_threshold is not None:
        rounds.loss_threshold = loss_threshold
    if learning_rate is not None:
        request.spdinv.learning_rate = learning_rate
    if weight_decay is not None:
        request.spdinv.weight_decay = weight_decay
    if check_first is not None:
        request.spdinv.check_first = check_first
    if anderson_memory is not None:
        request.fixed_point.anderson_memory = anderson_memory
    if null_text_guidance_scale is not None:
        request.null_text.guidance_scale = null_text_guidance_scale
    return request


def edit_request(
    source: EditSourceProto,
    target_prompt: str,
    engine: str = "p2p",
    guidance_scale: Optional[float] = None,
    *,
    return_source: bool = False,
    source_prompt: Optional[str] = None,
    method: Optional[str] = None,
    num_inference_steps: Optional[int] = None,
    max_rounds: Optional[int] = None,
    learning_rate: Optional[float] = None,
    loss_threshold: Optional[float] = None,
    weight_decay: Optional[float] = None,
    check_first: Optional[bool] = None,
    anderson_memory: Optional[int] = None,
    null_text_guidance_scale: Optional[float] = None,
    preset: Optional[str] = None,
    proximal_guidance: Optional[bool] = None,
    quantile: Optional[float] = None,
    inversion_guidance: Optional[bool] = None,
    inversion_guidance_timestep: Optional[int] = None,
    mode: Optional[str] = None,
    cross_replace_fraction: Optional[float] = None,
    self_replace_fraction: Optional[float] = None,
    reweight: Optional[dict[str, float]] = None,
    blend_words: Optional[Sequence[str]] = None,
    blend_threshold: Optional[float] = None,
    start_step: Optional[int] = None,
    start_layer: Optional[int] = None,
    end_step: Optional[int] = None,
    mask_source_words: Optional[Sequence[str]] = None,
    mask_target_words: Optional[Sequence[str]] = None,
    mask_threshold: Optional[float] = None,
    model: Optional[str] = None,
) -> inversion_pb2.EditRequest:
    """The EditRequest for ``edit``'s arguments (see ``InversionClient.edit``)."""
    if not isinstance(target_prompt, str):
        raise TypeError(f"target_prompt must be a str, got {type(target_prompt).__name__}")
    engine_value = choice(engine, _ENGINES, "editing engine")
    request = inversion_pb2.EditRequest(
        model=common_pb2.ModelRef(name=model or ""),
        target_prompt=target_prompt,
        engine=engine_value,
        return_source=return_source,
        preset=choice(preset, PRESETS, "edit preset"),
    )
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale

    inversion_options: dict[str, object] = {
        "max_rounds": max_rounds, "learning_rate": learning_rate, "loss_threshold": loss_threshold,
        "weight_decay": weight_decay, "check_first": check_first, "anderson_memory": anderson_memory,
        "null_text_guidance_scale": null_text_guidance_scale}
    carried = getattr(source, "proto", None)
    inversion = carried if isinstance(carried, inversion_pb2.InversionResult) else \
        source if isinstance(source, inversion_pb2.InversionResult) else None
    if inversion is not None:
        _check_matches_inversion(inversion, source_prompt, method, num_inference_steps, inversion_options)
        request.inversion.CopyFrom(inversion)
    else:
        if source_prompt is None:
            raise ValueError("source_prompt is required when editing an image (it is inverted in the same call)")
        request.invert.CopyFrom(
            invert_request(cast(ImageLike, source), source_prompt, method or "spdinv",
                           50 if num_inference_steps is None else num_inference_steps, model=model,
                           image_argument="source", check_first=check_first, max_rounds=max_rounds,
                           learning_rate=learning_rate, loss_threshold=loss_threshold, weight_decay=weight_decay,
                           anderson_memory=anderson_memory, null_text_guidance_scale=null_text_guidance_scale)
        )

    p2p = {
        "mode": mode,
        "cross_replace_fraction": cross_replace_fraction,
        "self_replace_fraction": self_replace_fraction,
        "reweight": reweight,
        "blend_words": blend_words,
        "blend_threshold": blend_threshold,
    }
    masactrl = {"start_step": start_step, "start_layer": start_layer, "end_step": end_step,
                "mask_source_words": mask_source_words, "mask_target_words": mask_target_words,
                "mask_threshold": mask_threshold}
    other_engine = masactrl if engine_value == inversion_pb2.P2P else p2p
    foreign = [name for name, value in other_engine.items() if value is not None]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} do not apply to engine={engine!r}")

    request.p2p.mode = choice(mode, _P2P_MODES, "p2p mode")
    set_present(request.p2p, {"cross_replace_fraction": cross_replace_fraction,
                              "self_replace_fraction": self_replace_fraction, "blend_threshold": blend_threshold})
    request.p2p.reweight.update(reweight or {})
    request.p2p.blend_words.extend(blend_words or [])

    set_present(request.masactrl, {"start_step": start_step, "start_layer": start_layer, "end_step": end_step,
                                   "mask_threshold": mask_threshold})
    for argument, words, into in (("mask_source_words", mask_source_words, request.masactrl.mask_source_words),
                                  ("mask_target_words", mask_target_words, request.masactrl.mask_target_words)):
        if words is not None:  # extend() even by nothing would mark masactrl as set
            into.extend(_words(words, argument))

    set_present(request.prox_edit, {"proximal_guidance": proximal_guidance, "quantile": quantile,
                                    "inversion_guidance": inversion_guidance,
                                    "inversion_guidance_timestep": inversion_guidance_timestep})
    return request


def _words(words: Sequence[str], argument: str) -> list[str]:
    """A list of words; a bare string is refused (it would be split into letters)."""
    if isinstance(words, str):
        raise TypeError(f"{argument} must be a list of words, not a str")
    return list(words)


def _check_matches_inversion(inversion: inversion_pb2.InversionResult, source_prompt: Optional[str],
                             method: Optional[str], num_inference_steps: Optional[int],
                             inversion_options: dict[str, object]) -> None:
    """Options that only apply to an image must not contradict (or pretend to change) a given inversion."""
    mismatches = []
    if source_prompt is not None and source_prompt != inversion.prompt:
        mismatches.append(f"source_prompt {source_prompt!r} (inverted with {inversion.prompt!r})")
    inverted_with = METHOD_NAMES.get(inversion.method, "")
    if method is not None and choice(method, METHODS, "inversion method") != METHODS.get(inverted_with):
        mismatches.append(f"method {method!r} (inverted with {inverted_with!r})")
    if num_inference_steps is not None and num_inference_steps != inversion.num_inference_steps:
        mismatches.append(f"num_inference_steps {num_inference_steps} (inverted with {inversion.num_inference_steps})")
    given = [name for name, value in inversion_options.items() if value is not None]
    if given:
        mismatches.append(f"{', '.join(given)} (inversion options: they apply only when source is an image)")
    if mismatches:
        raise ValueError("the inversion given does not match: " + "; ".join(mismatches))
