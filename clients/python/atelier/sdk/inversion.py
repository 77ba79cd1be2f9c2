"""Client of the Inversion service: DDIM / SPDInv inversion and P2P / MasaCtrl editing."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image as PILImage

from atelier.sdk import codec
from atelier.sdk.common import ImageLike, Usage, choice, to_image_proto
from atelier.sdk.progress import CancelToken, ProgressArg
from atelier.sdk.transport import _Transport
from atelier.v1 import common_pb2, inversion_pb2, inversion_pb2_grpc

__all__ = ["InversionClient", "Inversion", "StepDiagnostics", "EditResult"]

_METHODS = {"ddim": inversion_pb2.DDIM, "spdinv": inversion_pb2.SPDINV}
_METHOD_NAMES = {value: name for name, value in _METHODS.items()}
_METHOD_NAMES[inversion_pb2.INVERSION_METHOD_UNSPECIFIED] = "spdinv"
_ENGINES = {"p2p": inversion_pb2.P2P, "masactrl": inversion_pb2.MASACTRL}
_P2P_MODES = {
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
        return self.proto.SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Inversion":
        return cls.from_proto(inversion_pb2.InversionResult.FromString(data))


@dataclass(frozen=True, eq=False)
class EditResult:
    """An edit with its extras: ``source_image`` is the source branch's
    reconstruction (present when ``return_source=True``)."""

    image: PILImage.Image
    source_image: Optional[PILImage.Image]
    usage: Usage
    proto: inversion_pb2.EditResult = field(repr=False)

    @classmethod
    def from_proto(cls, msg: inversion_pb2.EditResult) -> "EditResult":
        source = codec.image_to_pil(msg.source_image, "result.source_image") if msg.HasField("source_image") else None
        return cls(codec.image_to_pil(msg.image, "result.image"), source, Usage.from_proto(msg.usage), msg)


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
        request = self._invert_request(
            image, prompt, method, num_inference_steps, return_chain, max_rounds, learning_rate, loss_threshold, weight_decay, model
        )
        result = self._transport.stream(self._stub.Invert, request, timeout, progress, cancel=cancel)
        return Inversion.from_proto(result)

    def edit(
        self,
        source: Union[Inversion, inversion_pb2.InversionResult, PILImage.Image, np.ndarray],
        target_prompt: str,
        engine: str = "p2p",
        guidance_scale: Optional[float] = 7.5,
        *,
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
    ) -> PILImage.Image:
        """Edit towards ``target_prompt``; returns the edited image.

        ``source`` is an ``Inversion`` (from ``invert``) or an image; an image needs
        ``source_prompt`` and is inverted in the same call with ``method`` (default
        "spdinv") and ``num_inference_steps`` (default 50). ``engine="p2p"`` takes ``mode``
        ("replace", "refine", "reweight"; default: chosen by the server),
        ``cross_replace_fraction``/``self_replace_fraction``, ``reweight`` {word: scale},
        ``blend_words`` and ``blend_threshold``; ``engine="masactrl"`` takes
        ``start_step`` and ``start_layer``. Use ``edit_result`` for the source
        reconstruction and usage as well.
        """
        options = {k: v for k, v in locals().items() if k not in ("self", "progress", "timeout", "cancel")}
        return self._edit(options, return_source=False, progress=progress, timeout=timeout, cancel=cancel).image

    def edit_result(
        self,
        source: Union[Inversion, inversion_pb2.InversionResult, PILImage.Image, np.ndarray],
        target_prompt: str,
        engine: str = "p2p",
        guidance_scale: Optional[float] = 7.5,
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
        """Like ``edit`` but returns an ``EditResult`` (image, usage, and with
        ``return_source=True`` the source branch's reconstruction)."""
        options = {
            k: v for k, v in locals().items() if k not in ("self", "progress", "timeout", "cancel", "return_source")
        }
        return self._edit(options, return_source=return_source, progress=progress, timeout=timeout, cancel=cancel)

    # ------------------------------------------------------------------ requests

    def _edit(self, options: dict, return_source: bool, progress, timeout, cancel) -> EditResult:
        request = self._edit_request(return_source=return_source, **options)
        result = self._transport.stream(self._stub.Edit, request, timeout, progress, cancel=cancel)
        return EditResult.from_proto(result)

    @staticmethod
    def _invert_request(
        image, prompt, method, num_inference_steps, return_chain, max_rounds, learning_rate, loss_threshold, weight_decay, model
    ) -> inversion_pb2.InvertRequest:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        request = inversion_pb2.InvertRequest(
            model=common_pb2.ModelRef(name=model or ""),
            image=to_image_proto(image),
            prompt=prompt,
            method=choice(method, _METHODS, "inversion method"),
            num_inference_steps=num_inference_steps,
            return_chain=return_chain,
        )
        spdinv = {
            "max_rounds": max_rounds,
            "learning_rate": learning_rate,
            "loss_threshold": loss_threshold,
            "weight_decay": weight_decay,
        }
        for name, value in spdinv.items():
            if value is not None:
                setattr(request.spdinv, name, value)
        return request

    def _edit_request(
        self,
        source,
        target_prompt: str,
        engine: str,
        guidance_scale: Optional[float],
        return_source: bool,
        source_prompt: Optional[str],
        method: Optional[str],
        num_inference_steps: Optional[int],
        mode: Optional[str],
        cross_replace_fraction: Optional[float],
        self_replace_fraction: Optional[float],
        reweight: Optional[dict[str, float]],
        blend_words: Optional[Sequence[str]],
        blend_threshold: Optional[float],
        start_step: Optional[int],
        start_layer: Optional[int],
        model: Optional[str],
    ) -> inversion_pb2.EditRequest:
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
            self._check_matches_inversion(source, source_prompt, method, num_inference_steps)
            request.inversion.CopyFrom(source)
        else:
            if source_prompt is None:
                raise ValueError("source_prompt is required when editing an image (it is inverted in the same call)")
            request.invert.CopyFrom(
                self._invert_request(
                    source, source_prompt, method or "spdinv", 50 if num_inference_steps is None else num_inference_steps, False,
                    None, None, None, None, model,
                )
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

    @staticmethod
    def _check_matches_inversion(inversion, source_prompt, method, num_inference_steps) -> None:
        """Options that only apply to an image must not contradict a given inversion."""
        mismatches = []
        if source_prompt is not None and source_prompt != inversion.prompt:
            mismatches.append(f"source_prompt {source_prompt!r} (inverted with {inversion.prompt!r})")
        inverted_with = _METHOD_NAMES.get(inversion.method)
        if method is not None and choice(method, _METHODS, "inversion method") != _METHODS.get(inverted_with):
            mismatches.append(f"method {method!r} (inverted with {inverted_with!r})")
        if num_inference_steps is not None and num_inference_steps != inversion.num_inference_steps:
            mismatches.append(
                f"num_inference_steps {num_inference_steps} (inverted with {inversion.num_inference_steps})"
            )
        if mismatches:
            raise ValueError("the inversion given does not match: " + "; ".join(mismatches))
