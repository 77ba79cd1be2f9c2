"""ISA-DCA image variations: RIVAL's inversion-chain alignment (ISA) with IP-Adapter-style
decoupled cross-attention (DCA) and the noise-interpolation factor lambda.

Pure tensor code. The paper (papers/isa-dca.md, Algorithm 1) leaves out what RIVAL's code
does; taken from RIVAL (METHODS.md section 3) here:
  - batch = [reference branch, N generated branches], x2 for CFG ([uncond..., cond...]);
    the reference branch is overwritten with the inverted chain after every step and uses its
    conditional prediction only (it is computed once per step, shared by all N variations);
  - ISA in every self-attention layer, both CFG halves: K/V = the reference's for t > t_align,
    [reference, own] concatenated along the tokens below (the paper's Eq. 5 "feature" axis
    cannot be right for the shapes; RIVAL uses the token axis);
  - noise AdaIN of each generated branch's guided eps toward the reference eps for t > t_early;
  - each generated branch starts from z_T with its spatial positions permuted (one seeded
    permutation per variation, shared by the channels); permute=False is the paper's start.
Our choice for the paper's ambiguity (Eq. 9 blends attention outputs, Eq. 10 latents): lambda
blends the two attention mechanisms inside one UNet pass, for t > K:
    self-attention out  = lambda * ISA(Q, K_ref[, K_own]) + (1 - lambda) * Attn(Q, K_own)
    cross-attention out = Attn(Q, K_txt, V_txt) + (1 - lambda) * scale * Attn(Q, K_img, V_img)
so lambda=1 is pure ISA (RIVAL) and lambda=0 pure DCA (IP-Adapter), with no extra UNet pass
(the paper reports +2.6% time over plain sampling, which rules out a second pass). For t <= K
both are off ("skip attention mechanisms"). DCA acts on the conditional half only (IP-Adapter's
negative image embedding is zeros, whose attention output is zero).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from atelier.core.attention import AttentionCall, AttentionController, AttentionSite, BatchLayout, attention_kwargs
from atelier.core.diffusion import ddim_step, set_timesteps, step_alphas, unet_eps

T_ALIGN = 600
T_EARLY = 600
RIVAL_NEGATIVE = ", monochrome, lowres, bad anatomy, worst quality, low quality"


@dataclass(frozen=True)
class VariationParams:
    n: int = 4
    steps: int = 50
    guidance: float = 7.0
    seed: int = 0
    lam: float = 0.7
    schedule: str = "constant"  # or "linear": lam at t=T down to 0 at t=K
    until: int = T_ALIGN  # K
    t_align: int = T_ALIGN
    t_early: int = T_EARLY
    dca_scale: float = 1.0
    permute: bool = True
    preview_every: int = 0


def lambda_at(params: VariationParams, t: int, num_train_timesteps: int) -> float:
    if t <= params.until:
        return 0.0
    if params.schedule == "linear":
        return params.lam * (t - params.until) / max(1, num_train_timesteps - params.until)
    return params.lam


class DCAContext:
    """DCA's second key/value source: IP-Adapter image tokens (to_k_ip/to_v_ip of each attn2) or,
    without adapter weights, a second text embedding through the layer's own to_k/to_v."""

    def __init__(self, tokens: torch.Tensor, ip_layers: Optional[dict] = None):
        self.tokens = tokens  # (1, L, D)
        self.ip_layers = ip_layers  # site name -> (to_k_ip, to_v_ip) or None for the text path

    @property
    def path(self) -> str:
        return "ip_adapter" if self.ip_layers else "text"

    def key_value(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ip_layers:
            to_k, to_v = self.ip_layers[call.site.name]
        else:
            to_k, to_v = call.module.to_k, call.module.to_v
        tokens = self.tokens.to(call.query.dtype)
        heads, head_dim = call.heads, call.query.shape[-1]
        key = to_k(tokens).view(1, -1, heads, head_dim).transpose(1, 2)
        value = to_v(tokens).view(1, -1, heads, head_dim).transpose(1, 2)
        return key, value


class ISADCAController(AttentionController):
    """ISA in self-attention and DCA in cross-attention, weighted by lambda(t)."""

    def __init__(self, dca: DCAContext, params: VariationParams, num_train_timesteps: int):
        self.dca = dca
        self.params = params
        self.num_train_timesteps = num_train_timesteps
        self.timestep = 0

    def wants(self, site: AttentionSite, step: int) -> bool:
        # Both mechanisms act for t > K (lambda weighs them there); below K, plain attention.
        return self.timestep > self.params.until

    def attend(self, call: AttentionCall) -> torch.Tensor:
        lam = lambda_at(self.params, self.timestep, self.num_train_timesteps)
        return self._cross(call, lam) if call.site.is_cross else self._self(call, lam)

    def _self(self, call: AttentionCall, lam: float) -> torch.Tensor:
        own = call.attend()
        if lam == 0.0:
            return own
        layout, out = call.layout, own.clone()
        for group in layout.groups:
            ref = layout.row(0, group)
            gen = slice(ref + 1, ref + layout.branches)
            n = layout.branches - 1
            ref_k = call.key[ref:ref + 1].expand(n, -1, -1, -1)
            ref_v = call.value[ref:ref + 1].expand(n, -1, -1, -1)
            if self.timestep > self.params.t_align:
                key, value = ref_k, ref_v
            else:
                key = torch.cat([ref_k, call.key[gen]], dim=2)
                value = torch.cat([ref_v, call.value[gen]], dim=2)
            isa = call.attend(query=call.query[gen], key=key, value=value)
            out[gen] = lam * isa + (1 - lam) * own[gen]
        return out

    def _cross(self, call: AttentionCall, lam: float) -> torch.Tensor:
        out = call.attend()
        weight = (1 - lam) * self.params.dca_scale
        if weight == 0.0 or "cond" not in call.layout.groups:
            return out
        layout = call.layout
        ref = layout.row(0, "cond")
        gen = slice(ref + 1, ref + layout.branches)
        key, value = self.dca.key_value(call)
        n = layout.branches - 1
        extra = call.attend(query=call.query[gen], key=key.expand(n, -1, -1, -1), value=value.expand(n, -1, -1, -1))
        out = out.clone()
        out[gen] = out[gen] + weight * extra
        return out


def adain(eps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-channel AdaIN of eps (B,C,h,w) toward reference (1,C,h,w): RIVAL's unbiased var + 1e-5."""
    mean, std = eps.mean(dim=(2, 3), keepdim=True), (eps.var(dim=(2, 3), keepdim=True) + 1e-5).sqrt()
    ref_mean = reference.mean(dim=(2, 3), keepdim=True)
    ref_std = (reference.var(dim=(2, 3), keepdim=True) + 1e-5).sqrt()
    return (eps - mean) / std * ref_std + ref_mean


def start_latents(z_T: torch.Tensor, n: int, seed: int, permute: bool) -> torch.Tensor:
    """(n, C, h, w): z_T with its h*w positions permuted per variation (one randperm per variation,
    shared by the channels), or z_T itself n times."""
    if not permute:
        return z_T.expand(n, -1, -1, -1).clone()
    generator = torch.Generator("cpu").manual_seed(seed)
    channels, height, width = z_T.shape[1:]
    flat = z_T.reshape(channels, height * width)
    starts = [flat[:, torch.randperm(height * width, generator=generator).to(z_T.device)] for _ in range(n)]
    return torch.stack(starts).view(n, channels, height, width)


@torch.no_grad()
def isa_dca_variations(model, chain: torch.Tensor, cond: torch.Tensor, uncond_ref: torch.Tensor,
                       uncond_gen: torch.Tensor, dca: DCAContext, params: VariationParams, control,
                       preview: Optional[Callable[[int, int, torch.Tensor], None]] = None) -> torch.Tensor:
    """N variations of the image whose inversion chain (z_0..z_T, (steps+1, 4, h, w)) is given.

    Must run inside ``controlled_attention(model.unet)``. Returns (n, 3, H, W) in [0, 1].
    """
    scheduler = model.new_scheduler()
    set_timesteps(scheduler, params.steps, device=model.device)
    if chain.shape[0] != len(scheduler.timesteps) + 1:
        raise ValueError(f"the chain has {chain.shape[0]} latents; {params.steps} steps need {params.steps + 1}")
    chain = chain.to(model.device, model.dtype)
    n = params.n
    layout = BatchLayout(branches=n + 1)
    controller = ISADCAController(dca, params, scheduler.config.num_train_timesteps)
    generated = start_latents(chain[-1:], n, params.seed, params.permute)
    conds = torch.cat([uncond_ref, uncond_gen.expand(n, -1, -1), cond.expand(n + 1, -1, -1)])
    latent_size = tuple(chain.shape[-2:])
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        controller.timestep = int(t)
        branches = torch.cat([chain[-(i + 1)].unsqueeze(0), generated])
        eps = unet_eps(model, torch.cat([branches, branches]), t, conds, control,
                       attention_kwargs(controller, i, layout, latent_size))
        eps_uncond, eps_cond = eps.chunk(2)
        guided = eps_uncond[1:] + params.guidance * (eps_cond[1:] - eps_uncond[1:])
        if int(t) > params.t_early:
            guided = adain(guided, eps_cond[:1])
        alpha_t, alpha_prev = step_alphas(scheduler, t)
        if preview is not None and params.preview_every and (i + 1) % params.preview_every == 0:
            x0 = (generated[:1] - (1 - alpha_t) ** 0.5 * guided[:1]) / alpha_t**0.5
            control.vae()
            preview(i + 1, total, model.decode_latents(x0))
        generated = ddim_step(generated, guided, alpha_t, alpha_prev)
        control.progress("variations", i + 1, total)
    control.vae()
    return model.decode_latents(generated).float()
