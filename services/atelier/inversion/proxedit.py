"""ProxEdit (Han et al. 2023, "Improving negative-prompt inversion via proximal guidance") as
SPDInv's editing pipeline runs it (leeruibin/SPDInv: P2P/ptp_utils.py ``diffusion_step`` for P2P,
masactrl/diffuser_utils.py for MasaCtrl).

Proximal guidance ("l0"): the guidance direction d = eps_cond - eps_uncond is shrunk towards 0
by tau, the ``quantile`` of |d| over the guided rows: d <- d - clamp(d, -tau, tau), and the
guided eps is eps_uncond + g * d. P2P takes the quantile over the whole batch (source and target
rows, 0.7); MasaCtrl over the target rows only (0.6; its source runs at guidance 1).

Inversion guidance (P2P): while t < ``inversion_guidance_timestep`` (400), after the DDIM step
the latents outside the edit mask -- where the shrunk |d| exceeds tau, dilated by a 3x3 max-pool,
per row and channel as in the reference -- are reset to the inverted chain at the step's
target timestep. The chain is what the client sent back from Invert (stateless service).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_QUANTILE = {"p2p": 0.7, "masactrl": 0.6}
DEFAULT_INVERSION_GUIDANCE_TIMESTEP = 400


@dataclass
class ProxEditParams:
    """``None`` fields take the engine's and the inversion method's defaults (see ``resolve``)."""

    proximal_guidance: bool | None = None
    quantile: float | None = None
    inversion_guidance: bool | None = None
    inversion_guidance_timestep: int = DEFAULT_INVERSION_GUIDANCE_TIMESTEP


@dataclass(frozen=True)
class ResolvedProxEdit:
    proximal_guidance: bool
    quantile: float
    inversion_guidance: bool
    inversion_guidance_timestep: int


def shrink(delta: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d - clamp(d, -tau, tau), tau) with tau the ``quantile`` of |d| (the reference's "l0" prox)."""
    tau = delta.abs().float().flatten().quantile(quantile).to(delta.dtype)
    return delta - delta.clamp(-tau, tau), tau


def edit_mask(shrunk: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The reference's mask_edit: |shrunk d| > tau, dilated with a 3x3 max-pool (radius 1)."""
    return F.max_pool2d((shrunk.abs() > tau).to(shrunk.dtype), kernel_size=3, stride=1, padding=1)


def inversion_guidance(latents: torch.Tensor, mask: torch.Tensor, chain_latent: torch.Tensor) -> torch.Tensor:
    """Outside ``mask`` take the chain's latent (the reference's recon_lr = 1)."""
    return latents - (latents - chain_latent.expand_as(latents)) * (1 - mask)
