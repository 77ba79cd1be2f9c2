"""SPDInv's baselines that need their own inversion loop (the others reuse the DDIM chain; see
``recipes``):

- fixed-point iteration (AIDI, Pan et al. 2023, "Effective real image editing with accelerated
  iterative diffusion inversion"): the same per-step fixed point as SPDInv,
  z_t = C1 z_{t-1} + C2 eps(z_t, t, c), solved by iterating the map with Anderson acceleration
  (AIDI's accelerated iteration) -- forward passes only, no autograd.
- null-text inversion (Mokady et al. 2023, google/prompt-to-prompt null_text_w_ptp
  ``null_optimization``): the DDIM chain at guidance 1, then per sampling step an unconditional
  embedding optimised (Adam, lr 1e-2 * (1 - i / 100), up to 10 inner steps, stop below
  1e-5 + i * 2e-5) so that the guided DDIM step from the current latent lands on the chain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import diffusion

ANDERSON_MEMORY = 3


def fixed_point_chain(model, z0, cond, schedule, control, eps_fn, max_rounds: int, loss_threshold: float,
                      memory: int = ANDERSON_MEMORY):
    """Per step: start from the DDIM estimate, iterate g(z) = C1 z_{t-1} + C2 eps(z, t) with
    Anderson acceleration (type II, ``memory`` past iterates; ``memory`` 0 is plain iteration)
    until MSE(z, g(z)) < delta or ``max_rounds`` accelerated updates. The returned z_t is the
    last one evaluated, so its residual is measured (one forward per round, plus the DDIM
    estimate's)."""
    chain, residuals, rounds = [z0], [], []
    total = len(schedule)
    with torch.no_grad():
        for i, (t, alpha_prev, alpha_t) in enumerate(schedule):
            z_prev = chain[-1]
            c1, c2 = diffusion.inversion_coefficients(alpha_prev, alpha_t)
            z = c1 * z_prev + c2 * eps_fn(z_prev, [t])  # the DDIM estimate
            iterates, images = [], []
            taken = 0
            while True:
                g = c1 * z_prev + c2 * eps_fn(z, [t])
                residual = float(F.mse_loss(z, g))
                if residual < loss_threshold or taken >= max_rounds:
                    break
                iterates.append(z.flatten())
                images.append(g.flatten())
                z = _anderson(iterates[-(memory + 1):], images[-(memory + 1):]).view_as(z)
                taken += 1
            chain.append(z)
            residuals.append(residual)
            rounds.append(taken)
            control.progress("invert", i + 1, total, f"fixed_point t={t} rounds={taken} residual={residual:.3g}")
    return chain, residuals, rounds


def _anderson(iterates: list[torch.Tensor], images: list[torch.Tensor]) -> torch.Tensor:
    """Anderson mixing: g_k - dG gamma with gamma = argmin |f_k - dF gamma| (f = g - z)."""
    if len(iterates) == 1:
        return images[0]
    residuals = torch.stack([g - z for z, g in zip(iterates, images)], dim=1).double()  # (n, m+1)
    d_f = residuals[:, 1:] - residuals[:, :-1]
    d_g = (torch.stack(images, dim=1).double())
    d_g = d_g[:, 1:] - d_g[:, :-1]
    gamma = torch.linalg.lstsq(d_f, residuals[:, -1:]).solution
    return (images[-1].double() - (d_g @ gamma).squeeze(1)).to(images[-1].dtype)


def null_text_embeddings(model, chain: torch.Tensor, cond: torch.Tensor, steps: int, guidance: float, control,
                         inner_steps: int = 10, early_stop: float = 1e-5) -> tuple[torch.Tensor, list[float]]:
    """(steps, L, D) unconditional embeddings, one per sampling step, and each step's final loss.

    ``chain``: z_0..z_T of the DDIM inversion ((steps+1, C, h, w), device and dtype of the model).
    """
    scheduler = model.new_scheduler()
    diffusion.set_timesteps(scheduler, steps, device=model.device)
    uncond = model.encode_prompt([""]).float()
    latent = chain[-1:]
    found, losses = [], []
    for i, t in enumerate(scheduler.timesteps):
        alpha_t, alpha_prev = diffusion.step_alphas(scheduler, t)
        target = chain[steps - i - 1:steps - i]
        with torch.no_grad():
            eps_cond = diffusion.unet_eps(model, latent, t, cond, control).float()
        uncond = uncond.detach().requires_grad_(True)
        optimizer = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
        loss_value = float("nan")
        for _ in range(inner_steps):
            with torch.enable_grad():
                eps_uncond = diffusion.unet_eps(model, latent, t, uncond, control, backward=True).float()
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                loss = F.mse_loss(diffusion.ddim_step(latent.float(), eps, alpha_t, alpha_prev), target.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            loss_value = loss.item()
            if loss_value < early_stop + i * 2e-5:
                break
        uncond = uncond.detach()
        found.append(uncond)
        losses.append(loss_value)
        with torch.no_grad():  # eps_cond is this step's: only the unconditional half is new
            eps = eps_cond
            if guidance != 1.0:
                eps_uncond = diffusion.unet_eps(model, latent, t, uncond, control).float()
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            latent = diffusion.ddim_step(latent.float(), eps, alpha_t, alpha_prev).to(chain.dtype)
        control.progress("null-text", i + 1, steps, f"t={int(t)} loss={loss_value:.3g}")
    return torch.cat(found).float(), losses
