"""Client of the Synthesis service: GradOP+ and SDEdit from scribbles, ISA-DCA variations."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image as PILImage

from atelier.sdk import codec
from atelier.sdk.common import ImageLike, Usage, choice, set_present, to_image_proto
from atelier.sdk.progress import CancelToken, ProgressArg
from atelier.sdk.transport import _Transport
from atelier.v1 import common_pb2, synthesis_pb2, synthesis_pb2_grpc

__all__ = ["SynthesisClient", "Region", "SynthesisResult", "VariationsResult", "Preview", "CallOptions",
           "generate_request", "variations_request", "GRADOP_PLUS", "SDEDIT"]

GRADOP_PLUS = synthesis_pb2.GRADOP_PLUS
SDEDIT = synthesis_pb2.SDEDIT

_PAINTINGS = {
    "gaussian_blur": synthesis_pb2.GAUSSIAN_BLUR,
    "median_quantize": synthesis_pb2.MEDIAN_QUANTIZE,
}
_INVERSIONS = {"ddim": synthesis_pb2.INVERSION_DDIM, "spdinv": synthesis_pb2.INVERSION_SPDINV}
_SCHEDULES = {"constant": synthesis_pb2.CONSTANT, "linear": synthesis_pb2.LINEAR}


@dataclass(frozen=True)
class Region:
    """A scribble region bound to a phrase of the prompt: ``mask`` (H, W) bool/uint8 at the
    scribble's size, or ``color`` (an (r, g, b) tuple or 0xRRGGBB) selecting scribble pixels."""

    phrase: str
    mask: Optional[np.ndarray] = None
    color: Union[None, int, tuple[int, int, int]] = None
    weight: Optional[float] = None

    def to_proto(self, index: int) -> synthesis_pb2.Region:
        if (self.mask is None) == (self.color is None):
            raise ValueError(f"regions[{index}]: give exactly one of mask or color")
        message = synthesis_pb2.Region(phrase=self.phrase)
        color = self.color
        if self.mask is not None:
            message.mask.CopyFrom(codec.mask_from_numpy(np.asarray(self.mask)))
        elif isinstance(color, (tuple, list)):
            r, g, b = (int(c) for c in color)
            message.color = (r << 16) | (g << 8) | b
        elif color is not None:
            message.color = int(color)
        if self.weight is not None:
            message.weight = self.weight
        return message


@dataclass(frozen=True)
class Preview:
    """A low-resolution look at the current prediction (every ``preview_every`` steps)."""

    step: int
    total: int
    image: PILImage.Image

    @classmethod
    def from_proto(cls, msg: synthesis_pb2.Preview) -> "Preview":
        return cls(msg.step, msg.total, codec.image_to_pil(msg.image, "preview.image"))


@dataclass(frozen=True, eq=False)
class SynthesisResult:
    image: PILImage.Image
    seed: int
    stroke_loss: float  # MSE(paint(image), scribble)
    usage: Usage
    proto: synthesis_pb2.GenerateResult = field(repr=False)

    @classmethod
    def from_proto(cls, msg: synthesis_pb2.GenerateResult) -> "SynthesisResult":
        return cls(image=codec.image_to_pil(msg.image, "result.image"), seed=msg.seed,
                   stroke_loss=msg.stroke_loss, usage=Usage.from_proto(msg.usage), proto=msg)


@dataclass(frozen=True, eq=False)
class VariationsResult:
    images: list[PILImage.Image]
    seed: int
    dca_path: str  # "ip_adapter" or "text"
    request_id: str
    usage: Usage
    inversion_usage: Usage
    proto: synthesis_pb2.VariationsResult = field(repr=False)

    @classmethod
    def from_proto(cls, msg: synthesis_pb2.VariationsResult) -> "VariationsResult":
        return cls(images=[codec.image_to_pil(image, f"result.images[{i}]") for i, image in enumerate(msg.images)],
                   seed=msg.seed, dca_path=msg.dca_path, request_id=msg.request_id,
                   usage=Usage.from_proto(msg.usage), inversion_usage=Usage.from_proto(msg.inversion_usage),
                   proto=msg)


