"""EqDiff training parameters: every knob of the reference's train.sh, with its defaults.

Field names are the SDK / proto argument names (``train_eqdiff(..., steps=600, ...)``);
``validate()`` raises ``InvalidArgument`` naming the offending one. Defaults follow
maple-research-lab/EqDiff scripts/train.sh (METHODS.md section 1). Sizes given "at 512 px"
are the reference's absolute pixel values on its 512x512 images; the method scales them to the
actual image size (see ``fdte.box_half_widths`` and ``mgdp.dilation_radius``).

The parameters are checkpoint-independent: nothing here changes during a run, so a job resumed
from a checkpoint is rebuilt from the same params and the checkpoint's ``state_dict``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from atelier.core.errors import InvalidArgument

__all__ = ["EqDiffParams", "MAX_STEPS", "REFERENCE_RESOLUTION"]

MAX_STEPS = 20_000
MAX_CLASS_IMAGES = 1_000
REFERENCE_RESOLUTION = 512  # the reference trains at 512x512; pixel sizes below are at this size


@dataclass(frozen=True)
class EqDiffParams:
    # --- concept and prompts
    class_word: str = ""
    """The subject's class noun(s), e.g. "box" (train.sh CLASS words). Required."""
    placeholder_token: str = "<new2>"
    """The string standing for the concept in prompts (reference: "<new2>")."""
    initializer_token: str = ""
    """Word whose first token's embedding initialises S*_HF and S*_LF; empty -> ``class_word``.
    (The reference defaults to the rare token "ktn"; issue 12 asks for the class word.)"""
    prompt_template: str = "photo of a {token} {class_word}"
    """Instance prompt (train.sh:42). The reference's random "far away"/"close up" prefixes that
    did not match the (unaugmented) image are a bug and are not reproduced."""

    # --- optimisation
    steps: int = 600
    learning_rate: float = 1e-5
    scale_lr: bool = True
    """Reference ``--scale_lr``: effective lr = learning_rate x batch_size x (2 with prior
    preservation), i.e. 4e-5 at the defaults (train.py:979-996, one GPU, no accumulation)."""
    batch_size: int = 2
    """Instance samples per step; prior preservation adds as many class samples."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    """Clip norm over the UNet-side trainables; the reference leaves the frequency embeddings
    unclipped (train.py:1650-1657), and so do we."""

    # --- FDTE
    fdte: bool = True
    p_low: float = 0.1
    p_high: float = 0.1
    p_original: float = 0.8
    low_pass_half_width: int = 50
    """Low-pass keeps the centre box of this half-width (px at 512, ``--low_freq_percentage``)."""
    high_pass_half_width: int = 5
    """High-pass zeroes the centre box of this half-width (px at 512, ``--high_freq_percentage``)."""

    # --- MGDP / masked loss
    mgdp: bool = True
    """z' = M z_t + (1-M) z_0 and the masked loss (implies ``masked_loss``)."""
    masked_loss: bool = True
    """Masked diffusion loss alone (Break-a-Scene's MDL; Fig. 7 row E when ``mgdp`` is off)."""
    mask_dilation_iterations: int = 5
    """5x5 max-pool passes on the 64x64 latent mask at 512 px (``--dilate_iters``)."""

    # --- RRA and its loss
    rra: bool = True
    time_gap: int = 2
    """The reference UNet reads the reference noised at t - time_gap (``--time_gap``)."""
    reference_attention_loss: bool = True
    reference_attention_loss_weight: float = 0.1

    # --- cross-attention loss, Custom Diffusion K/V, prior preservation
    cross_attention_loss: bool = True
    cross_attention_loss_weight: float = 0.1
    custom_diffusion: bool = True
    """Train the cross-attention K/V of every cross-attention layer (Custom Diffusion)."""
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 200
    class_image_steps: int = 50
    class_image_guidance_scale: float = 7.5

    @property
    def initializer(self) -> str:
        return self.initializer_token or self.class_word

    @property
    def effective_learning_rate(self) -> float:
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.batch_size * (2 if self.prior_preservation else 1)

    @property
    def uses_reference_attention_loss(self) -> bool:
        """L_ra is a loss on RRA's reference attention: inactive when ``rra`` is off."""
        return self.rra and self.reference_attention_loss

    @property
    def uses_mask(self) -> bool:
        return self.mgdp or self.masked_loss

    def instance_prompt(self) -> str:
        return self.prompt_template.format(token=self.placeholder_token, class_word=self.class_word)

    def reference_prompt(self) -> str:
        """The reference UNet's caption: the instance prompt without the placeholder."""
        return " ".join(self.prompt_template.format(token="", class_word=self.class_word).split())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EqDiffParams":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})

    def validate(self) -> "EqDiffParams":
        """Check ranges; raise ``InvalidArgument`` naming every bad SDK argument. Returns self."""
        bad: list[tuple[str, str]] = []

        def need(ok: bool, field: str, description: str) -> None:
            if not ok:
                bad.append((field, description))

        def finite(value) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value)

        need(bool(self.class_word.strip()), "class_word", "is required (the subject's class noun, e.g. 'box')")
        need(bool(self.placeholder_token) and not any(c.isspace() for c in self.placeholder_token),
             "placeholder_token", "must be a non-empty string without whitespace")
        need(self.placeholder_token not in self.class_word.split(), "placeholder_token",
             "must differ from the class word")
        need(not any(c.isspace() for c in self.initializer_token), "initializer_token",
             "must be a single word")
        need("{token}" in self.prompt_template, "prompt_template", "must contain '{token}'")
        try:
            self.prompt_template.format(token="x", class_word="y")
        except (KeyError, IndexError, ValueError):
            need(False, "prompt_template", "may only use the fields {token} and {class_word}")
        need(isinstance(self.steps, int) and 1 <= self.steps <= MAX_STEPS, "steps",
             f"must be an integer in [1, {MAX_STEPS}]")
        need(finite(self.learning_rate) and 0 < self.learning_rate <= 1, "learning_rate", "must be in (0, 1]")
        need(isinstance(self.batch_size, int) and 1 <= self.batch_size <= 64, "batch_size", "must be in [1, 64]")
        need(finite(self.adam_beta1) and 0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        need(finite(self.adam_beta2) and 0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        need(finite(self.adam_epsilon) and self.adam_epsilon > 0, "adam_epsilon", "must be > 0")
        need(finite(self.weight_decay) and 0 <= self.weight_decay <= 1, "weight_decay", "must be in [0, 1]")
        need(finite(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        probabilities = (self.p_low, self.p_high, self.p_original)
        for field, value in zip(("p_low", "p_high", "p_original"), probabilities):
            need(finite(value) and 0 <= value <= 1, field, "must be in [0, 1]")
        if all(finite(p) for p in probabilities):
            need(abs(sum(probabilities) - 1) < 1e-6, "p_original", "p_low + p_high + p_original must be 1")
        need(isinstance(self.low_pass_half_width, int) and 1 <= self.low_pass_half_width <= 256,
             "low_pass_half_width", "must be an integer in [1, 256] (pixels at 512 px)")
        need(isinstance(self.high_pass_half_width, int) and 1 <= self.high_pass_half_width <= 256,
             "high_pass_half_width", "must be an integer in [1, 256] (pixels at 512 px)")
        need(isinstance(self.mask_dilation_iterations, int) and 0 <= self.mask_dilation_iterations <= 32,
             "mask_dilation_iterations", "must be an integer in [0, 32]")
        need(isinstance(self.time_gap, int) and 0 <= self.time_gap <= 100, "time_gap", "must be in [0, 100]")
        for field in ("reference_attention_loss_weight", "cross_attention_loss_weight", "prior_loss_weight"):
            value = getattr(self, field)
            need(finite(value) and 0 <= value <= 100, field, "must be in [0, 100]")
        need(isinstance(self.num_class_images, int) and 1 <= self.num_class_images <= MAX_CLASS_IMAGES,
             "num_class_images", f"must be an integer in [1, {MAX_CLASS_IMAGES}]")
        need(isinstance(self.class_image_steps, int) and 1 <= self.class_image_steps <= 1000,
             "class_image_steps", "must be an integer in [1, 1000]")
        need(finite(self.class_image_guidance_scale) and 1 <= self.class_image_guidance_scale <= 50,
             "class_image_guidance_scale", "must be in [1, 50]")
        if bad:
            raise InvalidArgument.many(bad)
        return self
