"""EqDiff (Equilibrated Diffusion, ACM MM'24) concept training and generation. Pure method code.
The EqDiff method's entry points.

    run = EqDiffRun(model, images, masks, params, class_images=None, seed=0)
    while run.step_index < run.total_steps:
        report = run.step(control)          # one optimisation step (TrainingRun protocol)
    concept = run.finish()                  # atelier.personalization.training.Concept
    images = generate_with_concept(model, concept, "a <new2> box on a blue background")

``EqDiffRun.__init__(model: SDModel, images: (N,3,H,W) float in [-1,1], masks: (N,1,H,W) bool,
params: EqDiffParams, class_images: (M,3,H,W) in [-1,1] | None = None, seed: int = 0)``:
validates its inputs (InvalidArgument naming ``images``, ``masks``, ``class_word`` ...),
generates prior-preservation class images with the base model when ``class_images`` is None and
prior preservation is on (``num_class_images`` DDIM samples of the class word).

``generate_with_concept(model, concept, prompt, negative_prompt="", num_inference_steps=50,
guidance_scale=7.5, seed=0, num_images=1, control=CallControl()) -> (B,3,H,W) float in [0,1]``:
raises InvalidArgument("prompt") when the placeholder is missing, FailedPrecondition when the
concept was trained on another base model.
"""
from .data import generate_class_images
from .generate import generate_with_concept
from .params import EqDiffParams
from .run import EqDiffRun

__all__ = ["EqDiffParams", "EqDiffRun", "generate_class_images", "generate_with_concept"]
