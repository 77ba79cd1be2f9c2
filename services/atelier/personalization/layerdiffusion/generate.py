"""Sampling with iterative guidance (Eq. 8) and generation from a finished LayerDiffusion concept.

A concept holds e^_a, e_opt and (unless fine-tuning was off) the fine-tuned UNet's weights. The
shared model is never modified: the fine-tuned weights live in a private UNet built per call, so
concurrent calls on the shared model see the base weights.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from atelier.core.control import CallControl
from atelier.core.diffusion import ddim_step, guided_eps, set_timesteps, step_alphas
from atelier.core.errors import FailedPrecondition, InvalidArgument
from atelier.personalization.concepts import check_base_model, check_header
from atelier.personalization.training import Concept

from .conditioning import OBJECT, guidance_schedule
from .params import MAX_IMAGES, LayerDiffusionParams

METHOD = "layer_edit"  # the CreateJobRequest oneof field; concept metadata "method"
UNET_PREFIX = "unet."
LORA_PREFIX = "lora."
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' DreamBooth-LoRA default


def add_lora(unet, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """LoRA adapters (peft) on every attention projection of ``unet``; returns the trainables.

    peft draws the initial A matrices from torch's global RNG: seeded here, so two runs with
    one seed start from the same adapters (resume overwrites them anyway)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    return [p for p in unet.parameters() if p.requires_grad]


def trainable_state(unet) -> dict[str, torch.Tensor]:
    """The parameters that train (all of them, or the LoRA adapters), by name."""
    return {name: p.detach() for name, p in unet.named_parameters() if p.requires_grad}


def private_unet(model, state: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None) -> UNet2DConditionModel:
    """A UNet of the model's architecture that nothing else shares: the base weights, or ``state``,
    in ``dtype`` (default the model's; training asks for float32 master weights, since Adam at
    lr 2e-6 underflows in fp16).

    Built from the config and a state dict (not deepcopy): the shared UNet may be wearing another
    call's attention processors at this moment, and those must not be copied."""
    unet = UNet2DConditionModel.from_config(model.unet.config)
    unet.load_state_dict(model.unet.state_dict() if state is None else state)
    unet.set_attn_processor(AttnProcessor2_0())
    unet = unet.to(model.device)
    dtype = dtype or model.dtype
    if dtype != torch.float32:  # (to() with an unchanged dtype makes diffusers warn)
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)


def with_unet(model, unet):
    """The same model with another UNet (the VAE, text encoder and tokenizer stay shared).

    The view's dtype is the UNet's, so UNet inputs are cast to it; decode and encode images with
    the base model (its VAE keeps the base dtype)."""
    return dataclasses.replace(model, unet=unet, dtype=next(unet.parameters()).dtype)


