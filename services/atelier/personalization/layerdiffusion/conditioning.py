"""The small decisions the paper leaves open, each in one place.

* How [e_a, e_b] condition ONE UNet call in Eq. 2 (``joint_condition``).
* How a pixel mask weights the latent-space loss (``latent_mask``, ``masked_mse``).
* Which embedding each sampling step uses (``guidance_schedule``, Eq. 8).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECT, OPTIMISED = "object", "optimised"


def joint_condition(e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
    """[e_a, e_b] of Eq. 2 as one cross-attention context: the two token sequences concatenated.

    (B,L,D) + (B,L,D) -> (B,2L,D). The paper writes f(x_t, t, [e_a, e_b]) and says no more. We
    concatenate along the token axis because (1) cross-attention takes any number of tokens, so
    the UNet reads both texts in one call through its own trained projections, exactly as it reads
    one longer prompt; (2) the softmax runs over both sequences, so the object's and the
    background's tokens compete for each pixel and the masked loss sends gradient to whichever
    one explains it, which is what "layered" optimisation needs; (3) it needs no extra spatial
    prior. Region-masked attention (e_a inside M, e_b outside) would tie the embeddings to
    the training mask, while sampling (Eq. 8) uses e_a and e_opt unmasked over the whole image.
    """
    return torch.cat([e_a, e_b], dim=1)


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B,1,H,W) pixel mask -> (B,1,h,w) float in [0,1]: the fraction of each latent cell covered
    (area pooling), so a boundary cell counts partly rather than all-or-nothing."""
    return F.interpolate(mask.float(), size=latent_hw, mode="area")


def masked_mse(eps_hat: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """||M * (eps - eps_hat)||^2 averaged over ALL latent elements (Eqs. 2, 4, 5).

    Not normalised by the mask's area: the paper raises lambda1 from 2 to 3 "for smaller
    foreground objects" (§4.3), which only makes sense if a small mask gives a small L_obj."""
    return ((mask * (eps_hat.float() - eps.float())) ** 2).mean()


def guidance_schedule(num_steps: int, iterative: bool = True) -> list[str]:
    """Which embedding conditions each sampling step: Eq. 8's ``t % 2 == 0 -> e^_a``.

    Taken on the step INDEX i (0, 1, 2, ...), not on the timestep: SD's DDIM timesteps at 50 steps
    are 981, 961, ..., 1, all odd, so a literal ``t % 2`` would never use e^_a. Index 0 (the
    noisiest step) uses e^_a, as t = T would if T were even. Without iterative guidance (Table 1
    (i)) every step uses e_opt."""
    if not iterative:
        return [OPTIMISED] * num_steps
    return [OBJECT if i % 2 == 0 else OPTIMISED for i in range(num_steps)]
