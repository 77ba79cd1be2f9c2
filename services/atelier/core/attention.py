"""One attention mechanism for every attention-editing method, on diffusers' processor API.

`controlled_attention(unet)` installs a `ControlledAttnProcessor` on every `Attention` module
of a UNet (restoring the previous processors on exit). A processor is stateless apart from the
`AttentionSite` it serves; per-call state reaches it through `cross_attention_kwargs`:

    with controlled_attention(model.unet) as sites:
        controller = MyController(sites)
        eps = guided_eps(..., cross_attention_kwargs=attention_kwargs(controller, step, layout, hw))

Without the `attention_control` keyword (or when the controller declines a site/step) the
processor computes exactly what diffusers' `AttnProcessor2_0` does. Otherwise it hands an
`AttentionCall` to the controller, which may read or replace the attention probabilities
(`call.probabilities()` / `call.attend(probs=...)`), replace or extend K/V
(`call.attend(key=..., value=...)`), or combine several attentions, and returns the attention
output before the output projection.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PLACES = ("down", "mid", "up")
ATTENTION_KWARG = "attention_control"


@dataclass(frozen=True)
class AttentionSite:
    """Where an Attention module sits in the UNet.

    `index` counts all attention modules in execution order (down, mid, up); `self_index` /
    `cross_index` count the self- or cross-attention modules alone (-1 for the other kind).
    `level` is the downsampling level of its feature map: 0 = latent resolution, each level halves.
    """

    name: str
    place: str
    is_cross: bool
    index: int
    self_index: int
    cross_index: int
    level: int


@dataclass(frozen=True)
class BatchLayout:
    """How a UNet batch is arranged: `groups` (e.g. uncond, cond) each holding `branches` images.

    Row of (group g, branch b) = g * branches + b. Branch 0 is the source by convention.
    """

    branches: int = 1
    groups: tuple[str, ...] = ("uncond", "cond")

    @property
    def size(self) -> int:
        return self.branches * len(self.groups)

    def row(self, branch: int, group: str = "cond") -> int:
        return self.groups.index(group) * self.branches + branch

    def split(self, tensor: torch.Tensor) -> torch.Tensor:
        """(size, ...) -> (groups, branches, ...) view."""
        return tensor.view(len(self.groups), self.branches, *tensor.shape[1:])


@dataclass
class AttentionStep:
    """The per-call state a processor receives: who controls, which step, how the batch is laid out."""

    controller: "AttentionController"
    step: int
    layout: BatchLayout
    latent_size: tuple[int, int] | None = None


def attention_kwargs(controller: "AttentionController", step: int, layout: BatchLayout,
                     latent_size: tuple[int, int] | None = None) -> dict:
    """`cross_attention_kwargs` for one UNet evaluation under `controller`."""
    return {ATTENTION_KWARG: AttentionStep(controller, step, layout, latent_size)}


def feature_size(latent_size: tuple[int, int] | None, level: int, length: int) -> tuple[int, int] | None:
    """(h, w) of a feature map at `level` (diffusers' stride-2 downsamplers: ceil halving)."""
    if latent_size is not None:
        h, w = latent_size
        for _ in range(level):
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w == length:
            return h, w
    side = math.isqrt(length)
    return (side, side) if side * side == length else None


@dataclass
class AttentionCall:
    """One attention evaluation offered to a controller. q/k/v are (batch, heads, tokens, head_dim)."""

    module: torch.nn.Module
    site: AttentionSite
    step: int
    layout: BatchLayout
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    hidden_states: torch.Tensor
    context: torch.Tensor
    attention_mask: torch.Tensor | None
    spatial_size: tuple[int, int] | None
    # Set by a controller whose `attend` returns (batch, queries, dim) AFTER the output projection
    # (to_out[0]) because it mixes projected and unprojected features (EqDiff's RRA); the processor
    # then applies only the output dropout.
    output_projected: bool = False

    @property
    def scale(self) -> float:
        return self.module.scale

    @property
    def heads(self) -> int:
        return self.module.heads

    def probabilities(self, query: torch.Tensor | None = None, key: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(Q K^T * scale + mask): (batch, heads, queries, keys), computed explicitly."""
        query = self.query if query is None else query
        key = self.key if key is None else key
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale
        if self.attention_mask is not None and key is self.key:
            scores = scores + self.attention_mask
        return scores.softmax(dim=-1)

    def attend(self, query: torch.Tensor | None = None, key: torch.Tensor | None = None,
               value: torch.Tensor | None = None, probs: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output (batch, heads, queries, head_dim).

        With `probs`, returns probs @ value; otherwise scaled-dot-product attention of the given
        (or the call's own) q/k/v. K/V may have a different token count than the call's own
        (concatenated or foreign keys); the attention mask then no longer applies.
        """
        value = self.value if value is None else value
        if probs is not None:
            return torch.matmul(probs.to(value.dtype), value)
        query = self.query if query is None else query
        own_keys = key is None or key is self.key
        key = self.key if key is None else key
        mask = self.attention_mask if own_keys else None
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scale)


class AttentionController:
    """Base controller: decides per site and step whether to act, then computes the attention.

    Subclasses override `wants` (cheap filter; a False keeps the fast default path), `attend`,
    and optionally `after_step`.
    `attend` returns (batch, heads, queries, head_dim); the processor applies the output projection
    (unless the controller set `call.output_projected` and returned (batch, queries, dim) itself).
    """

    def wants(self, site: AttentionSite, step: int) -> bool:
        return True

    def attend(self, call: AttentionCall) -> torch.Tensor:
        return call.attend()

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Sampler hook after each denoising step (P2P's LocalBlend edits the latents here)."""
        return latents


@dataclass
class AttentionRecorder(AttentionController):
    """Records attention probabilities per (step, site) for the chosen kinds and groups of rows."""

    cross: bool = True
    self_attention: bool = False
    maps: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def wants(self, site: AttentionSite, step: int) -> bool:
        return self.cross if site.is_cross else self.self_attention

    def attend(self, call: AttentionCall) -> torch.Tensor:
        probs = call.probabilities()
        self.maps[(call.step, call.site.name)] = probs.detach()
        return call.attend(probs=probs)


class ControlledAttnProcessor:
    """Attention processor serving one site; defers to the per-call controller when present."""

    def __init__(self, site: AttentionSite):
        self.site = site

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 attention_control: AttentionStep | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_control is not None and attention_control.controller.wants(self.site, attention_control.step):
            call = AttentionCall(
                module=attn, site=self.site, step=attention_control.step, layout=attention_control.layout,
                query=query, key=key, value=value, hidden_states=hidden_states, context=encoder_hidden_states,
                attention_mask=attention_mask,
                spatial_size=feature_size(attention_control.latent_size, self.site.level, query.shape[2]))
            hidden_states = attention_control.controller.attend(call)
            projected = call.output_projected
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale)
            projected = False

        if not projected:
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)
            hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _place_and_level(name: str, num_down: int, num_up: int) -> tuple[str, int]:
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return "down", int(parts[1])
    if parts[0] == "up_blocks":
        return "up", num_up - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return "mid", num_down - 1
    raise ValueError(f"attention module outside down/mid/up blocks: {name}")