@torch.no_grad()
def iterative_guidance_sample(model, e_object: torch.Tensor, e_optimised: torch.Tensor, noise: torch.Tensor,
                              num_inference_steps: int, guidance_scale: float, iterative: bool,
                              control: CallControl, stage: str = "sample",
                              record: Callable[[int, int, str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DDIM from ``noise`` with classifier-free guidance (uncond ""), the text condition of step i
    given by ``guidance_schedule`` (e^_a on even indices, e_opt on odd). Returns z_0.

    ``record(i, t, name, cond)`` sees the conditioning each step used (tests assert on it)."""
    embeddings = {OBJECT: e_object, "optimised": e_optimised}
    uncond = model.encode_prompt([""])
    scheduler = model.new_scheduler()
    set_timesteps(scheduler, int(num_inference_steps), device=model.device)
    schedule = guidance_schedule(len(scheduler.timesteps), iterative)
    latents = noise.to(model.device, model.dtype) * scheduler.init_noise_sigma
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        cond = embeddings[schedule[i]]
        if record is not None:
            record(i, int(t), schedule[i], cond)
        eps = guided_eps(model, latents, t, cond, uncond, guidance_scale, control)
        alpha_t, alpha_prev = step_alphas(scheduler, t)
        latents = ddim_step(latents, eps, alpha_t, alpha_prev)
        control.progress(stage, i + 1, total)
    return latents


def initial_noise(model, height: int, width: int, seed: int) -> torch.Tensor:
    factor = model.vae_scale_factor
    return torch.randn((1, model.unet.config.in_channels, height // factor, width // factor),
                       generator=torch.Generator().manual_seed(int(seed)))


EMBEDDINGS = ("embedding.object", "embedding.optimised")


def check_concept(concept: Concept) -> LayerDiffusionParams:
    """The concept's parameters, after checking the file holds what generation reads (an imported
    file may be anything): FailedPrecondition naming what is wrong."""
    params, _, _ = check_header(concept, METHOD, LayerDiffusionParams)
    for name in EMBEDDINGS:
        tensor = concept.tensors.get(name)
        if tensor is None or tensor.ndim != 3 or not tensor.is_floating_point():
            raise FailedPrecondition(f"the concept has no (1, L, D) float tensor {name!r}")
    return params


def load_concept(model, concept: Concept):
    """(params, e^_a, e_opt, model view with the concept's UNet) for ``model``.

    FailedPrecondition for a concept of another method or base model, or weights that do not fit."""
    params = check_concept(concept)
    check_base_model(concept, model)
    expected = tuple(model.encode_prompt([""]).shape)
    for name in EMBEDDINGS:
        if tuple(concept.tensors[name].shape) != expected:
            raise FailedPrecondition(f"the concept's {name!r} has shape {tuple(concept.tensors[name].shape)}, "
                                     f"model {model.name!r} uses {expected}")
    state = {name[len(UNET_PREFIX):]: tensor for name, tensor in concept.tensors.items()
             if name.startswith(UNET_PREFIX)}
    lora = {name[len(LORA_PREFIX):]: tensor for name, tensor in concept.tensors.items()
            if name.startswith(LORA_PREFIX)}
    view = model
    try:
        if state:
            view = with_unet(model, private_unet(model, state))
        elif lora:
            unet = private_unet(model)
            add_lora(unet, params.lora_rank, 0)
            named = dict(unet.named_parameters())
            if set(lora) - set(named):
                raise RuntimeError(f"unknown LoRA weights {sorted(set(lora) - set(named))[:3]}")
            with torch.no_grad():
                for name, tensor in lora.items():
                    named[name].copy_(tensor)
            view = with_unet(model, unet.requires_grad_(False))
    except RuntimeError as error:
        raise FailedPrecondition(f"concept weights do not fit model {model.name!r}: {error}") from error
    e_object = concept.tensors["embedding.object"].to(model.device, model.dtype)
    e_optimised = concept.tensors["embedding.optimised"].to(model.device, model.dtype)
    return params, e_object, e_optimised, view


@torch.no_grad()
def generate_with_concept(model, concept: Concept, seed: int = 0, num_images: int = 1,
                          num_inference_steps: int | None = None, guidance_scale: float | None = None,
                          iterative_guidance: bool | None = None, control: CallControl | None = None) -> torch.Tensor:
    """More edited images from a LayerDiffusion concept: (B,3,H,W) float in [0,1].

    Image k uses the noise of seed ``seed + k``; the job's own result image k is seed
    ``job seed + k``, so Generate with the job's seed redraws exactly the job's images. Steps,
    guidance and the iterative schedule default to the job's."""
    control = control or CallControl()
    params, e_object, e_optimised, view = load_concept(model, concept)
    steps = params.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
    guidance = params.guidance_scale if guidance_scale is None else float(guidance_scale)
    iterative = params.iterative_guidance if iterative_guidance is None else bool(iterative_guidance)
    if not 1 <= steps <= 1000:
        raise InvalidArgument("num_inference_steps", "must be in [1, 1000]")
    if not 1.0 <= guidance <= 50.0:
        raise InvalidArgument("guidance_scale", "must be in [1, 50]")
    if not 1 <= int(num_images) <= MAX_IMAGES:
        raise InvalidArgument("num_images", f"must be in [1, {MAX_IMAGES}]")
    height, width = int(concept.metadata["height"]), int(concept.metadata["width"])
    images = []
    for k in range(int(num_images)):
        latents = iterative_guidance_sample(view, e_object, e_optimised, initial_noise(model, height, width, seed + k),
                                            steps, guidance, iterative, control, stage="generate")
        control.vae()
        images.append(model.decode_latents(latents))
    return torch.cat(images)
