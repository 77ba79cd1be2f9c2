"""Prompt-driven editing from an inverted latent: Prompt-to-Prompt or MasaCtrl.

The source and target branches are sampled together: one UNet call of batch 4 per step,
[uncond_source, uncond_target, cond_source, cond_target]. The unconditional embedding of both
branches is the SOURCE prompt's (negative-prompt inversion, as SPDInv's editing code does), so
the source branch reproduces the inverted image while the target branch is edited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atelier.core.attention import BatchLayout, attention_kwargs, controlled_attention
from atelier.core.control import CallControl
from atelier.core.diffusion import ddim_step, guided_eps, set_timesteps, step_alphas
from atelier.core.errors import InvalidArgument
from atelier.inversion.masactrl import REFERENCE_LAYER_COUNT, MasaCtrlParams, MutualSelfAttention
from atelier.inversion.p2p import (MODES, LocalBlend, P2PController, P2PParams, blend_sites, equalizer,
                                   refine_edit, refinement_mapper, replace_edit, reweight_edit,
                                   self_replace_sites, tokenize_words, word_positions, replacement_mapper)

ENGINES = ("p2p", "masactrl")


@dataclass
class EditOutput:
    image: torch.Tensor          # (1, 3, H, W) in [0, 1], the edited target
    source_image: torch.Tensor   # (1, 3, H, W) in [0, 1], the source branch (reconstruction)
    mode: str = ""               # the P2P mode used ("replace"/"refine"/"reweight"), "" for MasaCtrl


@dataclass
class PlannedP2P:
    mode: str
    cross_edit: object
    blend_weights: torch.Tensor | None = None


def _check_fraction(violations, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        violations.append((name, f"must be a number in [0, 1], got {value!r}"))


def plan_p2p(tokenizer, source_prompt: str, target_prompt: str, params: P2PParams, max_len: int) -> PlannedP2P:
    """Validate the P2P request and build the mode's cross-attention edit (raises InvalidArgument)."""
    violations = _p2p_option_violations(target_prompt, params)
    if violations:
        raise InvalidArgument.many(violations)

    source = tokenize_words(tokenizer, source_prompt, max_len)
    target = tokenize_words(tokenizer, target_prompt, max_len)
    same_shape = len(source.ids) == len(target.ids) and len(source.words) == len(target.words)
    mode = params.mode
    if mode == "auto":
        mode = "replace" if same_shape else "refine"
    if mode == "replace" and not same_shape:
        violations.append(("target_prompt", (
            f"word replace needs prompts of equal length: the source has {len(source.words)} words / "
            f"{len(source.ids)} tokens, the target {len(target.words)} words / {len(target.ids)} tokens "
            "(use mode refine to add or remove words)")))
    if mode == "reweight" and source.ids != target.ids:
        violations.append(("target_prompt", "reweight mode scales the source prompt's attention: the target "
                           "prompt must equal the source prompt (combine reweight with replace/refine otherwise)"))
    if mode == "reweight" and not params.reweight:
        violations.append(("reweight", "reweight mode needs at least one word -> scale entry"))
    for word, value in params.reweight.items():
        if not word_positions(target, word):
            violations.append(("reweight", f"word {word!r} is not in the target prompt"))
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            violations.append(("reweight", f"scale of {word!r} must be a finite number, got {value!r}"))
    blend_weights = None
    if params.blend_words:
        blend_weights = torch.zeros(2, max_len)
        for word in params.blend_words:
            source_positions, target_positions = word_positions(source, word), word_positions(target, word)
            if not source_positions and not target_positions:
                violations.append(("blend_words", f"word {word!r} is in neither the source nor the target prompt"))
            blend_weights[0, source_positions] = 1.0
            blend_weights[1, target_positions] = 1.0
    if violations:
        raise InvalidArgument.many(violations)

    if mode == "replace":
        cross_edit = replace_edit(replacement_mapper(source, target, max_len)[None])
    elif mode == "refine":
        mapper, alphas = refinement_mapper(source, target, max_len)
        cross_edit = refine_edit(mapper[None], alphas[None])
    else:  # reweight: the source's own maps, scaled
        cross_edit = None
    if params.reweight:
        cross_edit = reweight_edit(equalizer(target, params.reweight, max_len)[None], cross_edit)
    return PlannedP2P(mode, cross_edit, blend_weights)


def _p2p_option_violations(target_prompt: str, params: P2PParams) -> list[tuple[str, str]]:
    violations: list[tuple[str, str]] = []
    if not target_prompt.strip():
        violations.append(("target_prompt", "must not be empty for Prompt-to-Prompt"))
    if params.mode not in MODES:
        violations.append(("mode", f"unknown mode {params.mode!r}; expected one of {', '.join(MODES)}"))
    _check_fraction(violations, "cross_replace_fraction", params.cross_replace_fraction)
    _check_fraction(violations, "self_replace_fraction", params.self_replace_fraction)
    _check_fraction(violations, "blend_threshold", params.blend_threshold)
    _check_fraction(violations, "blend_start_fraction", params.blend_start_fraction)
    return violations


