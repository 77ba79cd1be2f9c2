"""What the job system needs of a training method, beyond the TrainingRun itself.

A ``TrainingMethod`` turns a CreateJobRequest's method options into validated parameters,
builds the method's ``TrainingRun`` from decoded tensors, and generates images from a finished
``Concept``. The servicer and the worker only ever talk to this interface; the table of methods
a server offers is given to the app (``methods=``), keyed by the CreateJobRequest ``method``
oneof field name ("eqdiff").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from atelier.core.control import CallControl
from atelier.core.models import SDModel
from atelier.personalization.training import Concept, TrainingRun

__all__ = ["TrainingMethod", "TrainingInputs", "GenerateOptions"]


@dataclass
class TrainingInputs:
    """A job's decoded inputs (what the worker rebuilds from the stored request on resume)."""

    images: torch.Tensor                 # (N, 3, H, W) float32 in [-1, 1]
    masks: torch.Tensor                  # (N, 1, H, W) bool
    class_images: Optional[torch.Tensor]  # (M, 3, H, W) in [-1, 1] or None
    seed: int


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int


class TrainingMethod(Protocol):
    """Optional members, looked up with getattr by the servicer and app: ``needs_class_word``
    (default True: class_word / initializer_token are checked against the tokenizer);
    ``check_request(request, size)`` (InvalidArgument for the method's own request fields, before
    anything is queued); ``complete_request(inputs, size, deadline, request_id)`` (fills the
    stored request, e.g. segments the method's other images, within the caller's deadline);
    ``bind(segmentation, max_image_pixels)`` (the app hands over its clients and limits)."""

    name: str  # the CreateJobRequest oneof field, e.g. "eqdiff"; also Concept metadata "method"

    def parse(self, request, class_word: str, placeholder_token: str, initializer_token: str) -> Any:
        """Validated parameters from the request's options message (InvalidArgument naming the
        SDK argument). Cheap: runs in CreateJob, before the job is queued."""
        ...

    def total_steps(self, params: Any, class_images_given: bool) -> int:
        """Steps over all phases (the worker corrects the job's count from the built run)."""
        ...

    def placeholder_token(self, params: Any) -> str: ...

    def params_json(self, params: Any) -> str:
        """For the concept's metadata."""
        ...

    def create_run(self, model: SDModel, inputs: TrainingInputs, params: Any,
                   control: CallControl) -> TrainingRun:
        """Build the run (runs on the compute executor; may run the model, e.g. class images)."""
        ...

    def generate(self, model: SDModel, concept: Concept, options: GenerateOptions,
                 control: CallControl) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1]."""
        ...
