"""Synthesis service: proto <-> method translation only (no tensor math here)."""
from __future__ import annotations

import dataclasses
import io
import logging
import secrets
from typing import Optional

import numpy as np
import torch
from PIL import Image as PILImage

from atelier.core import codecs
from atelier.core.attention import controlled_attention
from atelier.core.errors import InvalidArgument
from atelier.core.catalog import ListModelsRpc
from atelier.core.models import SD, ModelRegistry
from atelier.core.streaming import stream_call
from atelier.synthesis.gradop import SynthesisParams, check_gradop, gradop_plus, sdedit
from atelier.synthesis.regions import DEFAULT_KAPPA, RegionBinding, RegionController, phrase_tokens, region_hook
from atelier.v1 import common_pb2, synthesis_pb2, synthesis_pb2_grpc, tensor_pb2

SERVICE_NAME = synthesis_pb2.DESCRIPTOR.services_by_name["Synthesis"].full_name
_LOG = logging.getLogger(__name__)

_METHODS = {
    synthesis_pb2.SYNTHESIS_METHOD_UNSPECIFIED: "gradop_plus",
    synthesis_pb2.GRADOP_PLUS: "gradop_plus",
    synthesis_pb2.SDEDIT: "sdedit",
}
_PAINTINGS = {
    synthesis_pb2.PAINTING_FUNCTION_UNSPECIFIED: "gaussian_blur",
    synthesis_pb2.GAUSSIAN_BLUR: "gaussian_blur",
    synthesis_pb2.MEDIAN_QUANTIZE: "median_quantize",
}


@dataclasses.dataclass(frozen=True)
class Limits:
    max_pixels: int = 1024 * 1024
    max_steps: int = 1000
    max_grad_steps: int = 1000
    max_prompt_chars: int = 2000
    max_regions: int = 16
    max_variations: int = 16


@dataclasses.dataclass
class GenerateJob:
    model: str
    method: str
    scribble: torch.Tensor  # (1, 3, H, W) in [0, 1]
    prompt: str
    negative_prompt: str
    params: SynthesisParams
    regions: list  # [(mask (H, W) bool, phrase, weight)]
    kappa: float


def check_seed(request, field: str = "seed") -> int:
    if not request.HasField("seed"):
        return secrets.randbits(63)
    if request.seed < 0:
        raise InvalidArgument(field, f"must be >= 0, got {request.seed}")
    return request.seed


def decode_rgb(image: tensor_pb2.Image, field: str, max_pixels: int) -> torch.Tensor:
    """An RGB image -> (1, 3, H, W) float32 in [0, 1]; other modes (grey, RGBA, palette) are refused:
    a scribble's colours are its meaning, and a silent conversion would change them."""
    if image.encoding != tensor_pb2.Image.RAW_RGB8 and image.data:
        try:
            mode = PILImage.open(io.BytesIO(image.data)).mode
        except Exception:  # noqa: BLE001 - the codec below reports undecodable bytes with the field
            mode = "RGB"
        if mode != "RGB":
            raise InvalidArgument(field, f"must be an RGB image, got mode {mode}")
    return (codecs.image_to_torch(image, field=field, max_pixels=max_pixels, multiple_of=8) + 1) / 2


