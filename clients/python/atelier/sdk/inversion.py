"""Client of the Inversion service: DDIM / SPDInv inversion and P2P / MasaCtrl editing."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image as PILImage

from atelier.sdk import codec
from atelier.sdk.common import ImageLike, Usage, choice, describe_array, describe_image, to_image_proto
from atelier.sdk.progress import CancelToken, ProgressArg
from atelier.sdk.transport import _Transport
from atelier.v1 import common_pb2, inversion_pb2, inversion_pb2_grpc

__all__ = ["InversionClient", "Inversion", "StepDiagnostics", "EditResult", "EditSource", "invert_request",
           "edit_request"]

_METHODS: dict[str, inversion_pb2.InversionMethod] = {"ddim": inversion_pb2.DDIM,
                                                                   "spdinv": inversion_pb2.SPDINV}
_METHOD_NAMES: dict[int, str] = {value: name for name, value in _METHODS.items()}
_METHOD_NAMES[inversion_pb2.INVERSION_METHOD_UNSPECIFIED] = "spdinv"
_ENGINES: dict[str, inversion_pb2.EditEngine] = {"p2p": inversion_pb2.P2P,
                                                             "masactrl": inversion_pb2.MASACTRL}
_P2P_MODES: dict[Optional[str], inversion_pb2.P2POptions.Mode] = {
    None: inversion_pb2.P2POptions.MODE_UNSPECIFIED,
    "replace": inversion_pb2.P2POptions.REPLACE,
    "refine": inversion_pb2.P2POptions.REFINE,
    "reweight": inversion_pb2.P2POptions.REWEIGHT,
}


@dataclass(frozen=True)
class StepDiagnostics:
    """Inversion step ``index`` (z_index from z_index-1): its fixed-point residual
    MSE(z_t, C1*z_{t-1} + C2*eps(z_t)) and the SPDInv rounds used (0 for DDIM)."""

    index: int
    timestep: int
    residual: float
    rounds: int


@dataclass(frozen=True, eq=False)
class Inversion:
    """An inverted image. ``z_T``: (1, 4, H/8, W/8) float32; ``chain``: z_0..z_T,
    (num_inference_steps+1, 4, H/8, W/8), when requested. ``proto`` is the server's result,
    sent back as is by ``edit``; ``to_bytes``/``from_bytes`` persist it."""

    z_T: np.ndarray
    chain: Optional[np.ndarray]
    diagnostics: list[StepDiagnostics]
    usage: Usage
    prompt: str
    method: str
    num_inference_steps: int
    width: int
    height: int
    model: str
    proto: inversion_pb2.InversionResult = field(repr=False)

    @classmethod
    def from_proto(cls, msg: inversion_pb2.InversionResult) -> "Inversion":
        return cls(
            z_T=codec.tensor_to_numpy(msg.z_t, "result.z_t"),
            chain=codec.tensor_to_numpy(msg.chain, "result.chain") if msg.HasField("chain") else None,
            diagnostics=[StepDiagnostics(d.index, d.timestep, d.residual, d.rounds) for d in msg.diagnostics],
            usage=Usage.from_proto(msg.usage),
            prompt=msg.prompt,
            method=_METHOD_NAMES.get(msg.method, str(msg.method)),
            num_inference_steps=msg.num_inference_steps,
            width=msg.width,
            height=msg.height,
            model=msg.model.name,
            proto=msg,
        )

    def to_bytes(self) -> bytes:
        return bytes(self.proto.SerializeToString())

    def __repr__(self) -> str:
        return (f"Inversion(model={self.model!r}, method={self.method!r}, prompt={self.prompt!r}, "
                f"num_inference_steps={self.num_inference_steps}, size={self.width}x{self.height}, "
                f"z_T={describe_array(self.z_T)}, chain={describe_array(self.chain)}, usage={self.usage!r})")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Inversion":
        return cls.from_proto(inversion_pb2.InversionResult.FromString(data))


@dataclass(frozen=True, eq=False)
class EditResult:
    """An edit: ``image`` (PIL, RGB), ``source_image`` (the source branch's reconstruction,
    present when ``return_source=True``) and ``usage``. ``save(path)`` saves ``image``."""

    image: PILImage.Image
    source_image: Optional[PILImage.Image]
    usage: Usage
    proto: inversion_pb2.EditResult = field(repr=False)

    @classmethod
    def from_proto(cls, msg: inversion_pb2.EditResult) -> "EditResult":
        source = codec.image_to_pil(msg.source_image, "result.source_image") if msg.HasField("source_image") else None
        return cls(codec.image_to_pil(msg.image, "result.image"), source, Usage.from_proto(msg.usage), msg)

    def save(self, path: Union[str, "os.PathLike[str]"], **pil_options: Any) -> None:
        """Save the edited image (PIL's ``Image.save``)."""
        self.image.save(path, **pil_options)

    def __repr__(self) -> str:
        return (f"EditResult(image={describe_image(self.image)}, source_image={describe_image(self.source_image)}, "
                f"usage={self.usage!r})")


# What edit() takes as ``source``: an Inversion (or the server's InversionResult), or an image
# to invert in the same call.
EditSource = Union[Inversion, inversion_pb2.InversionResult, ImageLike]


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
) -> inversion_pb2.InvertRequest:
    """The InvertRequest for ``invert``'s arguments (shared by the sync and asyncio clients)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    request = inversion_pb2.InvertRequest(
        model=common_pb2.ModelRef(name=model or ""),
        image=to_image_proto(image, image_argument),
        prompt=prompt,
        method=choice(method, _METHODS, "inversion method"),
        num_inference_steps=num_inference_steps,
        return_chain=return_chain,
    )
    if max_rounds is not None:
        request.spdinv.max_rounds = max_rounds
    if learning_rate is not None:
        request.spdinv.learning_rate = learning_rate
    if loss_threshold is not None:
        request.spdinv.loss_threshold = loss_threshold
    if weight_decay is not None:
        request.spdinv.weight_decay = weight_decay
    return request


def edit_request(
    source: EditSource,
    target_prompt: str,
    engine: str = "p2p",
    guidance_scale: Optional[float] = None,
    *,
    return_source: bool = False,
    source_prompt: Optional[str] = None,
    method: Optional[str] = None,
    num_inference_steps: Optional[int] = None,
    mode: Optional[str] = None,
    cross_replace_fraction: Optional[float] = None,
    self_replace_fraction: Optional[float] = None,
    reweight: Optional[dict[str, float]] = None,
    blend_words: Optional[Sequence[str]] = None,
    blend_threshold: Optional[float] = None,
    start_step: Optional[int] = None,
    start_layer: Optional[int] = None,
    model: Optional[str] = None,
) -> inversion_pb2.EditRequest:
    """The EditRequest for ``edit``'s arguments (shared by the sync and asyncio clients)."""
    if not isinstance(target_prompt, str):
        raise TypeError(f"target_prompt must be a str, got {type(target_prompt).__name__}")
    engine_value = choice(engine, _ENGINES, "editing engine")
    request = inversion_pb2.EditRequest(
        model=common_pb2.ModelRef(name=model or ""),
        target_prompt=target_prompt,
        engine=engine_value,
        return_source=return_source,
    )
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale

    if isinstance(source, Inversion):
        source = source.proto
    if isinstance(source, inversion_pb2.InversionResult):
        _check_matches_inversion(source, source_prompt, method, num_inference_steps)
        request.inversion.CopyFrom(source)
    else:
        if source_prompt is None:
            raise ValueError("source_prompt is required when editing an image (it is inverted in the same call)")
        request.invert.CopyFrom(
            invert_request(source, source_prompt, method or "spdinv",
                           50 if num_inference_steps is None else num_inference_steps, model=model,
                           image_argument="source")
        )

    p2p = {
        "mode": mode,
        "cross_replace_fraction": cross_replace_fraction,
        "self_replace_fraction": self_replace_fraction,
        "reweight": reweight,
        "blend_words": blend_words,
        "blend_threshold": blend_threshold,
    }
    masactrl = {"start_step": start_step, "start_layer": start_layer}
    other_engine = masactrl if engine_value == inversion_pb2.P2P else p2p
    foreign = [name for name, value in other_engine.items() if value is not None]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} do not apply to engine={engine!r}")
    request.p2p.mode = choice(mode, _P2P_MODES, "p2p mode")
    if cross_replace_fraction is not None:
        request.p2p.cross_replace_fraction = cross_replace_fraction
    if self_replace_fraction is not None:
        request.p2p.self_replace_fraction = self_replace_fraction
    if blend_threshold is not None:
        request.p2p.blend_threshold = blend_threshold
    request.p2p.reweight.update(reweight or {})
    request.p2p.blend_words.extend(blend_words or [])
    if start_step is not None:
        request.masactrl.start_step = start_step
    if start_layer is not None:
        request.masactrl.start_layer = start_layer
    return request


