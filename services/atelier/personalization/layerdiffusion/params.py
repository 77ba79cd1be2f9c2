"""LayerDiffusion parameters: every number of the paper, and a switch per Table 1 ablation.

Field names are the SDK / proto argument names (``layer_edit(..., embedding_steps=500, ...)``);
``validate()`` raises ``InvalidArgument`` naming every bad one. Defaults are the paper's
(§3.2.1, §3.3, §4.3, App. B.1). LayerDiffusion has no public code, so where the paper is silent
the default is the closest published reference, Imagic (diffusers community pipeline), and the
field's docstring says so.

Table 1 through these fields:
  (a) w/o L_obj            object_loss=False          (b) w/o L_bg        background_loss=False
  (c) lambda1=1            object_loss_weight=1       (d) lambda1=3       object_loss_weight=3
  (e) lambda1=1, lambda2=3 object_loss_weight=1, background_loss_weight=3
  (g) w/o layered controlled optimisation  layered_optimization=False (e_a, e_b stay the encoder's)
  (h) w/o fine-tune        finetune=False             (i) w/o iterative guidance  iterative_guidance=False
  (j) alpha=1              alpha=1                    (k) alpha=0         alpha=0
  (f) the full method: the defaults.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from atelier.core.errors import InvalidArgument

__all__ = ["LayerDiffusionParams", "MAX_STEPS", "MAX_IMAGES"]

MAX_STEPS = 20_000
MAX_IMAGES = 16
FINETUNE_MODES = ("full", "lora")


@dataclass(frozen=True)
class LayerDiffusionParams:
    # --- the target text T, decomposed (§3.2.1)
    object_text: str = ""
    """T_a: the object's properties / action, e.g. "a red triangle". Required."""
    background_text: str = ""
    """T_b: the background, e.g. "on a striped blue background". Required."""

    # --- stage 1: layered controlled optimisation (Eq. 2)
    layered_optimization: bool = True
    """Optimise e_a, e_b (Table 1 (g) when off: the encoder's e_a, e_b are interpolated as they are)."""
    embedding_steps: int = 500
    embedding_learning_rate: float = 1e-3
    """Adam on the text-encoder outputs (§3.3); Adam's betas/eps are not given: torch's defaults, as Imagic."""

    # --- interpolation (Eq. 3)
    alpha: float = 0.7
    """e_opt = alpha * e^_a + (1 - alpha) * e^_b over the OPTIMISED embeddings."""

    # --- stage 2: layered fine-tuning (Eqs. 4-6)
    finetune: bool = True
    """Fine-tune the UNet (Table 1 (h) when off: sampling uses the base UNet)."""
    finetune_steps: int = 250
    finetune_learning_rate: float = 2e-6
    finetune_mode: str = "full"
    """Which UNet parameters train. The paper does not say; Imagic tunes the whole UNet: "full"
    (the default; fine at toy scale, on SD 1.5 Adam needs ~4x the UNet's size in memory).
    "lora": LoRA adapters (peft, through diffusers' ``add_adapter``) on every attention
    projection, rank ``lora_rank``, for one-GPU SD 1.5 runs; LoRA usually wants a larger
    ``finetune_learning_rate`` (diffusers' DreamBooth-LoRA script uses 1e-4) - an option, not the paper."""
    lora_rank: int = 4
    object_loss: bool = True
    """L_obj (Table 1 (a) when off)."""
    background_loss: bool = True
    """L_bg (Table 1 (b) when off)."""
    object_loss_weight: float = 2.0
    """lambda1 (§4.3: 2; 3 for small foreground objects)."""
    background_loss_weight: float = 1.0
    """lambda2 (§4.3: 1)."""

    # --- the reference background O_r when the request gives none (§3.2.1, Fig. 4)
    reference_steps: int = 50
    reference_guidance_scale: float = 7.5

    # --- sampling (Eq. 8, §3.3)
    iterative_guidance: bool = True
    """e^_a on even step INDICES, e_opt on odd ones (Table 1 (i) when off: e_opt on every step)."""
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    """Not given by the paper; 7.5 is SD's and Imagic's default."""
    num_images: int = 4
    """Edited images drawn at the end of the job (more seeds: Generate with the concept)."""

    @property
    def target_text(self) -> str:
        """T, the text the paper feeds to SD for the generated image (T_a then T_b)."""
        return f"{self.object_text.strip()} {self.background_text.strip()}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LayerDiffusionParams":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})

    def validate(self) -> "LayerDiffusionParams":
        """Check ranges; raise ``InvalidArgument`` naming every bad SDK argument. Returns self."""
        bad: list[tuple[str, str]] = []

        def need(ok: bool, field: str, description: str) -> None:
            if not ok:
                bad.append((field, description))

        def finite(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def count(value, low: int, high: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        need(isinstance(self.object_text, str) and bool(self.object_text.strip()), "object_text",
             "is required (T_a: the object's properties, e.g. 'a red triangle')")
        need(isinstance(self.background_text, str) and bool(self.background_text.strip()), "background_text",
             "is required (T_b: the background, e.g. 'on a striped blue background')")
        need(count(self.embedding_steps, 1, MAX_STEPS), "embedding_steps", f"must be an integer in [1, {MAX_STEPS}]")
        need(count(self.finetune_steps, 1, MAX_STEPS), "finetune_steps", f"must be an integer in [1, {MAX_STEPS}]")
        need(finite(self.embedding_learning_rate) and 0 < self.embedding_learning_rate <= 1,
             "embedding_learning_rate", "must be in (0, 1]")
        need(finite(self.finetune_learning_rate) and 0 < self.finetune_learning_rate <= 1,
             "finetune_learning_rate", "must be in (0, 1]")
        need(finite(self.alpha) and 0 <= self.alpha <= 1, "alpha", "must be in [0, 1]")
        need(self.finetune_mode in FINETUNE_MODES, "finetune_mode", f"must be one of {', '.join(FINETUNE_MODES)}")
        need(count(self.lora_rank, 1, 256), "lora_rank", "must be an integer in [1, 256]")
        for field in ("object_loss_weight", "background_loss_weight"):
            value = getattr(self, field)
            need(finite(value) and 0 <= value <= 100, field, "must be in [0, 100]")
        if self.finetune:
            need(self.object_loss or self.background_loss, "background_loss",
                 "fine-tuning needs L_obj or L_bg (or set finetune=False)")
        need(count(self.reference_steps, 1, 1000), "reference_steps", "must be an integer in [1, 1000]")
        need(finite(self.reference_guidance_scale) and 1 <= self.reference_guidance_scale <= 50,
             "reference_guidance_scale", "must be in [1, 50]")
        need(count(self.num_inference_steps, 1, 1000), "num_inference_steps", "must be an integer in [1, 1000]")
        need(finite(self.guidance_scale) and 1 <= self.guidance_scale <= 50, "guidance_scale", "must be in [1, 50]")
        need(count(self.num_images, 0, MAX_IMAGES), "num_images", f"must be an integer in [0, {MAX_IMAGES}]")
        if bad:
            raise InvalidArgument.many(bad)
        return self
