"""Prompt-driven editing from an inverted latent: Prompt-to-Prompt or MasaCtrl.

The source and target branches are sampled together: one UNet call of batch 4 per step,
[uncond_source, uncond_target, cond_source, cond_target]. What else a step does depends on the
inversion method that produced the latent (``recipes.RECIPES``: each method's own editing
pipeline) and on the ProxEdit options (``proxedit``):
- the unconditional embedding: the SOURCE prompt's (negative-prompt inversion, as SPDInv's and
  NPI's editing code do), "" (plain DDIM, DirectInversion), or NTI's per-step optimised ones;
- proximal guidance and inversion guidance (SPDInv's and ProxNPI's pipeline);
- DirectInversion's source branch held on the inverted chain.
MasaCtrl follows SPDInv's MasaCtrl script: guidance 1 on the source branch, ``guidance`` on the
target, whose unconditional is "" (its npi_interp = 1) unless the method brings its own (NTI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atelier.core.attention import BatchLayout, attention_kwargs, controlled_attention
from atelier.core.control import CallControl
from atelier.core.diffusion import ddim_step, set_timesteps, step_alphas, unet_eps
from atelier.core.errors import InvalidArgument
from atelier.inversion import presets, proxedit
from atelier.inversion.concept_edit import ConceptAttention
from atelier.inversion.proxedit import ProxEditParams, ResolvedProxEdit
from atelier.inversion.recipes import RECIPES, EditRecipe
from atelier.inversion.masactrl import (REFERENCE_LAYER_COUNT, MasaCtrlParams, MutualSelfAttention,
                                       MutualSelfAttentionMaskAuto)
from atelier.inversion.p2p import (MAX_REWEIGHT, MODES, LocalBlend, P2PController, P2PParams, blend_sites, equalizer,
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

    source = tokenize_words(tokenizer, source_prompt, max_len, field="source_prompt")
    target = tokenize_words(tokenizer, target_prompt, max_len, field="target_prompt")
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
    for word in params.reweight:
        if not word_positions(target, word):
            violations.append(("reweight", f"word {word!r} is not in the target prompt"))
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
    for word, value in params.reweight.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= MAX_REWEIGHT):
            violations.append(("reweight", f"scale of {word[:40]!r} must be a number in "
                               f"[-{MAX_REWEIGHT:g}, {MAX_REWEIGHT:g}], got {value!r}"))
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
        if not isinstance(masactrl.end_step, int) or masactrl.end_step < 0:
            violations.append(("end_step", f"must be >= 0, got {masactrl.end_step!r}"))
        if bool(masactrl.mask_source_words) != bool(masactrl.mask_target_words):
            violations.append(("mask_target_words" if masactrl.mask_source_words else "mask_source_words",
                               "MaskAuto needs words of both prompts (mask_source_words and mask_target_words)"))
        _check_fraction(violations, "mask_threshold", masactrl.mask_threshold)
        if not isinstance(masactrl.start_layer, int) or not 0 <= masactrl.start_layer <= REFERENCE_LAYER_COUNT:
            violations.append(("start_layer", f"must be in [0, {REFERENCE_LAYER_COUNT}] "
                               f"(Stable Diffusion's self-attention layer numbering), got {masactrl.start_layer!r}"))
    if violations:
        raise InvalidArgument.many(violations)


def make_controller(sites, steps: int, plan: PlannedP2P | None, p2p: P2PParams, masactrl: MasaCtrlParams,
                    latent_size: tuple[int, int], native_side: int, mask_weights: torch.Tensor | None = None):
    """The engine's controller for one edit: P2P when a plan is given, else MasaCtrl (MaskAuto
    when ``mask_weights``, the MaskAuto words' token weights, are given)."""
    if plan is None:
        if mask_weights is not None:
            return MutualSelfAttentionMaskAuto(sites, masactrl, mask_weights, blend_sites(sites, latent_size).sites,
                                               masactrl.mask_threshold)
        return MutualSelfAttention(sites, masactrl)
    local_blend, blend_at = None, frozenset()
    if plan.blend_weights is not None:
        layout = blend_sites(sites, latent_size)
        blend_at = layout.sites
        local_blend = LocalBlend(plan.blend_weights, p2p.blend_threshold,
                                 start_step=int(p2p.blend_start_fraction * steps), pooling=layout.pooling,
                                 subtract_floor=layout.subtract_floor)
    # The reference's windows: cross over int(f * (steps + 1)) steps (its alpha table has steps + 1
    # rows), self over int(f * steps).
    return P2PController(plan.cross_edit, cross_steps=int(p2p.cross_replace_fraction * (steps + 1)),
                         self_steps=int(p2p.self_replace_fraction * steps),
                         self_sites=self_replace_sites(sites, latent_size, native_side),
                         local_blend=local_blend, local_blend_sites=blend_at)


