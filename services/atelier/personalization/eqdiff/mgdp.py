"""MGDP: mask-guided diffusion process (paper section 4.2; reference train.py:1483-1556).

Noise is added only inside the (dilated) subject mask: z'_t = M z_t + (1 - M) z_0, so the UNet
sees the clean background and learns the subject alone; the loss is masked by the same M.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_LATENT_SIZE = 64  # the reference dilates on SD's 64x64 latent (512 px images)


def dilation_radius(iterations: int, latent_size: int) -> int:
    """Latent-pixel radius of the reference's ``iterations`` x 5x5 max-pool passes, scaled to
    ``latent_size``: 2 px per pass at 64 (5 passes = 10 latent px = 80 image px), i.e.
    round(2 * iterations * latent_size / 64). At an 8x8 latent (64 px images): 5 passes -> 1.
    """
    return round(2 * iterations * latent_size / REFERENCE_LATENT_SIZE)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square max filter of ``radius`` over (B,1,h,w) masks.

    Equals the reference's repeated 5x5 reflect-padded max-pools: a reflected border value is
    always inside the window already, so reflect padding adds nothing to a max, and k passes of
    radius 2 compose to one radius-2k square.
    """
    if radius <= 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def latent_mask(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B,1,H,W) bool/float image masks -> (B,1,h,w) float latent masks (nearest, as the reference)."""
    return F.interpolate(masks.float(), size=latent_hw, mode="nearest")


def mask_guided_latents(z_t: torch.Tensor, z_0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z'_t = M z_t + (1 - M) z_0 (paper Eq. 6): noise inside the subject, clean background."""
    return mask * z_t + (1 - mask) * z_0


def masked_diffusion_loss(eps_hat: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample sum(M (eps_hat - eps)^2) / sum(M), then the batch mean (reference train.py:1546-1550).

    As in the reference the numerator sums all latent channels and the denominator the one-channel
    mask, so an all-ones mask gives C x the plain MSE (C = 4 latent channels); this sets the
    instance:prior loss ratio, which we keep.
    """
    mask = mask.to(eps_hat.dtype)
    per_sample = ((eps_hat.float() - eps.float()) ** 2 * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    return per_sample.mean()