def check_edit_options(target_prompt: str, steps: int, engine: str, guidance: float,
                       p2p: P2PParams, masactrl: MasaCtrlParams) -> None:
    """Every check that needs no model (raises InvalidArgument with all violations). The
    servicer calls it before queueing; the word checks need the tokenizer (``plan_p2p``)."""
    violations: list[tuple[str, str]] = []
    if engine not in ENGINES:
        violations.append(("engine", f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}"))
    if not isinstance(steps, int) or steps < 1:
        violations.append(("num_inference_steps", f"must be a positive integer, got {steps!r}"))
    if not math.isfinite(guidance):
        violations.append(("guidance_scale", f"must be finite, got {guidance!r}"))
    if engine == "p2p":
        violations += _p2p_option_violations(target_prompt, p2p)
    if engine == "masactrl":
        if not isinstance(masactrl.start_step, int) or masactrl.start_step < 0:
            violations.append(("start_step", f"must be >= 0, got {masactrl.start_step!r}"))
        if not isinstance(masactrl.start_layer, int) or not 0 <= masactrl.start_layer <= REFERENCE_LAYER_COUNT:
            violations.append(("start_layer", f"must be in [0, {REFERENCE_LAYER_COUNT}] "
                               f"(Stable Diffusion's self-attention layer numbering), got {masactrl.start_layer!r}"))
    if violations:
        raise InvalidArgument.many(violations)


def make_controller(sites, steps: int, plan: PlannedP2P | None, p2p: P2PParams, masactrl: MasaCtrlParams):
    """The engine's controller for one edit: P2P when a plan is given, else MasaCtrl."""
    if plan is None:
        return MutualSelfAttention(sites, masactrl)
    local_blend = None
    if plan.blend_weights is not None:
        local_blend = LocalBlend(plan.blend_weights, p2p.blend_threshold,
                                 start_step=int(p2p.blend_start_fraction * steps))
    # The reference's windows: cross over int(f * (steps + 1)) steps (its alpha table has steps + 1
    # rows), self over int(f * steps).
    return P2PController(plan.cross_edit, cross_steps=int(p2p.cross_replace_fraction * (steps + 1)),
                         self_steps=int(p2p.self_replace_fraction * steps), self_sites=self_replace_sites(sites),
                         local_blend=local_blend, local_blend_sites=blend_sites(sites))


def edit(model, z_T: torch.Tensor, source_prompt: str, target_prompt: str, steps: int, engine: str = "p2p",
         guidance: float = 7.5, p2p: P2PParams | None = None, masactrl: MasaCtrlParams | None = None,
         control: CallControl | None = None) -> EditOutput:
    """Edit the image inverted to `z_T` from `source_prompt` towards `target_prompt`."""
    p2p = p2p or P2PParams()
    masactrl = masactrl or MasaCtrlParams()
    control = control or CallControl()
    if z_T.ndim != 4 or z_T.shape[0] != 1:
        raise InvalidArgument("z_t", f"expected one latent of shape (1, C, h, w), got {tuple(z_T.shape)}")
    check_edit_options(target_prompt, steps, engine, guidance, p2p, masactrl)

    plan = plan_p2p(model.tokenizer, source_prompt, target_prompt, p2p, model.tokenizer.model_max_length) \
        if engine == "p2p" else None
    embeddings = model.encode_prompt([source_prompt, target_prompt])  # (2, L, D), L = model_max_length
    uncond = embeddings[:1].expand_as(embeddings)

    layout = BatchLayout(branches=2, groups=("uncond", "cond") if guidance != 1.0 else ("cond",))
    latents = z_T.to(model.device, model.dtype).expand(2, *z_T.shape[1:]).clone()
    latent_size = tuple(latents.shape[-2:])
    scheduler = model.new_scheduler()
    set_timesteps(scheduler, steps, device=model.device)
    with torch.no_grad(), controlled_attention(model.unet) as sites:
        controller = make_controller(sites, steps, plan, p2p, masactrl)
        for i, t in enumerate(scheduler.timesteps):
            eps = guided_eps(model, latents, t, embeddings, uncond, guidance, control,
                             cross_attention_kwargs=attention_kwargs(controller, i, layout, latent_size))
            alpha_t, alpha_prev = step_alphas(scheduler, t)
            latents = controller.after_step(i, ddim_step(latents, eps, alpha_t, alpha_prev))
            control.progress("edit", i + 1, steps)
    control.vae()
    images = model.decode_latents(latents)
    return EditOutput(image=images[1:2], source_image=images[:1], mode=plan.mode if plan else "")
