"""LayerDiffusionRun: layered editing of one image as a resumable ``TrainingRun``.

Phases, each a run of steps on one counter (so a checkpoint can fall anywhere):
  "reference"  (1 step, only when the request gives no O_r): the base model draws O_r from the
               target text T (§3.2.1 "T is first fed into SD", Fig. 4 "we generate a reference
               background image"), and ``segment`` gives its object mask M_r.
  "embedding"  layered controlled optimisation (Eq. 2): Adam on e_a, e_b, UNet frozen.
  "finetune"   layered fine-tuning (Eqs. 4-6): Adam on a private copy of the UNet, e_opt frozen.
  "sample"     one edited image per step, iterative guidance (Eq. 8).

Which image enters which loss. The paper names its images inconsistently (METHODS.md section 4):
"O_t" is SD's output for T in §3.2.1 but the image whose object mask M_t anchors L_obj in
§3.2.2, while the introduction calls the user's input "the target image"; Eq. 2 noises "the input
image" under "the object mask M". We read it as two layers:
  object layer      x_t from the INPUT image, mask M_t = the input's object mask (Eqs. 2 and 4);
                    a supplied ``object_mask`` of another shape/size moves or resizes the object,
                    as the paper's Fig. 3 note does;
  background layer  x_t from the reference O_r (given, or generated from T), mask 1 - M_r (Eq. 5).
Each L is computed on its own image; one UNet call carries both rows.

Randomness: one CPU ``torch.Generator`` draws every timestep and noise; the result images use
fixed per-image seeds. ``state_dict`` holds the embeddings, both optimisers, the fine-tuned UNet
(once that phase has begun), the generator, the generated O_r and M_r, and the images so far, so
a resumed run continues bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from atelier.core.control import CallControl
from atelier.core.diffusion import sample, unet_eps
from atelier.core.errors import FailedPrecondition, InvalidArgument
from atelier.personalization.training import Concept, StepReport

from .conditioning import joint_condition, latent_mask, masked_mse
from .generate import (LORA_PREFIX, METHOD, UNET_PREFIX, add_lora, initial_noise, iterative_guidance_sample,
                       private_unet, trainable_state, with_unet)
from .params import LayerDiffusionParams

Segmenter = Callable[[torch.Tensor], torch.Tensor]  # (1,3,H,W) in [-1,1] -> (1,1,H,W) bool object mask


def check_image(model, image, field: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[:2] != (1, 3):
        raise InvalidArgument(field, "expected one RGB image as a (1, 3, H, W) tensor")
    if not torch.isfinite(image).all() or image.min() < -1.0001 or image.max() > 1.0001:
        raise InvalidArgument(field, "pixel values must be finite and in [-1, 1]")
    multiple = model.vae_scale_factor * 2 ** (len(model.unet.down_blocks) - 1)
    height, width = image.shape[-2:]
    if height % multiple or width % multiple:
        raise InvalidArgument(field, f"height and width must be multiples of {multiple}, got {height}x{width}")
    if size is not None and tuple(image.shape[-2:]) != size:
        raise InvalidArgument(field, f"size {tuple(image.shape[-2:])} differs from the image's {size}")
    return image.float()


def check_mask(mask, field: str, size: tuple[int, int]) -> torch.Tensor:
    """A (1,1,H,W) object mask that is neither empty nor full (either would void one layer)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[:2] != (1, 1):
        raise InvalidArgument(field, "expected one mask as a (1, 1, H, W) tensor")
    if tuple(mask.shape[-2:]) != size:
        raise InvalidArgument(field, f"mask size {tuple(mask.shape[-2:])} differs from the image size {size}")
    mask = mask.bool()
    if not mask.any():
        raise InvalidArgument(field, "the mask is empty (no object pixel)")
    if mask.all():
        raise InvalidArgument(field, "the mask is full (no background pixel)")
    return mask


