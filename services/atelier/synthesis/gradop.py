"""GradOP+ (Singh et al., CVPR 2023) as the released code behaves, and the SDEdit baseline.

Pure tensor code: (model, scribble, embeddings, parameters, control) -> image. METHODS.md
section 2 lists the reference's behaviour line by line; the comments below cite it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from atelier.core.diffusion import ddim_step, guided_eps, set_timesteps, step_alphas
from atelier.synthesis.painting import Painter, stroke_loss

# preview(step, total, x0_image (1,3,H,W) in [0,1])
PreviewSink = Callable[[int, int, torch.Tensor], None]
# attention(step_index, t) -> cross_attention_kwargs for that UNet call (region control), or None
AttentionHook = Callable[[int, int], Optional[dict]]


@dataclass(frozen=True)
class SynthesisParams:
    steps: int = 50
    guidance: float = 7.5
    strength: float = 0.8
    seed: int = 0
    # GradOP+ only.
    iterative_steps: int = 3
    grad_steps: int = 12
    learning_rate: float = 0.1
    painting: str = "gaussian_blur"
    preview_every: int = 0


@dataclass
class SynthesisOutput:
    image: torch.Tensor  # (1, 3, H, W) float32 in [0, 1]
    stroke_loss: float  # MSE(f(image), scribble)


def gradop_start(steps: int, strength: float) -> int:
    """The first sampling step index after which the latent is optimised: int(steps * (1 - strength))."""
    return int(steps * (1 - strength))


def check_gradop(params: SynthesisParams) -> None:
    """ValueError naming the parameter when the optimisation would not fit in the sampling steps."""
    start = gradop_start(params.steps, params.strength)
    # The reference optimises after steps start .. start+n-1 and never after the last one.
    if start + params.iterative_steps > params.steps - 1:
        raise ValueError(f"iterative_steps: {params.iterative_steps} steps from step {start} do not fit before "
                         f"the last of {params.steps} sampling steps")


def _noise(shape, seed_generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU from one seeded generator: the same seed gives the same bytes everywhere.
    return torch.randn(shape, generator=seed_generator, dtype=torch.float32).to(like.device, like.dtype)


def _preview(model, latents, eps, alpha_t, step, total, sink: Optional[PreviewSink], control) -> None:
    if sink is None:
        return
    control.vae()
    x0 = (latents - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    sink(step, total, model.decode_latents(x0))


def optimise_latent(model, latents: torch.Tensor, target: torch.Tensor, painter: Painter, grad_steps: int,
                    learning_rate: float, control) -> torch.Tensor:
    """gradop_plus_optim: Adam (fresh, lr 0.1) on the noisy latent itself, treated as a clean latent,
    minimising MSE(f(clamp(decode(z))), scribble). Gradients go through the VAE decoder only."""
    z = latents.detach().float().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=learning_rate)
    scaling = model.vae.config.scaling_factor
    with torch.enable_grad():
        for _ in range(grad_steps):
            control.decoder()
            decoded = model.vae.decode((z / scaling).to(model.dtype)).sample.float()
            image = ((decoded + 1) / 2).clamp(0, 1)
            loss = F.mse_loss(painter(image), target)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return z.detach().to(latents.dtype)


@torch.no_grad()
def gradop_plus(model, scribble: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, params: SynthesisParams,
                control, attention: Optional[AttentionHook] = None,
                preview: Optional[PreviewSink] = None) -> SynthesisOutput:
    """Text-to-image DDIM sampling from noise with GradOP+'s latent optimisation.

    ``scribble``: (1, 3, H, W) in [0, 1] at the output size (the target; not blurred).
    ``cond``/``uncond``: (1, L, D) text embeddings (uncond = the empty or negative prompt).
    """
    check_gradop(params)
    painter = Painter(params.painting, scribble)
    target = scribble.to(model.device, torch.float32)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    scheduler = model.new_scheduler()
    set_timesteps(scheduler, params.steps, device=model.device)
    timesteps = scheduler.timesteps
    height, width = scribble.shape[-2:]
    factor = model.vae_scale_factor
    shape = (1, model.unet.config.in_channels, height // factor, width // factor)
    # prepare_latents with image=None: add_noise(zeros, eps, first t) = sqrt(1 - a_T) eps (:505).
    eps0 = _noise(shape, generator, torch.empty(0, device=model.device, dtype=model.dtype))
    latents = scheduler.add_noise(torch.zeros_like(eps0), eps0, timesteps[:1])
    start = gradop_start(params.steps, params.strength)
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        kwargs = attention(i, int(t)) if attention is not None else None
        eps = guided_eps(model, latents, t, cond, uncond, params.guidance, control, kwargs)
        alpha_t, alpha_prev = step_alphas(scheduler, t)
        if params.preview_every and (i + 1) % params.preview_every == 0:
            _preview(model, latents, eps, alpha_t, i + 1, total, preview, control)
        latents = ddim_step(latents, eps, alpha_t, alpha_prev)
        if start <= i < start + params.iterative_steps and i < total - 1:
            control.progress("optimise", i - start + 1, params.iterative_steps)
            optimised = optimise_latent(model, latents, target, painter, params.grad_steps,
                                        params.learning_rate, control)
            # Re-noise to the level z already had (t_{i+1}) with fresh noise from the same generator.
            fresh = _noise(shape, generator, latents)
            latents = scheduler.add_noise(optimised, fresh, timesteps[i + 1: i + 2])
        control.progress("sample", i + 1, total)
    control.vae()
    image = model.decode_latents(latents)
    return SynthesisOutput(image=image.float(), stroke_loss=stroke_loss(painter, image, target))


def sdedit_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """StableDiffusionImg2ImgPipeline.get_timesteps: the last int(steps * strength) timesteps."""
    init = min(int(steps * strength), steps)
    begin = max(steps - init, 0)
    return scheduler.timesteps[begin * scheduler.order:]


@torch.no_grad()
def sdedit(model, scribble: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, params: SynthesisParams,
           control, painting: str = "gaussian_blur", preview: Optional[PreviewSink] = None) -> SynthesisOutput:
    """img2img from the scribble, as diffusers' StableDiffusionImg2ImgPipeline does for ``strength``:
    encode (a posterior sample), noise to the first kept timestep, DDIM-sample the rest with CFG."""
    generator = torch.Generator("cpu").manual_seed(params.seed)
    scheduler = model.new_scheduler()
    set_timesteps(scheduler, params.steps, device=model.device)
    timesteps = sdedit_timesteps(scheduler, params.steps, params.strength)
    if len(timesteps) == 0:
        raise ValueError(f"strength: {params.strength} with {params.steps} steps leaves no denoising step")
    control.vae()
    posterior = model.vae.encode((scribble * 2 - 1).to(model.device, model.dtype)).latent_dist
    sample = posterior.mean + posterior.std * _noise(posterior.mean.shape, generator, posterior.mean)
    init = sample * model.vae.config.scaling_factor
    latents = scheduler.add_noise(init, _noise(init.shape, generator, init), timesteps[:1])
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        eps = guided_eps(model, latents, t, cond, uncond, params.guidance, control)
        alpha_t, alpha_prev = step_alphas(scheduler, t)
        if params.preview_every and (i + 1) % params.preview_every == 0:
            _preview(model, latents, eps, alpha_t, i + 1, total, preview, control)
        latents = ddim_step(latents, eps, alpha_t, alpha_prev)
        control.progress("sample", i + 1, total)
    control.vae()
    image = model.decode_latents(latents).float()
    target = scribble.to(image.device, torch.float32)
    return SynthesisOutput(image=image, stroke_loss=stroke_loss(Painter(painting, target), image, target))
