"""The trainable attention layers of EqDiff and the attention controllers that apply them.

Everything is per call: the layers live in ``EqDiffLayers`` (not in the shared UNet) and reach
the UNet through the core's attention controller (``cross_attention_kwargs``), so concurrent
callers of the same model keep seeing the base model.

- Custom Diffusion K/V on every cross-attention layer. The weights sit in diffusers'
  ``CustomDiffusionAttnProcessor2_0`` modules (its parameter names and initialisation from the
  layer's to_k/to_v), but we cannot install that processor: processors are set on the shared
  UNet's modules, which would leak the concept into every other call. ``EqDiffAttention``
  computes what it computes (including its detach of the first token's K/V) inside the
  controller instead.
- RRA (paper section 4.3; reference attention_processor_custom.py:242-312) on the self-attention
  layers of the mid and up blocks. ``ReferenceBank`` records the attn1 input (norm1 output) of the
  frozen reference UNet; ``EqDiffAttention`` projects it with trainable to_k_res / to_v_res
  (initialised from the layer's own to_k / to_v), attends to it with the layer's own query and
  fuses [O_ra, O_sa] through a zero-initialised Linear(2d -> d+1):
  out = to_out(O_sa) (1 - M) + F_RA M, M = clamp(last channel, 0, 1). At initialisation the layer
  is exactly the base self-attention.
  The reference UNet is the base UNet itself, called without these layers: the target's base
  weights are frozen and never modified, so it is the reference's frozen copy without the copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from torch import nn

from atelier.core.attention import AttentionCall, AttentionController, AttentionSite, attention_sites


def loss_level(unet) -> int:
    """The attention level of the reference's two attention losses.

    SD1.x computes them on its 16x16 maps (64x64 latent, 4 down blocks): level 2, the level just
    above the 8x8 mid block. We take that structural position, len(down_blocks) - 2, which is the
    16x16 level on SD1.x and the 4x4 level (down_blocks.1 / up_blocks.1) of the toy UNet (8x8
    latent, 3 down blocks with attention at 8x8, 4x4 and 2x2, the mid block's level).
    """
    return max(0, len(unet.down_blocks) - 2)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # trainables stay float32; the shared model may run in fp16
    return layer(x.to(layer.weight.dtype)).to(x.dtype)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, dim = x.shape
    return x.view(batch, tokens, heads, dim // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class ResidualReferenceAttention(nn.Module):
    """RRA's trainable parts for one self-attention layer (reference names to_k_res/to_v_res/to_out_res)."""

    def __init__(self, attn):
        super().__init__()
        self.to_k_res = nn.Linear(attn.to_k.in_features, attn.to_k.out_features, bias=attn.to_k.bias is not None)
        self.to_v_res = nn.Linear(attn.to_v.in_features, attn.to_v.out_features, bias=attn.to_v.bias is not None)
        with torch.no_grad():
            self.to_k_res.load_state_dict({k: v.float() for k, v in attn.to_k.state_dict().items()})
            self.to_v_res.load_state_dict({k: v.float() for k, v in attn.to_v.state_dict().items()})
        inner, out = attn.to_out[0].in_features, attn.to_out[0].out_features
        self.to_out_res = nn.Linear(2 * inner, out + 1)  # H_r, zero-initialised (paper Eq. 8)
        nn.init.zeros_(self.to_out_res.weight)
        nn.init.zeros_(self.to_out_res.bias)


class EqDiffLayers(nn.Module):
    """All trainable UNet-side layers of one concept, keyed by attention-site name."""

    def __init__(self, unet, custom_diffusion: bool = True, rra: bool = True):
        super().__init__()
        self.sites = {site.name: site for site in attention_sites(unet)}
        self.custom_diffusion = nn.ModuleDict()
        self.rra = nn.ModuleDict()
        for name, site in self.sites.items():
            attn = unet.get_submodule(name)
            key = name.replace(".", "__")
            if site.is_cross and custom_diffusion:
                processor = CustomDiffusionAttnProcessor2_0(
                    train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
                    cross_attention_dim=attn.to_k.in_features)
                with torch.no_grad():
                    processor.to_k_custom_diffusion.weight.copy_(attn.to_k.weight.float())
                    processor.to_v_custom_diffusion.weight.copy_(attn.to_v.weight.float())
                self.custom_diffusion[key] = processor
            elif not site.is_cross and rra and site.place in ("mid", "up"):
                self.rra[key] = ResidualReferenceAttention(attn)
        self.loss_level = loss_level(unet)

    def cd(self, site: AttentionSite):
        return self.custom_diffusion[site.name.replace(".", "__")] if site.is_cross and len(self.custom_diffusion) else None

    def rra_for(self, site: AttentionSite):
        key = site.name.replace(".", "__")
        return self.rra[key] if key in self.rra else None

    def rra_site_names(self) -> list[str]:
        return [name for name in self.sites if name.replace(".", "__") in self.rra]


@dataclass
class ReferenceBank(AttentionController):
    """'Write' side: records norm1(hidden) (the attn1 input) at the RRA sites of the reference UNet."""

    site_names: set[str]
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def wants(self, site: AttentionSite, step: int) -> bool:
        return site.name in self.site_names

    def attend(self, call: AttentionCall) -> torch.Tensor:
        self.features[call.site.name] = call.hidden_states.detach()
        return call.attend()


@dataclass
class EqDiffAttention(AttentionController):
    """'Read' side on the target UNet: Custom Diffusion K/V, RRA, and the maps the losses need.

    ``bank_rows[i]`` is the bank row that target row i reads. ``record_rows`` are the rows whose
    maps are kept (the instance samples): cross-attention probabilities at the loss level (mean
    over heads) in ``cross_maps`` and RRA reference-attention probabilities at the loss level of
    the up blocks in ``reference_maps``.
    """

    layers: EqDiffLayers
    bank: ReferenceBank | None = None
    bank_rows: torch.Tensor | None = None
    record_rows: torch.Tensor | None = None
    record_cross: bool = False
    record_reference: bool = False
    cross_maps: list[torch.Tensor] = field(default_factory=list)
    reference_maps: list[torch.Tensor] = field(default_factory=list)

    def wants(self, site: AttentionSite, step: int) -> bool:
        if site.is_cross:
            return len(self.layers.custom_diffusion) > 0 or self._records_cross(site)
        return self.bank is not None and self.layers.rra_for(site) is not None

    def _records_cross(self, site: AttentionSite) -> bool:
        return (self.record_cross and site.is_cross and site.level == self.layers.loss_level
                and site.place in ("down", "up"))

    def attend(self, call: AttentionCall) -> torch.Tensor:
        if call.site.is_cross:
            return self._cross(call)
        return self._residual_reference(call)

    def _cross(self, call: AttentionCall) -> torch.Tensor:
        key, value = call.key, call.value
        processor = self.layers.cd(call.site)
        if processor is not None:
            key = _linear(processor.to_k_custom_diffusion, call.context)
            value = _linear(processor.to_v_custom_diffusion, call.context)
            # CustomDiffusionAttnProcessor2_0: the first (BOS) token's K/V get no gradient
            keep = torch.ones_like(key)
            keep[:, :1] = 0
            key = keep * key + (1 - keep) * key.detach()
            value = keep * value + (1 - keep) * value.detach()
            key, value = _heads(key, call.heads), _heads(value, call.heads)
        if self._records_cross(call.site):
            probs = call.probabilities(key=key)
            self.cross_maps.append(probs[self.record_rows].mean(dim=1))
            return call.attend(probs=probs, value=value)
        return call.attend(key=key, value=value)

    def _residual_reference(self, call: AttentionCall) -> torch.Tensor:
        layer = self.layers.rra_for(call.site)
        features = self.bank.features[call.site.name]
        if self.bank_rows is not None:
            features = features[self.bank_rows.to(features.device)]
        key_r = _heads(_linear(layer.to_k_res, features), call.heads)
        value_r = _heads(_linear(layer.to_v_res, features), call.heads)
        self_out = call.attend()
        if self.record_reference and call.site.place == "up" and call.site.level == self.layers.loss_level:
            probs = call.probabilities(key=key_r)
            self.reference_maps.append(probs[self.record_rows].mean(dim=1))
            reference_out = call.attend(probs=probs, value=value_r)
        else:
            reference_out = call.attend(key=key_r, value=value_r)
        self_out, reference_out = _merge(self_out), _merge(reference_out)
        fused = _linear(layer.to_out_res, torch.cat([reference_out, self_out], dim=-1))
        feature, mask = fused[..., :-1], fused[..., -1:].clamp(0, 1)
        call.output_projected = True
        return call.module.to_out[0](self_out) * (1 - mask) + feature * mask
