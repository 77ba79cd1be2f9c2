"""MasaCtrl mutual self-attention (Cao et al. 2023) as an attention controller.

Follows TencentARC/MasaCtrl's `MutualSelfAttentionControl`: for steps in [`start_step`,
`end_step`) (the reference's `range(start_step, total_steps)`, total_steps = 50 unless given, so
an edit of more than 50 steps runs its last ones uncontrolled, as the reference does), in the
self-attention layers from `start_layer` on, every branch's queries (source and targets, in the
unconditional and the conditional group alike) attend to the SOURCE branch's keys and values of
the same group; cross-attention is untouched.

Layer numbering: the reference counts every attention call in execution order (down, mid, up)
and uses `cur_att_layer // 2`, i.e. the transformer-block index = the self-attention layer
index; SD 1.x has 16 (6 down, 1 mid, 9 up), so the default 10 selects the decoder's six
highest-resolution self-attention layers. Here layers are counted the same way
(`AttentionSite.self_index`) and the reference's indices are scaled to the UNet's count:
self-attention layer j is controlled when j >= ceil(start_layer * n / 16); identical to the
reference when n == 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from atelier.core.attention import AttentionCall, AttentionController, AttentionSite

REFERENCE_LAYER_COUNT = 16  # self-attention layers of SD 1.x, the reference's `MODEL_TYPE["SD"]`


@dataclass
class MasaCtrlParams:
    start_step: int = 4
    start_layer: int = 10
    end_step: int = 50  # the reference's total_steps default
    # MaskAuto (the reference's MutualSelfAttentionControlMaskAuto): both lists set enables it.
    mask_source_words: list[str] = field(default_factory=list)
    mask_target_words: list[str] = field(default_factory=list)
    mask_threshold: float = 0.1


def first_controlled_layer(start_layer: int, self_layer_count: int) -> int:
    return math.ceil(start_layer * self_layer_count / REFERENCE_LAYER_COUNT)


class MutualSelfAttention(AttentionController):
    def __init__(self, sites: list[AttentionSite], params: MasaCtrlParams):
        self_layers = [s for s in sites if not s.is_cross]
        first = first_controlled_layer(params.start_layer, len(self_layers))
        self.start_step = params.start_step
        self.end_step = params.end_step
        self.layers = {s.name for s in self_layers if s.self_index >= first}

    def wants(self, site: AttentionSite, step: int) -> bool:
        return self.start_step <= step < self.end_step and site.name in self.layers

    def attend(self, call: AttentionCall) -> torch.Tensor:
        layout = call.layout

        def from_source(tensor: torch.Tensor) -> torch.Tensor:
            rows = layout.split(tensor)  # (groups, branches, heads, tokens, dim)
            return rows[:, :1].expand_as(rows).reshape(tensor.shape)

        return call.attend(key=from_source(call.key), value=from_source(call.value))


class MutualSelfAttentionMaskAuto(MutualSelfAttention):
    """The reference's `MutualSelfAttentionControlMaskAuto`: masks from this step's cross-attention.

    Every UNet call records the cross-attention maps at ``record_sites`` (the reference's 16x16
    layers; here LocalBlend's level, see p2p.blend_sites). In a controlled self-attention layer
    after them, the source mask (the source words' map on the source's conditional row) splits the
    source keys into foreground and background; the target's queries attend to each part alone
    (the other part's scores set to the dtype's minimum, as the reference does), and the target
    mask (the target words' map on the target's conditional row) picks the foreground result
    inside it, the background one outside. Maps are head-averaged, averaged over the recorded
    layers, min-max normalised and thresholded at ``threshold`` (the reference's 0.1). The same
    masks serve the unconditional rows. A layer before any recorded map acts as plain MasaCtrl.
    """

    def __init__(self, sites: list[AttentionSite], params: MasaCtrlParams, word_weights: torch.Tensor,
                 record_sites: frozenset[str], threshold: float):
        super().__init__(sites, params)
        self.word_weights = word_weights  # (2, tokens): source words on row 0, target words on row 1
        self.record_sites = record_sites
        self.threshold = threshold
        self.maps: list[torch.Tensor] = []  # this UNet call's (branches, h*w) word maps
        self.map_size: tuple[int, int] | None = None

    def wants(self, site: AttentionSite, step: int) -> bool:
        return site.name in self.record_sites or super().wants(site, step)

    def attend(self, call: AttentionCall) -> torch.Tensor:
        if call.site.is_cross:
            probs = call.probabilities()
            cond = call.layout.split(probs)[call.layout.groups.index("cond")].mean(1)  # (branches, q, k)
            weights = self.word_weights.to(cond.device, cond.dtype)
            self.maps.append((cond[:2] * weights[:, None, :]).sum(-1).float())
            self.map_size = call.spatial_size
            return call.attend(probs=probs)
        if not self.maps or self.map_size is None or call.spatial_size is None:
            return super().attend(call)
        source_mask, target_mask = self._masks(call.spatial_size, call.query.dtype)
        layout = call.layout
        q, k, v = (layout.split(t) for t in (call.query, call.key, call.value))  # (groups, branches, heads, n, d)
        source_k, source_v = k[:, :1], v[:, :1]
        floor = torch.finfo(q.dtype).min
        scores = torch.matmul(q, source_k.transpose(-1, -2)) * call.scale  # (groups, branches, heads, n, n)
        foreground = torch.matmul(scores.masked_fill(~source_mask, floor).softmax(-1), source_v)
        background = torch.matmul(scores.masked_fill(source_mask, floor).softmax(-1), source_v)
        inside = target_mask[:, None].to(q.dtype)  # (n, 1)
        mixed = foreground * inside + background * (1 - inside)
        out = torch.matmul(scores.softmax(-1), source_v)  # plain MasaCtrl rows (the source's own)
        out[:, 1:] = mixed[:, 1:]
        return out.reshape(call.query.shape)

    def _masks(self, size: tuple[int, int], dtype) -> tuple[torch.Tensor, torch.Tensor]:
        maps = torch.stack(self.maps).mean(0).view(2, 1, *self.map_size)
        low = maps.amin(dim=(2, 3), keepdim=True)
        maps = (maps - low) / (maps.amax(dim=(2, 3), keepdim=True) - low).clamp_min(torch.finfo(maps.dtype).tiny)
        maps = torch.nn.functional.interpolate(maps, size=size).flatten(1) >= self.threshold  # (2, n)
        return maps[0], maps[1]

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        self.maps = []
        return latents