@dataclass
class CallOptions:
    """The per-call options every Synthesis call takes besides its request fields."""

    progress: ProgressArg = None
    timeout: Optional[float] = None
    cancel: Optional[CancelToken] = None
    preview_every: int = 0
    on_preview: Optional[Callable[[Preview], object]] = None

    @classmethod
    def pop(cls, options: dict[str, Any]) -> "CallOptions":
        call = cls(**{name: options.pop(name) for name in list(options)
                      if name in ("progress", "timeout", "cancel", "preview_every", "on_preview")})
        if call.on_preview is not None and not call.preview_every:
            raise ValueError("on_preview needs preview_every (a step interval)")
        if call.preview_every < 0:
            raise ValueError(f"preview_every must be >= 0, got {call.preview_every}")
        return call

    def stream_handlers(self) -> Optional[Mapping[str, Callable[[Any], object]]]:
        """Handlers of the stream's third event kind (previews), for the transport's collector."""
        on_preview = self.on_preview
        if on_preview is None:
            return None
        return {"preview": lambda msg: on_preview(Preview.from_proto(msg))}

    @property
    def retry(self) -> bool:
        # A retried attempt would show its previews again: calls with previews are not retried.
        return self.on_preview is None


def generate_request(method: "synthesis_pb2.SynthesisMethod", scribble: ImageLike, prompt: str, strength: float,
                     options: dict[str, Any]) -> tuple[synthesis_pb2.GenerateRequest, CallOptions]:
    """The GenerateRequest and call options for ``gradop``/``sdedit``'s arguments (shared by the
    sync and asyncio clients); ``options`` is consumed, an unknown name raises TypeError."""
    call = CallOptions.pop(options)
    request = synthesis_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name=options.pop("model", None) or ""),
        scribble=to_image_proto(scribble, "scribble"), prompt=_text(prompt, "prompt"), method=method,
        strength=strength, negative_prompt=_text(options.pop("negative_prompt", None) or "", "negative_prompt"),
        preview_every=call.preview_every)
    painting = options.pop("painting", None)
    if painting is not None:
        request.painting = choice(painting, _PAINTINGS, "painting function")
    for index, region in enumerate(options.pop("regions", None) or ()):
        if not isinstance(region, Region):
            raise TypeError(f"regions[{index}]: expected atelier.sdk.synthesis.Region, got {type(region).__name__}")
        request.regions.append(region.to_proto(index))
    _set_optional(request, options, ("num_inference_steps", "guidance_scale", "seed", "iterative_steps",
                                     "grad_steps", "learning_rate", "region_kappa"))
    return request, call


def variations_request(image: ImageLike, prompt: str, n: int, lam: float, inversion: str,
                       options: dict[str, Any]) -> tuple[synthesis_pb2.VariationsRequest, CallOptions]:
    """The VariationsRequest and call options for ``variations``' arguments (sync and asyncio)."""
    call = CallOptions.pop(options)
    request = synthesis_pb2.VariationsRequest(
        model=common_pb2.ModelRef(name=options.pop("model", None) or ""),
        image=to_image_proto(image, "image"), prompt=_text(prompt, "prompt"), n=n, lam=lam,
        inversion=choice(inversion, _INVERSIONS, "inversion method"),
        negative_prompt=_text(options.pop("negative_prompt", None) or "", "negative_prompt"),
        dca_text=_text(options.pop("dca_text", None) or "", "dca_text"),
        preview_every=call.preview_every)
    schedule = options.pop("lambda_schedule", None)
    if schedule is not None:
        request.lambda_schedule = choice(schedule, _SCHEDULES, "lambda schedule")
    _set_optional(request, options, ("num_inference_steps", "guidance_scale", "seed", "interpolation_until",
                                     "ip_adapter_scale", "permute"))
    return request, call


