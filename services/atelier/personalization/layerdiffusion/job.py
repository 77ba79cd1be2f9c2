"""The ``layer_edit`` job kind: LayerDiffusion behind the personalization job system.

A layer_edit CreateJobRequest carries ``images = [the input image]`` and ``masks = [its object
mask M_t]`` (or none: the segmentation service masks it, like any job), and a LayerEditOptions
body: T_a, T_b, the optional reference O_r with its object mask M_r (segmented in CreateJob when
not given), and one optional field per ``LayerDiffusionParams`` field. Without a reference the
job's first step generates O_r and asks the segmentation service for M_r from the worker (no
caller is waiting then: the job's own id is the request id); both are checkpointed, so a resumed
job never asks again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Optional

import torch

from atelier.core import codecs
from atelier.core.control import CallControl
from atelier.core.errors import InvalidArgument
from atelier.v1 import personalization_pb2

from .generate import METHOD, check_concept, generate_with_concept
from .params import LayerDiffusionParams
from .run import LayerDiffusionRun

__all__ = ["LayerEditMethod", "LayerEditJob"]

_PARAM_FIELDS = tuple(f.name for f in fields(LayerDiffusionParams))
SEGMENT_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class LayerEditJob:
    """Parsed layer_edit options: validated parameters plus the reference inputs as sent."""

    params: LayerDiffusionParams
    options: personalization_pb2.LayerEditOptions


class LayerEditMethod:
    """``TrainingMethod`` for layer_edit. ``segmentation``: the app's SegmentationMasks client."""

    name = METHOD
    needs_class_word = False

    def __init__(self, segmentation=None, max_image_pixels: Optional[int] = None):
        self.segmentation = segmentation
        self.max_image_pixels = max_image_pixels

    def bind(self, segmentation, max_image_pixels: Optional[int]) -> None:
        """The app's segmentation client (for the generated reference) and image size limit."""
        self.segmentation = segmentation
        self.max_image_pixels = max_image_pixels

    # ------------------------------------------------------------------ CreateJob (cheap)
    def parse(self, options: personalization_pb2.LayerEditOptions, class_word: str = "",
              placeholder_token: str = "", initializer_token: str = "") -> LayerEditJob:
        values = {name: getattr(options, name) for name in _PARAM_FIELDS
                  if name in ("object_text", "background_text") or options.HasField(name)}
        return LayerEditJob(LayerDiffusionParams(**values).validate(), options)

    def check_request(self, request: personalization_pb2.CreateJobRequest, size: tuple[int, int]) -> None:
        """The parts of a CreateJobRequest only this method reads (InvalidArgument naming them)."""
        if len(request.images) != 1:
            raise InvalidArgument("image", f"layer_edit edits exactly one image, got {len(request.images)}")
        for field in ("class_images",):
            if len(getattr(request, field)):
                raise InvalidArgument(field, "layer_edit takes no class images")
        if request.masks:
            mask = codecs.mask_to_torch(request.masks[0], field="masks[0]", size=size,
                                        max_pixels=self.max_image_pixels)
            if bool(mask.all()):
                raise InvalidArgument("masks[0]", "the mask is full (no background pixel)")
        options = request.layer_edit
        if options.HasField("reference"):
            reference = codecs.image_to_torch(options.reference, field="reference", max_pixels=self.max_image_pixels)
            if tuple(reference.shape[2:]) != size:
                raise InvalidArgument("reference", f"is {reference.shape[3]}x{reference.shape[2]} (WxH) but the image "
                                                   f"is {size[1]}x{size[0]}: they must have one size")
            if options.HasField("reference_mask"):
                self._reference_mask(options, size)
        elif options.HasField("reference_mask") or options.HasField("reference_mask_prompt"):
            raise InvalidArgument("reference_mask", "a reference mask needs a reference image")
        elif self.segmentation is None or not self.segmentation.address:
            # refused here rather than failing the job at its first step
            raise InvalidArgument("reference", "this server has no segmentation service (--segmentation-address) "
                                               "to mask a generated reference: give a reference and its mask")

    def complete_request(self, inputs: personalization_pb2.CreateJobRequest, size: tuple[int, int],
                         deadline: Optional[float], request_id: str) -> None:
        """Segment the given reference in CreateJob (the caller's deadline and request id)."""
        options = inputs.layer_edit
        if options.HasField("reference") and not options.HasField("reference_mask"):
            prompt = options.reference_mask_prompt if options.HasField("reference_mask_prompt") \
                else personalization_pb2.MaskPrompt()
            mask, = self.segmentation.masks([options.reference], [prompt], size, deadline, request_id)
            options.reference_mask.CopyFrom(mask)
            self._reference_mask(options, size, field="reference_mask (segmented)")

    def _reference_mask(self, options, size, field: str = "reference_mask") -> torch.Tensor:
        mask = codecs.mask_to_torch(options.reference_mask, field=field, size=size, max_pixels=self.max_image_pixels)
        if not bool(mask.any()):
            raise InvalidArgument(field, "the mask is empty (no object pixel)")
        if bool(mask.all()):
            raise InvalidArgument(field, "the mask is full (no background pixel)")
        return mask

    def total_steps(self, job: LayerEditJob, class_images_given: bool = False) -> int:
        p = job.params
        return ((0 if job.options.HasField("reference") else 1)
                + (p.embedding_steps if p.layered_optimization else 0)
                + (p.finetune_steps if p.finetune else 0) + p.num_images)

    def placeholder_token(self, job: LayerEditJob) -> str:
        return ""  # a layer_edit concept is sampled from its own embeddings, not through a token

    def params_json(self, job: LayerEditJob) -> str:
        return job.params.to_json()

    # ------------------------------------------------------------------ worker (compute executor)
    def create_run(self, model, inputs, job: LayerEditJob, control: CallControl) -> LayerDiffusionRun:
        size = tuple(inputs.images.shape[2:])
        options = job.options
        reference = reference_mask = None
        if options.HasField("reference"):
            reference = codecs.image_to_torch(options.reference, field="reference", max_pixels=self.max_image_pixels)
            reference_mask = self._reference_mask(options, size)[None, None]
        object_mask = inputs.masks[:1]
        if bool(object_mask.all()):
            raise InvalidArgument("masks[0]", "the object mask is full (no background pixel)")
        return LayerDiffusionRun(model, inputs.images[:1], object_mask, job.params, reference=reference,
                                 reference_mask=reference_mask, segment=self._segmenter(size, control),
                                 seed=inputs.seed, control=control)

    def _segmenter(self, size: tuple[int, int], control: CallControl):
        def segment(image: torch.Tensor) -> torch.Tensor:
            if self.segmentation is None or not self.segmentation.address:
                raise InvalidArgument("reference", "this server has no segmentation service "
                                                   "(--segmentation-address): give a reference image and its mask")
            proto = codecs.image_from_torch((image[0].clamp(-1, 1) + 1) / 2)
            deadline = min(control.deadline, time.monotonic() + SEGMENT_TIMEOUT_SECONDS) \
                if control.deadline is not None else time.monotonic() + SEGMENT_TIMEOUT_SECONDS
            mask, = self.segmentation.masks([proto], [personalization_pb2.MaskPrompt()], size, deadline,
                                            f"layer_edit-reference-{id(control):x}")
            return codecs.mask_to_torch(mask, field="reference mask (segmented)", size=size)[None, None]
        return segment

    def check_concept(self, concept) -> None:
        """FailedPrecondition when an imported file is not a well-formed LayerDiffusion concept."""
        check_concept(concept)

    def generate(self, model, concept, options, control: CallControl) -> torch.Tensor:
        """More edited images; the prompt is not used (the concept holds its own embeddings)."""
        return generate_with_concept(model, concept, seed=options.seed, num_images=options.num_images,
                                     num_inference_steps=options.num_inference_steps,
                                     guidance_scale=options.guidance_scale, control=control)
