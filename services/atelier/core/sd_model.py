"""A loaded Stable Diffusion v1.x model (``SDModel``) and its loader; the registry
(atelier.core.models) decides when to load and unload it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .control import check_active
from .device import pick_device

__all__ = ["SDModel", "load_sd_folder", "add_stop_points"]


def _stop_point(_module, _args) -> None:
    check_active()


def add_stop_points(*modules: torch.nn.Module, convolutions: bool = False) -> int:
    """A deadline/cancel check (``control.check_active``) before every ResNet, attention,
    down- and upsampling block of ``modules`` (and with ``convolutions`` every Conv2d);
    returns how many were added.

    ``control.unet()``/``control.vae()`` check between evaluations, but one evaluation is not
    short: on a CPU a 1024^2 VAE encode ran 13.8 s and one P2P UNet evaluation at a 128x128
    latent 23 s past a 1 s deadline (bench/bench_reliability.py). Checks inside stop a call
    within one block instead. The VAE works at full resolution, where one ResNet took 0.8 s
    at 1024^2 on one CPU thread, so its convolutions get checks too; the UNet (latent
    resolution, many small layers) gets them per block, which kept the toy's evaluation
    within noise (0.90x bare on the shared machine; 1.17x with a check per convolution). The largest unit left is the VAE's mid-block attention over 16384
    tokens at 1024^2 (0.9 s)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    kinds: tuple[type, ...] = (ResnetBlock2D, Attention, Downsample2D, Upsample2D)
    if convolutions:
        kinds += (torch.nn.Conv2d,)
    added = 0
    for module in modules:
        for block in module.modules():
            if isinstance(block, kinds):
                block.register_forward_pre_hook(_stop_point)
                added += 1
    return added


@dataclass
class SDModel:
    """A loaded Stable Diffusion v1.x model. Components are shared; schedulers are per call."""

    name: str
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    scheduler_config: dict = field(default_factory=dict)
    source: str = ""
    load_seconds: float = 0.0

    def new_scheduler(self):
        """A fresh DDIMScheduler: schedulers hold per-call state (timesteps), never share one."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    def torch_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_encoder, self.unet]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) text embeddings, as StableDiffusionPipeline computes them (no attention mask)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        return self.text_encoder(ids, attention_mask=mask)[0].to(self.dtype)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> scaled latents (posterior mean, deterministic)."""
        posterior = self.vae.encode(image.to(self.device, self.dtype)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B,3,H,W) float32 in [0,1]."""
        image = self.vae.decode(latents.to(self.device, self.dtype) / self.vae.config.scaling_factor).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)


def load_sd_folder(source: str, name: str = "", device=None, dtype=None, local_files_only=True,
                   variant: Optional[str] = None) -> SDModel:
    """Load an SD v1.x folder (or hub id) into an SDModel on (device, dtype)."""
    from diffusers import StableDiffusionPipeline

    if device is None or dtype is None:
        picked_device, picked_dtype = pick_device()
        device, dtype = device or picked_device, dtype or picked_dtype
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        source, dtype=dtype, variant=variant, safety_checker=None, requires_safety_checker=False,
        local_files_only=local_files_only)
    pipe.to(device)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)
    add_stop_points(pipe.unet)
    add_stop_points(pipe.vae, convolutions=True)
    return SDModel(
        name=name or str(source), vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        unet=pipe.unet, device=torch.device(device), dtype=dtype, scheduler_config=dict(pipe.scheduler.config),
        source=str(source), load_seconds=time.perf_counter() - started)
