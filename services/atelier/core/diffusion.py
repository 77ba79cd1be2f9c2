"""DDIM math and classifier-free guidance, as short functions over (model, latents, timesteps).

Follows diffusers' DDIMScheduler (eta=0) for sampling and the P2P / null-text / SPDInv
``next_step`` for inversion. Timesteps always come from a fresh scheduler's ``set_timesteps``;
only the per-step update is written here, because the inversion methods need the step as a
differentiable function of (latent, eps) and its fixed-point coefficients, which schedulers
do not expose.
"""

from __future__ import annotations

from typing import Callable

import torch


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t, alpha_prev) -> torch.Tensor:
    """One deterministic DDIM sampling update x_t -> x_{t-1} (eta = 0).

    x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);  x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    """
    alpha_t, alpha_prev = _as_tensor(alpha_t, x_t), _as_tensor(alpha_prev, x_t)
    x0 = (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def ddim_inversion_step(z_prev: torch.Tensor, eps: torch.Tensor, alpha_prev, alpha_t) -> torch.Tensor:
    """The reference ``next_step``: z_{t-1} (noise level a_prev) -> z_t (a_t) with eps given.

    The reference evaluates eps at (z_{t-1}, t); SPDInv instead solves for the z_t at which
    eps(z_t, t) reproduces this step (see ``inversion_coefficients``).
    """
    alpha_prev, alpha_t = _as_tensor(alpha_prev, z_prev), _as_tensor(alpha_t, z_prev)
    x0 = (z_prev - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
    return alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * eps


def inversion_coefficients(alpha_prev, alpha_t) -> tuple[float, float]:
    """(C1, C2) with ddim_inversion_step(z, eps) == C1 * z + C2 * eps (the fixed-point form)."""
    alpha_prev, alpha_t = float(alpha_prev), float(alpha_t)
    c1 = (alpha_t / alpha_prev) ** 0.5
    c2 = (1 - alpha_t) ** 0.5 - (alpha_t * (1 - alpha_prev) / alpha_prev) ** 0.5
    return c1, c2


def _as_tensor(alpha, like: torch.Tensor) -> torch.Tensor:
    # A 0-dim float32 tensor: square roots in float32, and (as in diffusers) a 0-dim operand
    # does not promote an fp16 latent.
    return torch.as_tensor(alpha, dtype=torch.float32, device=like.device)


def set_timesteps(scheduler, steps: int, device=None):
    """``scheduler.set_timesteps(steps)``, with the timesteps kept inside the alphas table.

    DDIMScheduler's "leading" spacing adds ``steps_offset`` (1 for SD v1.x) to
    ``arange(steps) * (T // steps)``; when that reaches T (e.g. 1000 steps of 1000) the last
    timestep indexes past ``alphas_cumprod``. The offset is then shifted down just enough
    to fit (1000 steps become 0..999, the whole table), leaving every other count unchanged.
    """
    scheduler.set_timesteps(steps, device=device)
    last_valid = scheduler.config.num_train_timesteps - 1
    excess = int(scheduler.timesteps.max()) - last_valid
    if excess > 0:
        scheduler.timesteps = scheduler.timesteps - excess
    return scheduler.timesteps


def step_alphas(scheduler, timestep) -> tuple[float, float]:
    """(a_t, a_prev) for a sampling step at ``timestep`` exactly as DDIMScheduler.step picks them."""
    t = int(timestep)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = scheduler.alphas_cumprod[t]
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return float(alpha_t), float(alpha_prev)


def inversion_schedule(model, steps: int) -> list[tuple[int, float, float]]:
    """[(t, a_prev, a_t)] in inversion order (ascending t), the reverse of the sampling steps."""
    scheduler = model.new_scheduler()
    set_timesteps(scheduler, steps)
    schedule = []
    for t in reversed(scheduler.timesteps.tolist()):
        alpha_t, alpha_prev = step_alphas(scheduler, t)
        schedule.append((int(t), alpha_prev, alpha_t))
    return schedule


def unet_eps(model, x: torch.Tensor, t, cond: torch.Tensor, control, cross_attention_kwargs=None,
             backward: bool = False) -> torch.Tensor:
    """One counted UNet evaluation: eps(x, t, cond). ``backward`` marks a forward+backward pass."""
    control.unet(backward=backward)
    timestep = torch.as_tensor(t, device=x.device)
    return model.unet(x.to(model.dtype), timestep, encoder_hidden_states=cond.to(model.dtype),
                      cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]


def guided_eps(model, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
               control, cross_attention_kwargs=None, backward: bool = False) -> torch.Tensor:
    """Classifier-free guided eps for a batch of B branches in ONE UNet call of batch 2B.

    ``x``: (B,4,h,w); ``cond``/``uncond``: (B,L,D) or (1,L,D) (broadcast). The UNet batch is
    [uncond_1..uncond_B, cond_1..cond_B], the order StableDiffusionPipeline uses, so attention
    processors see the unconditional half first. With guidance 1 or no uncond, only the
    conditional branch runs (it is the whole result).
    """
    batch = x.shape[0]
    cond = cond.expand(batch, *cond.shape[1:]) if cond.shape[0] == 1 else cond
    if uncond is None or guidance == 1.0:
        return unet_eps(model, x, t, cond, control, cross_attention_kwargs, backward)
    uncond = uncond.expand(batch, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond
    eps = unet_eps(model, torch.cat([x, x]), t, torch.cat([uncond, cond]), control,
                   cross_attention_kwargs, backward)
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@torch.no_grad()
def sample(model, z_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, steps: int,
           guidance: float, control, cross_attention_kwargs=None,
           callback: Callable[[int, int, torch.Tensor], None] | None = None, stage: str = "sample") -> torch.Tensor:
    """Deterministic DDIM text-to-image sampling from ``z_T`` with CFG; returns z_0 (model dtype).

    ``callback(i, t, latents)`` runs after each step (P2P's local blend edits latents there).
    """
    scheduler = model.new_scheduler()
    set_timesteps(scheduler, steps, device=model.device)
    latents = z_T.to(model.device, model.dtype) * scheduler.init_noise_sigma
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        eps = guided_eps(model, latents, t, cond, uncond, guidance, control, cross_attention_kwargs)
        alpha_t, alpha_prev = step_alphas(scheduler, t)
        latents = ddim_step(latents, eps, alpha_t, alpha_prev)
        if callback is not None:
            result = callback(i, int(t), latents)
            latents = latents if result is None else result
        control.progress(stage, i + 1, total)
    return latents