def _check_matches_inversion(inversion: inversion_pb2.InversionResult, source_prompt: Optional[str],
                             method: Optional[str], num_inference_steps: Optional[int]) -> None:
    """Options that only apply to an image must not contradict a given inversion."""
    mismatches = []
    if source_prompt is not None and source_prompt != inversion.prompt:
        mismatches.append(f"source_prompt {source_prompt!r} (inverted with {inversion.prompt!r})")
    inverted_with = _METHOD_NAMES.get(inversion.method, "")
    if method is not None and choice(method, _METHODS, "inversion method") != _METHODS.get(inverted_with):
        mismatches.append(f"method {method!r} (inverted with {inverted_with!r})")
    if num_inference_steps is not None and num_inference_steps != inversion.num_inference_steps:
        mismatches.append(f"num_inference_steps {num_inference_steps} (inverted with {inversion.num_inference_steps})")
    if mismatches:
        raise ValueError("the inversion given does not match: " + "; ".join(mismatches))


class InversionClient:
    """``client.inversion``: invert images and edit them (server-streaming calls with progress).

    Every call takes ``progress`` (None, True for a tqdm bar, or a callable receiving
    ``atelier.Progress``), ``timeout`` (seconds; default: the client's) and ``cancel``
    (an ``atelier.CancelToken``).
    """

    def __init__(self, transport: _Transport):
        self._transport = transport
        self._stub = inversion_pb2_grpc.InversionStub(transport.channel)

    def invert(
        self,
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
        progress: ProgressArg = None,
        timeout: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Inversion:
        """Invert ``image`` under its source ``prompt`` with ``"spdinv"`` or ``"ddim"``.

        SPDInv options left None take the server's defaults (K=25 rounds, lr 1e-3,
        loss threshold 5e-6, weight decay 1e-2).
        """
        request = invert_request(image, prompt, method, num_inference_steps, return_chain, max_rounds,
                                 learning_rate, loss_threshold, weight_decay, model)
        return Inversion.from_proto(self._transport.stream(self._stub.Invert, request, timeout, progress, cancel=cancel))

    def edit(
        self,
        source: EditSource,
        target_prompt: str,
        engine: str = "p2p",
        guidance_scale: Optional[float] = None,
        *,
        return_source: bool = False,
        source_prompt: Optional[str] = None,
        method: Optional[str] = None,
        num_inference_steps: Optional[int] = None,
        mode: Optional[str] = None,
        cross_replace_fraction: Optional[float] = None,
        self_replace_fraction: Optional[float] = None,
        reweight: Optional[dict[str, float]] = None,
        blend_words: Optional[Sequence[str]] = None,
        blend_threshold: Optional[float] = None,
        start_step: Optional[int] = None,
        start_layer: Optional[int] = None,
        model: Optional[str] = None,
        progress: ProgressArg = None,
        timeout: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
    ) -> EditResult:
        """Edit towards ``target_prompt``; returns an ``EditResult`` (``.image``, ``.usage``,
        and with ``return_source=True`` the source branch's reconstruction ``.source_image``).

        ``source`` is an ``Inversion`` (from ``invert``) or an image; an image needs
        ``source_prompt`` and is inverted in the same call with ``method`` (default
        "spdinv") and ``num_inference_steps`` (default 50). ``engine="p2p"`` takes ``mode``
        ("replace", "refine", "reweight"; default: chosen by the server),
        ``cross_replace_fraction``/``self_replace_fraction``, ``reweight`` {word: scale},
        ``blend_words`` and ``blend_threshold``; ``engine="masactrl"`` takes
        ``start_step`` and ``start_layer``. ``guidance_scale=None`` uses the model's default
        (``client.models()``: ``default_guidance_scale``, e.g. 2.5 for the embedded toy).
        """
        request = edit_request(
            source, target_prompt, engine, guidance_scale, return_source=return_source, source_prompt=source_prompt,
            method=method, num_inference_steps=num_inference_steps, mode=mode,
            cross_replace_fraction=cross_replace_fraction, self_replace_fraction=self_replace_fraction,
            reweight=reweight, blend_words=blend_words, blend_threshold=blend_threshold, start_step=start_step,
            start_layer=start_layer, model=model,
        )
        return EditResult.from_proto(self._transport.stream(self._stub.Edit, request, timeout, progress, cancel=cancel))
