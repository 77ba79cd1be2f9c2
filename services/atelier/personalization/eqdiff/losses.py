"""EqDiff's two attention losses (reference train.py:1568-1635, self_attention_loss.py:36-60).

Both are computed on the instance samples at the 16x16-equivalent attention level
(``rra.loss_level``), averaged over heads and layers, and returned as the batch mean; the
caller multiplies by the weight (0.1 each). The reference adds the running sum inside its
per-sample loop, which also adds a lambda^2/B^2 term of sample 0: that slip is not reproduced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _resized(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B,1,H,W) -> (B, h*w) float, nearest (as the reference's F.interpolate default)."""
    return F.interpolate(masks.float(), size=hw, mode="nearest").flatten(1)


def _hw(tokens: int, aspect: tuple[int, int]) -> tuple[int, int]:
    height, width = aspect
    scale = (tokens / (height * width)) ** 0.5
    return max(1, round(height * scale)), max(1, round(width * scale))


def cross_attention_loss(maps: list[torch.Tensor], token_positions: torch.Tensor,
                         masks: torch.Tensor) -> torch.Tensor:
    """Break-a-Scene style: the placeholder token's attention map (mean over heads and layers),
    divided by its max, MSE against the undilated subject mask at the map's size.

    ``maps``: per layer (B, queries, tokens); ``token_positions``: (B, tokens) bool, the
    placeholder's position(s) (the first is used, as the reference); ``masks``: (B,1,H,W).
    """
    attention = torch.stack(maps).mean(dim=0).float()
    index = token_positions.float().argmax(dim=1).to(attention.device)
    token_map = attention[torch.arange(attention.shape[0], device=attention.device), :, index]
    token_map = token_map / token_map.amax(dim=1, keepdim=True).clamp_min(1e-8)
    target = _resized(masks, _hw(token_map.shape[1], masks.shape[-2:])).to(token_map.device)
    return ((token_map - target) ** 2).mean(dim=1).mean()


def reference_attention_loss(maps: list[torch.Tensor], reference_masks: torch.Tensor,
                             target_masks: torch.Tensor) -> torch.Tensor:
    """L_ra as the reference computes it (METHODS.md section 1):
    A = mean over heads and layers of softmax(q k_r^T / sqrt(d)); s_i = sum_j A_ij M^r_j;
    loss = mean_i (s_i M^g_i - M^g_i)^2 (a squared MSE with a target-mask factor, not the
    paper's Eq. 10 norm ||sum_j A_ij M^r - M^g||_2).
    """
    attention = torch.stack(maps).mean(dim=0).float()  # (B, Nq, Nk)
    hw_q = _hw(attention.shape[1], target_masks.shape[-2:])
    hw_k = _hw(attention.shape[2], reference_masks.shape[-2:])
    target = _resized(target_masks, hw_q).to(attention.device)
    reference = _resized(reference_masks, hw_k).to(attention.device)
    attended = torch.bmm(attention, reference.unsqueeze(-1)).squeeze(-1)
    return ((attended * target - target) ** 2).mean(dim=1).mean()
