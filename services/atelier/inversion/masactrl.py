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
from dataclasses import dataclass

import torch

from atelier.core.attention import AttentionCall, AttentionController, AttentionSite

REFERENCE_LAYER_COUNT = 16  # self-attention layers of SD 1.x, the reference's `MODEL_TYPE["SD"]`


@dataclass
class MasaCtrlParams:
    start_step: int = 4
    start_layer: int = 10
    end_step: int = 50  # the reference's total_steps default


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