class SynthesisClient:
    """``client.synthesis``: scribble-to-image (GradOP+, SDEdit) and image variations (ISA-DCA).

    Every call takes ``progress`` (None, True for a tqdm bar, or a callable), ``timeout``,
    ``cancel`` (an ``atelier.CancelToken``), and ``on_preview`` (a callable receiving ``Preview``
    every ``preview_every`` steps). ``seed`` makes results reproducible (same seed, same bytes on CPU).
    The ``*_result`` variants return the result object (seed, stroke loss, usage).
    """

    def __init__(self, transport: _Transport):
        self._transport = transport
        self._stub = synthesis_pb2_grpc.SynthesisStub(transport.channel)

    def gradop(self, scribble: ImageLike, prompt: str, strength: float = 0.8, **options: Any) -> PILImage.Image:
        """GradOP+: text-to-image sampling whose latent is optimised toward the scribble.

        Options: negative_prompt, num_inference_steps (50), guidance_scale (7.5), seed,
        iterative_steps (3), grad_steps (12), learning_rate (0.1), painting ("gaussian_blur" or
        "median_quantize"), regions (a list of ``Region``), region_kappa (0.4), model,
        preview_every, on_preview, progress, timeout, cancel.
        """
        return self.gradop_result(scribble, prompt, strength, **options).image

    def gradop_result(self, scribble: ImageLike, prompt: str, strength: float = 0.8,
                      **options: Any) -> SynthesisResult:
        request, call = generate_request(GRADOP_PLUS, scribble, prompt, strength, options)
        return SynthesisResult.from_proto(self._call(self._stub.Generate, request, call))

    def sdedit(self, scribble: ImageLike, prompt: str, strength: float = 0.8, **options: Any) -> PILImage.Image:
        """SDEdit (diffusers img2img) from the scribble: the baseline. Options as ``gradop``
        without the GradOP+ ones (painting only chooses how ``stroke_loss`` is measured)."""
        return self.sdedit_result(scribble, prompt, strength, **options).image

    def sdedit_result(self, scribble: ImageLike, prompt: str, strength: float = 0.8,
                      **options: Any) -> SynthesisResult:
        request, call = generate_request(SDEDIT, scribble, prompt, strength, options)
        return SynthesisResult.from_proto(self._call(self._stub.Generate, request, call))

    def variations(self, image: ImageLike, prompt: str, n: int = 4, lam: float = 0.7, inversion: str = "ddim",
                   **options: Any) -> list[PILImage.Image]:
        """ISA-DCA variations of ``image``: ``n`` PIL images. Options: negative_prompt,
        num_inference_steps (50), guidance_scale (7), seed, lambda_schedule ("constant" or
        "linear"), interpolation_until (K, 600), ip_adapter_scale (1.0), dca_text, permute (True),
        model, preview_every, on_preview, progress, timeout, cancel."""
        return self.variations_result(image, prompt, n, lam, inversion, **options).images

    def variations_result(self, image: ImageLike, prompt: str, n: int = 4, lam: float = 0.7,
                          inversion: str = "ddim", **options: Any) -> VariationsResult:
        request, call = variations_request(image, prompt, n, lam, inversion, options)
        return VariationsResult.from_proto(self._call(self._stub.Variations, request, call))

    def _call(self, method: Any, request: Any, call: CallOptions) -> Any:
        return self._transport.stream(method, request, call.timeout, call.progress, cancel=call.cancel,
                                      retry=call.retry, handlers=call.stream_handlers())


def _text(value: object, argument: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, got {type(value).__name__}")
    return value


def _set_optional(request: Any, options: dict[str, Any], names: Sequence[str]) -> None:
    set_present(request, {name: options.pop(name, None) for name in names})
    if options:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(options))}")