def resolve_prox_edit(options: ProxEditParams, recipe: EditRecipe, engine: str, has_chain: bool) -> ResolvedProxEdit:
    """Fill the unset ProxEdit options from the method's recipe and the engine (raises InvalidArgument)."""
    violations = []
    quantile = proxedit.DEFAULT_QUANTILE[engine] if options.quantile is None else options.quantile
    if not (isinstance(quantile, (int, float)) and math.isfinite(quantile) and 0.0 < quantile < 1.0):
        violations.append(("quantile", f"must be a number in (0, 1), got {quantile!r}"))
    if not isinstance(options.inversion_guidance_timestep, int) or options.inversion_guidance_timestep < 0:
        violations.append(("inversion_guidance_timestep",
                           f"must be a non-negative integer, got {options.inversion_guidance_timestep!r}"))
    prox = recipe.proximal_guidance if options.proximal_guidance is None else options.proximal_guidance
    guide = options.inversion_guidance
    if guide and engine != "p2p":
        violations.append(("inversion_guidance", "SPDInv's pipeline runs it with P2P only"))
    if guide and not prox:
        violations.append(("inversion_guidance", "needs proximal guidance (its mask comes from it)"))
    if guide and not has_chain:
        violations.append(("source", "inversion guidance needs the inverted chain: invert with "
                           "return_chain and send the result back, or invert in the same call"))
    if guide is None:
        guide = recipe.inversion_guidance and prox and engine == "p2p" and has_chain
    if violations:
        raise InvalidArgument.many(violations)
    return ResolvedProxEdit(bool(prox), float(quantile), bool(guide), int(options.inversion_guidance_timestep))


def edit(model, z_T: torch.Tensor, source_prompt: str, target_prompt: str, steps: int, engine: str = "p2p",
         guidance: float = 7.5, p2p: P2PParams | None = None, masactrl: MasaCtrlParams | None = None,
         control: CallControl | None = None, prox_edit: ProxEditParams | None = None, method: str = "spdinv",
         chain: torch.Tensor | None = None, null_embeddings: torch.Tensor | None = None,
         preset: str = "", concept=None) -> EditOutput:
    """Edit the image inverted to `z_T` from `source_prompt` towards `target_prompt`.

    ``method`` names the inversion that produced ``z_T`` and selects its editing recipe;
    ``chain`` (z_0..z_T, (steps+1, C, h, w)) enables inversion guidance and DirectInversion;
    ``null_embeddings`` ((steps, L, D)) are NTI's per-step unconditional embeddings.
    ``preset`` "spdinv" fills unset P2P options as SPDInv's script does (``presets``).
    ``concept`` (``concept_edit.EditConcept``) applies a personalization concept to the target
    branch only: its placeholder's embedding and its Custom Diffusion K/V.
    """
    p2p = p2p or P2PParams()
    if preset not in presets.PRESETS:
        raise InvalidArgument("preset", f"unknown preset {preset!r}; expected one of {presets.PRESETS}")
    if preset == "spdinv" and engine == "p2p":
        p2p = presets.spdinv_p2p(source_prompt, target_prompt, p2p)
    masactrl = masactrl or MasaCtrlParams()
    control = control or CallControl()
    if z_T.ndim != 4 or z_T.shape[0] != 1:
        raise InvalidArgument("z_t", f"expected one latent of shape (1, C, h, w), got {tuple(z_T.shape)}")
    check_edit_options(target_prompt, steps, engine, guidance, p2p, masactrl)
    recipe = RECIPES.get(method)
    if recipe is None:
        raise InvalidArgument("source", f"unknown inversion method {method!r}")
    check_method_inputs(recipe, steps, z_T, chain, null_embeddings)
    prox = resolve_prox_edit(prox_edit or ProxEditParams(), recipe, engine, chain is not None)

    # With a concept, word alignment sees its placeholder as the one token the embedding replaces.
    target_words = target_prompt if concept is None else concept.plan_text(target_prompt)
    plan = plan_p2p(model.tokenizer, source_prompt, target_words, p2p, model.tokenizer.model_max_length) \
        if engine == "p2p" else None
    mask_weights = _mask_auto_weights(model.tokenizer, source_prompt, target_words, masactrl) \
        if engine == "masactrl" and masactrl.mask_source_words else None
    if concept is None:
        embeddings = model.encode_prompt([source_prompt, target_prompt])  # (2, L, D), L = model_max_length
    else:
        embeddings = torch.cat([model.encode_prompt([source_prompt]), concept.encode(model, target_prompt)])
    unconditional = _unconditional(model, recipe, engine, embeddings, null_embeddings)
    # Per-branch guidance: MasaCtrl's source branch runs unguided (SPDInv's [1, scale]).
    scales = torch.tensor([1.0 if engine == "masactrl" else guidance, guidance], device=model.device,
                          dtype=torch.float32).view(2, 1, 1, 1)
    guided = guidance != 1.0
    layout = BatchLayout(branches=2, groups=("uncond", "cond") if guided else ("cond",))
    latents = z_T.to(model.device, model.dtype).expand(2, *z_T.shape[1:]).clone()
    latent_size = tuple(latents.shape[-2:])
    if chain is not None:
        chain = chain.to(model.device, model.dtype)
    scheduler = model.new_scheduler()
    set_timesteps(scheduler, steps, device=model.device)
    with torch.no_grad(), controlled_attention(model.unet) as sites:
        controller = make_controller(sites, steps, plan, p2p, masactrl, latent_size, _native_side(model), mask_weights)
        if concept is not None:
            target_rows = torch.tensor([layout.row(1, group) for group in layout.groups])
            controller = ConceptAttention(controller, concept.layers, target_rows)
        for i, t in enumerate(scheduler.timesteps):
            kwargs = attention_kwargs(controller, i, layout, latent_size)
            mask = None
            if guided:
                eps_uncond, eps_cond = unet_eps(model, torch.cat([latents, latents]), t,
                                                torch.cat([unconditional(i), embeddings]), control,
                                                kwargs).float().chunk(2)
                delta = eps_cond - eps_uncond
                if prox.proximal_guidance:
                    rows = slice(None) if engine == "p2p" else slice(1, None)
                    delta[rows], tau = proxedit.shrink(delta[rows], prox.quantile)
                    if prox.inversion_guidance and int(t) < prox.inversion_guidance_timestep:
                        mask = proxedit.edit_mask(delta, tau)
                eps = eps_uncond + scales * delta
            else:
                eps = unet_eps(model, latents, t, embeddings, control, kwargs)
            alpha_t, alpha_prev = step_alphas(scheduler, t)
            latents = ddim_step(latents, eps.to(latents.dtype), alpha_t, alpha_prev)
            if mask is not None:
                latents = proxedit.inversion_guidance(latents, mask.to(latents.dtype), chain[steps - i - 1])
            if recipe.pin_source:  # DirectInversion: the source branch's gap to the chain added back
                latents[0] = chain[steps - i - 1]
            latents = controller.after_step(i, latents)
            control.progress("edit", i + 1, steps)
    control.vae()
    images = model.decode_latents(latents)
    return EditOutput(image=images[1:2], source_image=images[:1], mode=plan.mode if plan else "")


