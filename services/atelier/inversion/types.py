"""Result types of the inversion methods."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InversionOutput:
    """An inverted latent chain and its per-step diagnostics.

    ``chain[0]`` is the VAE latent z_0 of the image and ``chain[i]`` the latent at
    ``timesteps[i-1]`` (ascending), so ``chain[-1]`` is z_T. ``residuals[i-1]`` is the
    fixed-point residual MSE(z_t, C1 z_{t-1} + C2 eps(z_t, t, c)) of ``chain[i]``;
    ``rounds[i-1]`` the optimiser steps SPDInv took there (0 for DDIM).
    """

    chain: torch.Tensor  # (steps+1, 4, h, w) float32 on CPU
    timesteps: list[int]
    residuals: list[float]
    rounds: list[int]
    method: str
    prompt: str
    forward_evaluations: int = 0  # UNet calls without a backward pass (this call's share)
    backward_evaluations: int = 0  # UNet calls with autograd, for SPDInv's optimiser
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)

    @property
    def z_T(self) -> torch.Tensor:
        return self.chain[-1:]

    @property
    def steps(self) -> int:
        return len(self.timesteps)
