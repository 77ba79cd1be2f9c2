"""EqDiff behind the job system's ``TrainingMethod`` interface: the proto's EqDiffOptions ->
``EqDiffParams`` (field for field), the stored inputs -> ``EqDiffRun``, Generate ->
``generate_with_concept``."""
from __future__ import annotations

import math

from atelier.personalization.eqdiff import EqDiffParams, EqDiffRun, generate_with_concept
from atelier.personalization.eqdiff.generate import check_concept
from atelier.personalization.eqdiff.run import CLASS_IMAGES_PER_STEP
from atelier.personalization.methods import GenerateOptions, TrainingInputs

__all__ = ["EqDiffMethod"]


class EqDiffMethod:
    name = "eqdiff"

    def parse(self, options, class_word: str, placeholder_token: str, initializer_token: str) -> EqDiffParams:
        values = {field.name: getattr(options, field.name) for field in options.DESCRIPTOR.fields
                  if options.HasField(field.name)}
        values.update(class_word=class_word, initializer_token=initializer_token)
        if placeholder_token:
            values["placeholder_token"] = placeholder_token
        return EqDiffParams(**values).validate()

    def total_steps(self, params: EqDiffParams, class_images_given: bool) -> int:
        class_steps = 0
        if params.prior_preservation and not class_images_given:
            class_steps = math.ceil(params.num_class_images / CLASS_IMAGES_PER_STEP)
        return class_steps + params.steps

    def placeholder_token(self, params: EqDiffParams) -> str:
        return params.placeholder_token

    def params_json(self, params: EqDiffParams) -> str:
        return params.to_json()

    def create_run(self, model, inputs: TrainingInputs, params: EqDiffParams, control) -> EqDiffRun:
        return EqDiffRun(model, inputs.images, inputs.masks, params, class_images=inputs.class_images,
                         seed=inputs.seed)

    def check_concept(self, concept) -> None:
        """FailedPrecondition when an imported file is not a well-formed EqDiff concept."""
        check_concept(concept)

    def generate(self, model, concept, options: GenerateOptions, control):
        return generate_with_concept(model, concept, options.prompt, options.negative_prompt,
                                     num_inference_steps=options.num_inference_steps,
                                     guidance_scale=options.guidance_scale, seed=options.seed,
                                     num_images=options.num_images, control=control)
