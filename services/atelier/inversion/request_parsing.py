"""An InvertRequest's fields -> an InvertJob, and the checks Invert and Edit share.

Proto in, params out (no gRPC status, no tensor math). Field violations name the argument
the SDK user passed (``client.inversion.invert``/``edit``), not the proto path: ``args`` maps
an InvertRequest field to that argument.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from atelier.core import codecs
from atelier.core.errors import InvalidArgument, Violations
from atelier.core.models import SD, ModelRegistry, fit_to_vae
from atelier.sdk import codec
from atelier.v1 import common_pb2, inversion_pb2

__all__ = ["METHODS", "INVERT_ARGS", "Limits", "InvertJob", "RequestParser"]

METHODS = {
    inversion_pb2.INVERSION_METHOD_UNSPECIFIED: "spdinv",
    inversion_pb2.DDIM: "ddim",
    inversion_pb2.SPDINV: "spdinv",
    inversion_pb2.NPI: "npi",
    inversion_pb2.PROXNPI: "proxnpi",
    inversion_pb2.DIRECT_INVERSION: "directinv",
    inversion_pb2.NULL_TEXT: "nti",
    inversion_pb2.FIXED_POINT: "fixed_point",
}
# InvertRequest field -> the SDK argument that sets it in invert().
INVERT_ARGS = {name: name for name in ("image", "prompt", "method", "num_inference_steps", "model")}

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
    null_text_guidance: float | None = None  # None: the model's default, or the edit's guidance inside Edit


class RequestParser:
    """The request checks of one inversion service (its models, default model and limits)."""

    def __init__(self, registry: ModelRegistry, default_model: str, limits: Limits = Limits()):
        self.registry = registry
        self.default_model = default_model
        self.limits = limits

    def model_name(self, ref: common_pb2.ModelRef, field: str) -> str:
        name = ref.name or self.default_model
        self.registry.check(name, kind=SD)  # NotFound if unknown, FailedPrecondition if not servable
        return name

    def steps(self, request, field: str) -> int:
        steps = request.num_inference_steps if request.HasField("num_inference_steps") else 50
        if not 1 <= steps <= self.limits.max_steps:
            raise InvalidArgument(field, f"must be between 1 and {self.limits.max_steps}, got {steps}")
        return steps

    def prompt(self, text: str, field: str) -> str:
        if len(text) > self.limits.max_prompt_chars:
            raise InvalidArgument(field, f"longer than {self.limits.max_prompt_chars} characters")
        return text

    def parse_invert(self, request: inversion_pb2.InvertRequest, args: dict[str, str] = INVERT_ARGS) -> InvertJob:
        """The job for an InvertRequest; every bad field is reported at once (one InvalidArgument).
        The model comes first (NotFound / FAILED_PRECONDITION): the image is fitted to its VAE."""
        violations = Violations()
        model = self.model_name(request.model, args["model"])
        image = None
        if not request.HasField("image"):
            violations.add(args["image"], "an image is required")
        else:
            pixels = violations.attempt(codec.image_to_pil, request.image, field=args["image"],
                                        max_pixels=self.limits.max_pixels)
            if pixels is not None:
                fitted = violations.attempt(fit_to_vae, pixels, self.registry.info(model), args["image"])
                if fitted is not None:
                    image = codecs.array_to_torch(np.array(fitted))
        method = METHODS.get(request.method)
        if method is None:
            violations.add(args["method"], f"unknown inversion method {request.method}")
        opts = request.fixed_point if method == "fixed_point" else request.spdinv
        group = "fixed_point" if method == "fixed_point" else "spdinv"
        spdinv = {}
        if opts.HasField("max_rounds"):
            if not 0 <= opts.max_rounds <= self.limits.max_spdinv_rounds:
                violations.add("max_rounds", f"must be between 0 and {self.limits.max_spdinv_rounds}")
            spdinv["max_rounds"] = opts.max_rounds
        names = ("loss_threshold",) if group == "fixed_point" else ("learning_rate", "loss_threshold", "weight_decay")
        for name in names:
            if opts.HasField(name):
                value = getattr(opts, name)
                if not np.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0):
                    violations.add(name, f"must be a finite positive number, got {value}")
                elif value > _SPDINV_UPPER_BOUNDS[name]:
                    violations.add(name, f"must be at most {_SPDINV_UPPER_BOUNDS[name]:g}, got {value:g}")
                spdinv[name] = value
        if group == "spdinv" and opts.HasField("check_first"):
            spdinv["check_first"] = opts.check_first
        if group == "fixed_point" and opts.HasField("anderson_memory"):
            if not 0 <= opts.anderson_memory <= 16:
                violations.add("anderson_memory", "must be between 0 and 16")
            spdinv["anderson_memory"] = opts.anderson_memory
        null_text_guidance = None
        if request.null_text.HasField("guidance_scale"):
            null_text_guidance = request.null_text.guidance_scale
            if not np.isfinite(null_text_guidance) or not 0.0 <= null_text_guidance <= 50.0:
                violations.add("null_text_guidance_scale", "must be between 0 and 50")
        prompt = violations.attempt(self.prompt, request.prompt, args["prompt"])
        steps = violations.attempt(self.steps, request, args["num_inference_steps"])
        violations.raise_if_any()
        return InvertJob(
            model=model,
            image=image,
            prompt=prompt,
            method=method,
            steps=steps,
            return_chain=request.return_chain,
            spdinv=spdinv,
            null_text_guidance=null_text_guidance,
        )