class LayerDiffusionRun:
    """A resumable LayerDiffusion edit of ``image`` on ``model`` (implements ``TrainingRun``)."""

    def __init__(self, model, image: torch.Tensor, object_mask: torch.Tensor, params: LayerDiffusionParams,
                 reference: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                 segment: Segmenter | None = None, seed: int = 0, control: CallControl | None = None):
        """``image``: (1,3,H,W) in [-1,1], the subject; ``object_mask``: its object mask M_t;
        ``reference`` / ``reference_mask``: O_r and its object mask M_r (both or neither); without
        them O_r is generated and ``segment`` masks it. Raises InvalidArgument naming the field."""
        self.params = params.validate()
        self.model = model
        self.seed = int(seed)
        self.image = check_image(model, image, "image")
        self.height, self.width = self.image.shape[-2:]
        size = (self.height, self.width)
        self.object_mask = check_mask(object_mask, "object_mask", size)
        if reference is not None:
            self.reference = check_image(model, reference, "reference", size)
            if reference_mask is None:
                raise InvalidArgument("reference_mask", "give the reference's object mask with the reference")
            self.reference_mask = check_mask(reference_mask, "reference_mask", size)
        else:
            if reference_mask is not None:
                raise InvalidArgument("reference_mask", "a reference mask needs a reference image")
            if segment is None:
                raise FailedPrecondition("no reference image and no segmenter to mask a generated one")
            self.reference, self.reference_mask = None, None
        self.segment = segment

        self.phases: list[tuple[str, int]] = [
            ("reference", 1 if reference is None else 0),
            ("embedding", params.embedding_steps if params.layered_optimization else 0),
            ("finetune", params.finetune_steps if params.finetune else 0),
            ("sample", params.num_images),
        ]
        self.total_steps = sum(count for _, count in self.phases)
        self.step_index = 0

        with torch.no_grad():
            e_a, e_b = model.encode_prompt([params.object_text, params.background_text]).float().chunk(2)
        self.e_a = torch.nn.Parameter(e_a.clone())
        self.e_b = torch.nn.Parameter(e_b.clone())
        self.embedding_optimizer = torch.optim.Adam([self.e_a, self.e_b], lr=params.embedding_learning_rate)
        self.unet = None
        if params.finetune:
            self.unet = private_unet(model, dtype=torch.float32).requires_grad_(True)
            trainables = list(self.unet.parameters())
            if params.finetune_mode == "lora":
                trainables = add_lora(self.unet, params.lora_rank, self.seed)
            self.finetune_optimizer = torch.optim.Adam(trainables, lr=params.finetune_learning_rate)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)
        self.images: list[torch.Tensor] = []
        latent_hw = (self.height // model.vae_scale_factor, self.width // model.vae_scale_factor)
        self.latent_hw = latent_hw
        # the posterior mean, encoded once (Imagic encodes its input once before training too)
        (control or CallControl()).vae()
        self.image_latent = model.encode_image(self.image).float()
        self.object_weight = latent_mask(self.object_mask, latent_hw).to(model.device)
        self._reference_latent = None

    # ------------------------------------------------------------------ TrainingRun
    def phase_at(self, index: int) -> tuple[str, int]:
        """(phase, 0-based step within it) of the step with 0-based run index ``index``."""
        for name, count in self.phases:
            if index < count:
                return name, index
            index -= count
        raise FailedPrecondition("the run is already complete")

    def step(self, control: CallControl) -> StepReport:
        if self.step_index >= self.total_steps:
            raise FailedPrecondition("the run is already complete")
        phase, within = self.phase_at(self.step_index)
        losses = getattr(self, f"_{phase}_step")(control, within)
        self.step_index += 1
        control.progress(phase, self.step_index, self.total_steps,
                         " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
        preview = self.images[-1][0] if phase == "sample" else None
        return StepReport(step=self.step_index, phase=phase, losses=losses, preview=preview)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "method": METHOD,
            "params": self.params.to_json(),
            "seed": self.seed,
            "step": self.step_index,
            "e_a": self.e_a.detach().clone(),
            "e_b": self.e_b.detach().clone(),
            "embedding_optimizer": self.embedding_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "images": [image.clone() for image in self.images],
        }
        if self.reference is not None and self.phases[0][1]:
            state["generated_reference"] = self.reference.clone()
            state["generated_reference_mask"] = self.reference_mask.clone()
        if self.unet is not None and self.step_index > self.phases[0][1] + self.phases[1][1]:
            # before fine-tuning starts the UNet is the base one: not worth a checkpoint's bytes
            state["unet"] = {k: v.clone() for k, v in trainable_state(self.unet).items()}
            state["finetune_optimizer"] = self.finetune_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != METHOD or state.get("params") != self.params.to_json() \
                or int(state.get("seed", -1)) != self.seed:
            raise FailedPrecondition("the checkpoint belongs to another method, parameters or seed")
        self.step_index = int(state["step"])
        with torch.no_grad():
            self.e_a.copy_(state["e_a"])
            self.e_b.copy_(state["e_b"])
        self.embedding_optimizer.load_state_dict(state["embedding_optimizer"])
        self.generator.set_state(state["generator"])
        self.images = [image.clone() for image in state["images"]]
        if "generated_reference" in state:
            self.reference = state["generated_reference"].clone()
            self.reference_mask = state["generated_reference_mask"].clone()
            self._reference_latent = None
        if "unet" in state:
            named = dict(self.unet.named_parameters())
            with torch.no_grad():
                for name, tensor in state["unet"].items():
                    named[name].copy_(tensor)
            self.finetune_optimizer.load_state_dict(state["finetune_optimizer"])

    def finish(self) -> Concept:
        if self.step_index < self.total_steps:
            raise FailedPrecondition(f"the run is at step {self.step_index} of {self.total_steps}")
        tensors = {
            "embedding.object": self.e_a.detach().float().cpu().contiguous(),
            "embedding.background": self.e_b.detach().float().cpu().contiguous(),
            "embedding.optimised": self.optimised_embedding().float().cpu().contiguous(),
        }
        if self.unet is not None:
            if self.params.finetune_mode == "lora":
                named = {LORA_PREFIX + k: v for k, v in trainable_state(self.unet).items()}
            else:
                named = {UNET_PREFIX + k: v for k, v in self.unet.state_dict().items()}
            for name, tensor in named.items():
                tensors[name] = tensor.detach().float().cpu().contiguous()
        if self.images:
            tensors["result.images"] = torch.cat(self.images).float().cpu().contiguous()
        if self.reference is not None:
            tensors["reference.image"] = self.reference.float().cpu().contiguous()
        metadata = {
            "base_model": self.model.name,
            "method": METHOD,
            "placeholder_token": "",
            "params": self.params.to_json(),
            "seed": str(self.seed),
            "height": str(self.height),
            "width": str(self.width),
        }
        return Concept(tensors=tensors, metadata=metadata)

    # ------------------------------------------------------------------ the method
    def optimised_embedding(self) -> torch.Tensor:
        """Eq. 3 over the CURRENT e_a, e_b: after stage 1 these are the optimised e^_a, e^_b."""
        alpha = self.params.alpha
        return (alpha * self.e_a + (1 - alpha) * self.e_b).detach()

    def _reference_step(self, control: CallControl, within: int) -> dict[str, float]:
        model, params = self.model, self.params
        noise = initial_noise(model, self.height, self.width, self.seed * 1_000_003 + 7919)
        latents = sample(model, noise, model.encode_prompt([params.target_text]), model.encode_prompt([""]),
                         params.reference_steps, params.reference_guidance_scale, control, stage="reference")
        control.vae()
        reference = model.decode_latents(latents).float().cpu() * 2 - 1
        control.check()
        mask = self.segment(reference)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (1, 1, self.height, self.width):
            raise FailedPrecondition("the segmenter returned no (1, 1, H, W) mask for the generated reference")
        mask = mask.bool()
        if mask.all():
            raise FailedPrecondition("the generated reference has no background (its object mask is full)")
        self.reference, self.reference_mask, self._reference_latent = reference, mask, None
        return {}

    def _noisy(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, eps) for a batch of clean latents, t ~ U{0..T-1} (DDPM training, as Imagic)."""
        rows = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.generator).to(latents.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (rows,),
                                  generator=self.generator).to(latents.device)
        return self.noise_scheduler.add_noise(latents, noise, timesteps), timesteps, noise

    def embedding_loss(self, control: CallControl, backward: bool = True) -> torch.Tensor:
        """Eq. 2 on one draw: the input image noised, the object mask M, [e_a, e_b] jointly."""
        x_t, t, noise = self._noisy(self.image_latent)
        eps = unet_eps(self.model, x_t, t, joint_condition(self.e_a, self.e_b), control, backward=backward)
        return masked_mse(eps, noise, self.object_weight)

    def _embedding_step(self, control: CallControl, within: int) -> dict[str, float]:
        loss = self.embedding_loss(control)
        self.embedding_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.embedding_optimizer.step()
        return {"embedding": float(loss.detach())}

    def reference_latent(self, control: CallControl | None = None) -> torch.Tensor:
        if self._reference_latent is None:
            (control or CallControl()).vae()
            self._reference_latent = self.model.encode_image(self.reference).float()
        return self._reference_latent

    def _finetune_step(self, control: CallControl, within: int) -> dict[str, float]:
        params, model = self.params, self.model
        latents, weights, names, lambdas = [], [], [], []
        if params.object_loss:  # Eq. 4: the object layer of the input image, mask M_t
            latents.append(self.image_latent)
            weights.append(self.object_weight)
            names.append("object")
            lambdas.append(params.object_loss_weight)
        if params.background_loss:  # Eq. 5: the background layer of O_r, mask 1 - M_r
            latents.append(self.reference_latent(control))
            weights.append(1 - latent_mask(self.reference_mask, self.latent_hw).to(model.device))
            names.append("background")
            lambdas.append(params.background_loss_weight)
        x_t, t, noise = self._noisy(torch.cat(latents))
        cond = self.optimised_embedding().expand(len(latents), -1, -1)
        eps = unet_eps(with_unet(model, self.unet), x_t, t, cond, control, backward=True)
        terms = {name: weight * masked_mse(eps[i:i + 1], noise[i:i + 1], mask)
                 for i, (name, weight, mask) in enumerate(zip(names, lambdas, weights))}
        total = sum(terms.values())  # Eq. 6
        self.finetune_optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.finetune_optimizer.step()
        report = {name: float(value.detach()) for name, value in terms.items()}
        report["loss"] = float(total.detach())
        return report

    def _sample_step(self, control: CallControl, within: int) -> dict[str, float]:
        params = self.params
        view = with_unet(self.model, self.unet) if self.unet is not None else self.model
        noise = initial_noise(self.model, self.height, self.width, self.seed + within)
        latents = iterative_guidance_sample(view, self.e_a.detach(), self.optimised_embedding(), noise,
                                            params.num_inference_steps, params.guidance_scale,
                                            params.iterative_guidance, control)
        control.vae()
        self.images.append(self.model.decode_latents(latents).float().cpu())
        return {}