def attention_sites(unet) -> list[AttentionSite]:
    """All attention sites of a UNet2DConditionModel in execution order (down, mid, up)."""
    processor_names = list(unet.attn_processors)
    num_down, num_up = len(unet.down_blocks), len(unet.up_blocks)
    entries = []
    for position, processor_name in enumerate(processor_names):
        name = processor_name.removesuffix(".processor")
        place, level = _place_and_level(name, num_down, num_up)
        module = unet.get_submodule(name)
        entries.append((PLACES.index(place), position, name, place, level, bool(module.is_cross_attention)))
    entries.sort()
    sites, n_self, n_cross = [], 0, 0
    for index, (_, _, name, place, level, is_cross) in enumerate(entries):
        sites.append(AttentionSite(name=name, place=place, is_cross=is_cross, index=index,
                                   self_index=-1 if is_cross else n_self,
                                   cross_index=n_cross if is_cross else -1, level=level))
        n_cross += is_cross
        n_self += not is_cross
    return sites


# Installation bookkeeping per UNet (not per-call state): overlapping users of one shared UNet
# keep the controlled processors until the last one leaves, which restores the originals.
_installs: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()
_installs_lock = threading.Lock()


@contextlib.contextmanager
def controlled_attention(unet) -> Iterator[list[AttentionSite]]:
    """Install a `ControlledAttnProcessor` on every attention module; restore the previous ones on exit.

    Re-entrant and safe for overlapping calls on one UNet. Installed processors behave exactly like
    diffusers' defaults for calls that carry no `attention_control`.
    """
    sites = attention_sites(unet)
    with _installs_lock:
        entry = _installs.get(unet)
        if entry is None:
            original = dict(unet.attn_processors)
            unet.set_attn_processor({f"{site.name}.processor": ControlledAttnProcessor(site) for site in sites})
            entry = _installs[unet] = [0, original]
        entry[0] += 1
    try:
        yield sites
    finally:
        with _installs_lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _installs[unet]
                unet.set_attn_processor(dict(entry[1]))