class SynthesisServicer(ListModelsRpc, synthesis_pb2_grpc.SynthesisServicer):
    def __init__(self, registry: ModelRegistry, executor, default_model: str, limits: Limits = Limits(),
                 variations=None):
        self.model_registry, self.default_model_name = registry, default_model  # ListModels
        self._registry = registry
        self._executor = executor
        self._default_model = default_model
        self._limits = limits
        self._variations = variations  # atelier.synthesis.variations_rpc.VariationsHandler

    # ---- RPCs -------------------------------------------------------------
    def Generate(self, request, context):
        job = self._parse_generate(request)
        model = self.model(job.model, context)
        previews = []
        yield from stream_call(
            context,
            self._executor,
            lambda control: self._run_generate(job, model, control, previews),
            lambda event: _event_message(synthesis_pb2.GenerateEvent, event, previews),
            lambda result, control: synthesis_pb2.GenerateEvent(result=synthesis_pb2.GenerateResult(
                image=codecs.image_from_torch(result.image), seed=job.params.seed,
                stroke_loss=result.stroke_loss, usage=codecs.usage_to_proto(control))),
        )

    def Variations(self, request, context):
        yield from self._variations.handle(request, context)

    # ---- work (runs on the compute executor) ------------------------------
    def model(self, name: str, context):
        """The loaded model, loaded off the compute worker (UNAVAILABLE while still loading)."""
        return self._registry.get(name, kind=SD, remaining=context.time_remaining())

    def _run_generate(self, job: GenerateJob, model, control, previews: list):
        cond, uncond = model.encode_prompt([job.prompt, job.negative_prompt]).chunk(2)
        sink = preview_sink(control, previews)
        if job.method == "sdedit":
            return sdedit(model, job.scribble, cond, uncond, job.params, control, painting=job.params.painting,
                          preview=sink)
        if job.regions:
            bindings = []
            for mask, phrase, weight in job.regions:
                bindings.append(RegionBinding(mask=mask, tokens=phrase_tokens(model.tokenizer, job.prompt, phrase),
                                              weight=weight))
            controller = RegionController(bindings, job.kappa, model.new_scheduler().config.num_train_timesteps)
            latent = tuple(s // model.vae_scale_factor for s in job.scribble.shape[-2:])
            hook = region_hook(controller, job.params.guidance, latent)
            with controlled_attention(model.unet):
                return gradop_plus(model, job.scribble, cond, uncond, job.params, control, attention=hook,
                                   preview=sink)
        return gradop_plus(model, job.scribble, cond, uncond, job.params, control, preview=sink)

    # ---- request parsing (cheap, before the call is queued) -------------
    def model_name(self, ref: common_pb2.ModelRef) -> str:
        name = ref.name or self._default_model
        self._registry.check(name, kind=SD)  # NotFound if unknown, FailedPrecondition if not servable
        return name

    def prompt(self, text: str, field: str) -> str:
        if len(text) > self._limits.max_prompt_chars:
            raise InvalidArgument(field, f"longer than {self._limits.max_prompt_chars} characters")
        return text

    def steps(self, request, default: int = 50) -> int:
        steps = request.num_inference_steps if request.HasField("num_inference_steps") else default
        if not 1 <= steps <= self._limits.max_steps:
            raise InvalidArgument("num_inference_steps", f"must be between 1 and {self._limits.max_steps}, got {steps}")
        return steps

    @staticmethod
    def guidance(request, default: float) -> float:
        guidance = request.guidance_scale if request.HasField("guidance_scale") else default
        if not np.isfinite(guidance) or not 0.0 <= guidance <= 50.0:
            raise InvalidArgument("guidance_scale", f"must be between 0 and 50, got {guidance}")
        return guidance

    def _parse_generate(self, request: synthesis_pb2.GenerateRequest) -> GenerateJob:
        if not request.HasField("scribble"):
            raise InvalidArgument("scribble", "a scribble image is required")
        if request.method not in _METHODS:
            raise InvalidArgument("method", f"unknown synthesis method {request.method}")
        method = _METHODS[request.method]
        if request.painting not in _PAINTINGS:
            raise InvalidArgument("painting", f"unknown painting function {request.painting}")
        model = self.model_name(request.model)
        scribble = decode_rgb(request.scribble, "scribble", self._limits.max_pixels)
        steps = self.steps(request)
        strength = request.strength if request.HasField("strength") else 0.8
        if not np.isfinite(strength) or not 0.0 < strength <= 1.0:
            raise InvalidArgument("strength", f"must be in (0, 1], got {strength}")
        if request.preview_every < 0:
            raise InvalidArgument("preview_every", f"must be >= 0, got {request.preview_every}")
        defaults = SynthesisParams()
        iterative = request.iterative_steps if request.HasField("iterative_steps") else defaults.iterative_steps
        grad_steps = request.grad_steps if request.HasField("grad_steps") else defaults.grad_steps
        learning_rate = request.learning_rate if request.HasField("learning_rate") else defaults.learning_rate
        if iterative < 0:
            raise InvalidArgument("iterative_steps", f"must be >= 0, got {iterative}")
        if not 0 <= grad_steps <= self._limits.max_grad_steps:
            raise InvalidArgument("grad_steps", f"must be between 0 and {self._limits.max_grad_steps}, got {grad_steps}")
        if not np.isfinite(learning_rate) or learning_rate <= 0:
            raise InvalidArgument("learning_rate", f"must be a finite positive number, got {learning_rate}")
        params = SynthesisParams(
            steps=steps, guidance=self.guidance(request, 7.5), strength=strength, seed=check_seed(request),
            iterative_steps=iterative, grad_steps=grad_steps, learning_rate=learning_rate,
            painting=_PAINTINGS[request.painting], preview_every=request.preview_every)
        if method == "gradop_plus":
            try:
                check_gradop(params)
            except ValueError as error:
                raise InvalidArgument("iterative_steps", str(error).partition(": ")[2]) from None
        else:
            scheduler_steps = int(steps * strength)
            if scheduler_steps < 1:
                raise InvalidArgument("strength", f"{strength} with {steps} steps leaves no denoising step")
            if request.regions:
                raise InvalidArgument("regions", "region control applies to method gradop_plus only")
        prompt = self.prompt(request.prompt, "prompt")
        kappa = request.region_kappa if request.HasField("region_kappa") else DEFAULT_KAPPA
        if not np.isfinite(kappa) or not 0.0 <= kappa <= 1.0:
            raise InvalidArgument("region_kappa", f"must be in [0, 1], got {kappa}")
        regions = self._parse_regions(request, scribble, model, prompt)
        return GenerateJob(model=model, method=method, scribble=scribble, prompt=prompt,
                           negative_prompt=self.prompt(request.negative_prompt, "negative_prompt"),
                           params=params, regions=regions, kappa=kappa)

    def _parse_regions(self, request, scribble: torch.Tensor, model: str, prompt: str) -> list:
        if not request.regions:
            return []
        if len(request.regions) > self._limits.max_regions:
            raise InvalidArgument("regions", f"at most {self._limits.max_regions} regions")
        height, width = scribble.shape[-2:]
        tokenizer = None
        regions = []
        for index, region in enumerate(request.regions):
            field = f"regions[{index}]"
            if region.HasField("mask") and region.HasField("color"):
                raise InvalidArgument(field, "set either mask or color, not both")
            if region.HasField("mask"):
                mask = codecs.mask_to_torch(region.mask, field=f"{field}.mask", size=(height, width))
            elif region.HasField("color"):
                if region.color > 0xFFFFFF:
                    raise InvalidArgument(f"{field}.color", f"must be 0xRRGGBB, got {region.color:#x}")
                rgb = torch.tensor([(region.color >> 16) & 255, (region.color >> 8) & 255, region.color & 255])
                pixels = (scribble[0] * 255).round().to(torch.int64)
                mask = (pixels == rgb.view(3, 1, 1)).all(dim=0)
                if not mask.any():
                    raise InvalidArgument(f"{field}.color", f"no scribble pixel has colour {region.color:#08x}")
            else:
                raise InvalidArgument(f"{field}.mask", "a region needs a mask or a color")
            if not mask.any():
                raise InvalidArgument(f"{field}.mask", "the region is empty")
            weight = region.weight if region.HasField("weight") else 1.0
            if not np.isfinite(weight) or not 0.0 < weight <= 10.0:
                raise InvalidArgument(f"{field}.weight", f"must be in (0, 10], got {weight}")
            if tokenizer is None:
                tokenizer = self._registry.load_sd(model).tokenizer
            if not region.phrase.strip() or not phrase_tokens(tokenizer, prompt, region.phrase):
                raise InvalidArgument(f"{field}.phrase", f"{region.phrase!r} is not in the prompt")
            regions.append((mask, region.phrase, weight))
        return regions


def preview_sink(control, previews: list):
    """A PreviewSink that downsizes x0 to 1/4 (at least 32 px) and sends it as a progress-side event.

    The image rides on the progress queue: the stream_call loop turns a ProgressEvent whose
    message is "preview:<k>" into a Preview event with previews[k]."""
    def sink(step: int, total: int, image: torch.Tensor) -> None:
        height, width = image.shape[-2:]
        size = (min(height, max(32, height // 4)), min(width, max(32, width // 4)))
        small = torch.nn.functional.interpolate(image.float(), size=size, mode="area")
        previews.append(codecs.image_from_torch(small))
        control.progress("preview", step, total, message=f"preview:{len(previews) - 1}")
    return sink


def _event_message(event_class, event, previews: list):
    if event.stage == "preview" and event.message.startswith("preview:"):
        image: Optional[tensor_pb2.Image] = previews[int(event.message.partition(":")[2])]
        return event_class(preview=synthesis_pb2.Preview(step=event.step, total=event.total, image=image))
    return event_class(progress=common_pb2.Progress(stage=event.stage, step=event.step, total=event.total,
                                                    message=event.message, elapsed_seconds=event.elapsed_seconds))