def check_method_inputs(recipe: EditRecipe, steps: int, z_T: torch.Tensor, chain, null_embeddings) -> None:
    violations = []
    if chain is not None and (chain.ndim != 4 or chain.shape[0] != steps + 1 or chain.shape[1:] != z_T.shape[1:]):
        violations.append(("source", f"expected z_0..z_T of shape ({steps + 1}, {', '.join(map(str, z_T.shape[1:]))})"
                           f", got {tuple(chain.shape)}"))
    if recipe.pin_source and chain is None:
        violations.append(("source", "DirectInversion edits along the inverted chain: invert with "
                           "return_chain and send the result back, or invert in the same call"))
    if recipe.unconditional == "optimised":
        if null_embeddings is None:
            violations.append(("source", "null-text inversion's per-step embeddings are "
                               "required (send the Invert result back as returned)"))
        elif null_embeddings.ndim != 3 or null_embeddings.shape[0] != steps:
            violations.append(("source",
                               f"expected ({steps}, L, D), got {tuple(null_embeddings.shape)}"))
    if violations:
        raise InvalidArgument.many(violations)


def _unconditional(model, recipe: EditRecipe, engine: str, embeddings: torch.Tensor, null_embeddings):
    """step -> (2, L, D) unconditional embeddings of [source, target]."""
    if recipe.unconditional == "optimised":
        per_step = null_embeddings.to(model.device, embeddings.dtype)
        if per_step.shape[1:] != embeddings.shape[1:]:
            raise InvalidArgument("source",
                                  f"expected (steps, {', '.join(map(str, embeddings.shape[1:]))}), got {tuple(per_step.shape)}")
        return lambda step: per_step[step:step + 1].expand_as(embeddings)
    null = model.encode_prompt([""])
    source = embeddings[:1] if recipe.unconditional == "source" else null
    fixed = torch.cat([source, null if engine == "masactrl" else source])
    return lambda step: fixed


def _native_side(model) -> int:
    """The UNet's training latent side (SD 1.x: 64), which the references' layer rules assume."""
    size = model.unet.config.sample_size
    return int(size if isinstance(size, int) else size[0])


def _mask_auto_weights(tokenizer, source_prompt: str, target_prompt: str, masactrl: MasaCtrlParams) -> torch.Tensor:
    """(2, tokens): 1 at the MaskAuto words' tokens of the source (row 0) and target (row 1) prompts."""
    max_len = tokenizer.model_max_length
    weights = torch.zeros(2, max_len)
    violations = []
    for row, (prompt, words, name) in enumerate(((source_prompt, masactrl.mask_source_words, "mask_source_words"),
                                                 (target_prompt, masactrl.mask_target_words, "mask_target_words"))):
        tokens = tokenize_words(tokenizer, prompt, max_len, field="source_prompt" if row == 0 else "target_prompt")
        for word in words:
            positions = word_positions(tokens, word)
            if not positions:
                violations.append((name, f"word {word[:40]!r} is not in the {'source' if row == 0 else 'target'} prompt"))
            weights[row, positions] = 1.0
    if violations:
        raise InvalidArgument.many(violations)
    return weights
