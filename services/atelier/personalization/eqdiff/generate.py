"""Generation with a trained EqDiff concept (reference pipeline, flag 2 = S*_LF + S*_HF).

DDIM sampling with classifier-free guidance; the placeholder's token embedding becomes
S*_LF + S*_HF; Custom Diffusion K/V and RRA act through a per-call attention controller, so
the shared model is never modified (concurrent calls see the base model). RRA reads ONE fixed
clean reference image of the concept (its latent is never noised) through the base UNet at the
current t on every step, with bank rows [reference + "", reference + caption] aligned with the
[uncond, cond] halves of the CFG batch (reference pipeline:606-672).
"""
from __future__ import annotations

import torch

from atelier.core.attention import BatchLayout, attention_kwargs, controlled_attention
from atelier.core.control import CallControl
from atelier.core.diffusion import ddim_step, set_timesteps, step_alphas, unet_eps
from atelier.core.errors import FailedPrecondition, InvalidArgument
from atelier.personalization.concepts import check_base_model, check_header
from atelier.personalization.training import Concept

from . import fdte
from .params import EqDiffParams
from .rra import EqDiffAttention, EqDiffLayers, ReferenceBank

MAX_IMAGES = 8


def check_concept(concept: Concept) -> EqDiffParams:
    """The concept's parameters, after checking the file holds what generation reads (an imported
    file may be anything): FailedPrecondition naming what is wrong."""
    tensors = concept.tensors
    params, height, width = check_header(concept, "eqdiff", EqDiffParams)
    weights = tensors.get("fdte.embeddings")
    if weights is None or weights.ndim != 2 or weights.shape[0] != 2 or not weights.is_floating_point():
        raise FailedPrecondition("the concept has no (2, D) float tensor 'fdte.embeddings'")
    if params.rra:
        reference = tensors.get("reference.image")
        if reference is None or tuple(reference.shape) != (1, 3, height, width) or not reference.is_floating_point():
            raise FailedPrecondition(f"the concept has no (1, 3, {height}, {width}) float tensor 'reference.image'")
    return params


def load_concept(model, concept: Concept) -> tuple[EqDiffParams, fdte.FrequencyEmbeddings, EqDiffLayers]:
    """Rebuild a concept's parameters, embeddings and layers for ``model`` (FailedPrecondition when
    it is not a well-formed EqDiff concept of this base model)."""
    params = check_concept(concept)
    check_base_model(concept, model)
    weights = concept.tensors["fdte.embeddings"]
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    if weights.shape[1] != width:
        raise FailedPrecondition(f"the concept's embeddings have width {weights.shape[1]}, model {model.name!r} "
                                 f"uses {width}")
    embeddings = fdte.FrequencyEmbeddings(weights[0])
    with torch.no_grad():
        embeddings.weight.copy_(weights)
    layers = EqDiffLayers(model.unet, custom_diffusion=params.custom_diffusion, rra=params.rra)
    state = {name.removeprefix("layers."): tensor for name, tensor in concept.tensors.items()
             if name.startswith("layers.")}
    try:
        layers.load_state_dict(state)
    except RuntimeError as error:
        raise FailedPrecondition(f"concept weights do not fit model {model.name!r}: {error}") from error
    return params, embeddings.to(model.device), layers.to(model.device)


@torch.no_grad()
def generate_with_concept(model, concept: Concept, prompt: str, negative_prompt: str = "",
                          num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                          num_images: int = 1, control: CallControl | None = None) -> torch.Tensor:
    """Images of ``prompt`` (containing the concept's placeholder) as (B,3,H,W) float in [0,1].

    ``guidance_scale`` 7.5 is the reference test script's default; the paper uses 12.5.
    Raises InvalidArgument naming ``prompt``, ``num_inference_steps``, ``guidance_scale`` or
    ``num_images``; FailedPrecondition for a concept of another method or base model.
    """
    control = control or CallControl()
    params, embeddings, layers = load_concept(model, concept)
    token = params.placeholder_token
    if token not in prompt:
        raise InvalidArgument("prompt", f"must contain the concept's placeholder {token!r}")
    if not 1 <= int(num_inference_steps) <= 1000:
        raise InvalidArgument("num_inference_steps", "must be in [1, 1000]")
    if not 1.0 <= float(guidance_scale) <= 50.0:
        raise InvalidArgument("guidance_scale", "must be in [1, 50]")
    if not 1 <= int(num_images) <= MAX_IMAGES:
        raise InvalidArgument("num_images", f"must be in [1, {MAX_IMAGES}]")

    initializer_id = fdte.single_token_id(model.tokenizer, params.initializer, "concept")
    combined = embeddings.combined()[None]
    encoded = []
    for text in (negative_prompt, prompt):
        ids, positions = fdte.tokenize_with_placeholder(model.tokenizer, [text], token, initializer_id)
        encoded.append(fdte.encode_with_injection(model.text_encoder, ids, positions, combined).to(model.dtype))
    uncond, cond = encoded
    guided = guidance_scale != 1.0
    height, width = int(concept.metadata["height"]), int(concept.metadata["width"])
    factor = model.vae_scale_factor
    latent_hw = (height // factor, width // factor)
    noise = torch.randn((num_images, model.unet.config.in_channels, *latent_hw),
                        generator=torch.Generator().manual_seed(int(seed)))

    bank = ref_latent = ref_cond = None
    rows = torch.arange(num_images)
    if params.rra:
        bank = ReferenceBank(set(layers.rra_site_names()))
        reference = concept.tensors["reference.image"].to(model.device, model.dtype)
        control.vae()
        ref_latent = model.encode_image(reference)  # clean: the posterior mean, never noised
        ref_cond = model.encode_prompt(["", params.reference_prompt()] if guided else [params.reference_prompt()])
        # target row -> bank row: uncond rows read [ref + ""], cond rows read [ref + caption]
        rows = torch.cat([torch.zeros(num_images), torch.ones(num_images)]).long() if guided \
            else torch.zeros(num_images).long()
    controller = EqDiffAttention(layers, bank=bank, bank_rows=rows.to(model.device))
    layout = BatchLayout(branches=num_images, groups=("uncond", "cond") if guided else ("cond",))

    scheduler = model.new_scheduler()
    set_timesteps(scheduler, int(num_inference_steps), device=model.device)
    latents = noise.to(model.device, model.dtype) * scheduler.init_noise_sigma
    total = len(scheduler.timesteps)
    with controlled_attention(model.unet):
        for i, t in enumerate(scheduler.timesteps):
            if bank is not None:
                ref_batch = ref_latent.expand(ref_cond.shape[0], -1, -1, -1)
                unet_eps(model, ref_batch, t, ref_cond, control,
                         attention_kwargs(bank, i, BatchLayout(branches=ref_cond.shape[0], groups=("cond",)),
                                          latent_hw))
            kwargs = attention_kwargs(controller, i, layout, latent_hw)
            batch_cond = cond.expand(num_images, -1, -1)
            if guided:
                eps = unet_eps(model, torch.cat([latents, latents]), t,
                               torch.cat([uncond.expand(num_images, -1, -1), batch_cond]), control, kwargs)
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            else:
                eps = unet_eps(model, latents, t, batch_cond, control, kwargs)
            alpha_t, alpha_prev = step_alphas(scheduler, t)
            latents = ddim_step(latents, eps, alpha_t, alpha_prev)
            control.progress("generate", i + 1, total)
    control.vae()
    return model.decode_latents(latents)
