"""GradOP's region-semantic control (in the paper, never released), on the core attention controller.

For the tokens i of a phrase bound to a region B_i, the cross-attention probabilities A_i^t
(a column of the softmax: one value per spatial query) are replaced by

    A~_i^t = w_i [ (1 - kappa_t) A_i^t + kappa_t * B_i / ||B_i||_F * ||A_i^t||_F ]

(METHODS.md section 2). Where the paper leaves values open we choose (README.md of this
service): kappa_t = kappa * t / T_train (strong at high noise, where layout forms, 0 at t=0),
kappa default 0.4; w_i default 1; the formula is applied per head in every cross-attention
layer, to the conditional half of the CFG batch only (the unconditional prompt has no phrase),
without renormalising the softmax rows (the paper's formula has none).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atelier.core.attention import (AttentionCall, AttentionController, AttentionSite, BatchLayout,
                                    attention_kwargs)

DEFAULT_KAPPA = 0.4


@dataclass
class RegionBinding:
    mask: torch.Tensor  # (H, W) bool at the image size
    tokens: list[int]  # token positions of the phrase in the prompt (BOS = 0)
    weight: float = 1.0


def phrase_tokens(tokenizer, prompt: str, phrase: str) -> list[int]:
    """Positions of ``phrase``'s tokens inside ``prompt``'s token sequence (BOS at 0); [] if absent."""
    prompt_ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    phrase_ids = tokenizer(phrase, add_special_tokens=False).input_ids
    if not phrase_ids:
        return []
    for start in range(len(prompt_ids) - len(phrase_ids) + 1):
        if prompt_ids[start:start + len(phrase_ids)] == phrase_ids:
            return list(range(start, start + len(phrase_ids)))
    return []


class RegionController(AttentionController):
    """Pulls each bound phrase's cross-attention toward its region (cond half of a CFG batch)."""

    def __init__(self, regions: list[RegionBinding], kappa: float, num_train_timesteps: int,
                 layout: BatchLayout = BatchLayout(branches=1)):
        self.regions = regions
        self.kappa = kappa
        self.num_train_timesteps = num_train_timesteps
        self.layout = layout
        self.timestep = 0
        self._masks: dict[tuple[int, int], list[torch.Tensor]] = {}

    def kappa_at(self, t: int) -> float:
        return self.kappa * t / self.num_train_timesteps

    def wants(self, site: AttentionSite, step: int) -> bool:
        return site.is_cross and bool(self.regions) and self.kappa_at(self.timestep) > 0

    def _region_maps(self, size: tuple[int, int], like: torch.Tensor) -> list[torch.Tensor]:
        """B_i / ||B_i||_F at a feature-map size, flattened to (tokens,)."""
        if size not in self._masks:
            maps = []
            for region in self.regions:
                mask = region.mask.to(torch.float32)[None, None]
                small = F.interpolate(mask, size=size, mode="area").flatten()
                maps.append(small / small.norm().clamp_min(1e-8))
            self._masks[size] = maps
        return [m.to(like.device, like.dtype) for m in self._masks[size]]

    def attend(self, call: AttentionCall) -> torch.Tensor:
        return call.attend(probs=self.adjust(call, call.probabilities()))

    def adjust(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        """The formula above applied to the bound tokens' columns of ``probs`` (a new tensor)."""
        if call.spatial_size is None:
            return probs
        kappa = self.kappa_at(self.timestep)
        layout = call.layout
        first = layout.row(0, "cond") if "cond" in layout.groups else 0
        rows = slice(first, first + layout.branches)
        probs = probs.clone()
        for region, target in zip(self.regions, self._region_maps(call.spatial_size, probs)):
            for token in region.tokens:
                column = probs[rows, :, :, token]  # (rows, heads, queries)
                norm = column.norm(dim=-1, keepdim=True)
                probs[rows, :, :, token] = region.weight * ((1 - kappa) * column + kappa * target * norm)
        return probs


def region_hook(controller: RegionController, guidance: float, latent_size: tuple[int, int]):
    """An ``AttentionHook`` for ``gradop_plus``: the controller's kwargs for step i at timestep t
    (the batch is [uncond, cond] under CFG, the cond branch alone at guidance 1)."""
    layout = BatchLayout(branches=1, groups=("uncond", "cond") if guidance != 1.0 else ("cond",))

    def hook(step: int, t: int) -> dict:
        controller.timestep = t
        return attention_kwargs(controller, step, layout, latent_size)

    return hook
