"""Quality measurements of the toy-world models (used by tests/toyworld and bench/).

All images are in [-1, 1] unless said otherwise; every measurement uses held-out seeds.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from . import world
from .evaluator import WorldEvaluator, head_accuracy, labels_for, read_images
from .train_common import HELD_OUT_SEED, psnr

QUALITY_SEED = HELD_OUT_SEED + 700


@torch.no_grad()
def vae_psnr(vae, n: int = 128, seed: int = QUALITY_SEED, by_kind: bool = False):
    """Mean PSNR (dB) of VAE round trips of held-out scenes; with ``by_kind`` also
    ``{background kind: mean PSNR}``."""
    scenes = world.batch(seed, n, concept_fraction=0.15)
    x = world.to_tensor_batch(scenes)
    rec = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(64)])
    values = psnr((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2)
    if not by_kind:
        return values.mean().item()
    kinds = [s.spec.background_kind for s in scenes]
    return values.mean().item(), {k: round(values[[i for i, j in enumerate(kinds) if j == k]].mean().item(), 2)
                                  for k in world.BACKGROUND_KINDS if k in kinds}


@torch.no_grad()
def evaluator_accuracy(evaluator: WorldEvaluator, vae=None, n: int = 256, seed: int = 1) -> dict:
    """Per-head accuracy on held-out scenes (through a VAE round trip when ``vae`` is given)."""
    scenes = world.batch(QUALITY_SEED + seed, n, concept_fraction=0.2)
    x = world.to_tensor_batch(scenes)
    if vae is not None:
        x = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(64)]).clamp(-1, 1)
    return head_accuracy(evaluator(x), labels_for(scenes))


def one_object_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` one-object prompts covering colours, shapes and background kinds evenly."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(world.COLOUR_NAMES, world.SHAPES, world.BACKGROUND_KINDS))
    rng.shuffle(combos)
    prompts = []
    for colour, shape, kind in itertools.islice(itertools.cycle(combos), n):
        bg = str(rng.choice([b for b in world.BACKGROUND_COLOUR_NAMES if b != colour]))
        spec = world.SceneSpec((world.ObjectSpec(shape, colour, 32, 32, 10),), kind, bg)
        prompts.append(spec.caption)
    return prompts


def two_object_prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [world.sample_spec(rng, num_objects=2).caption for _ in range(n)]


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int = 25, guidance: float = 5.0, seed: int = 0,
             batch_size: int = 64) -> torch.Tensor:
    """Images (B,3,64,64) in [-1,1] from the pipeline with its DDIM scheduler."""
    out = []
    for i in range(0, len(prompts), batch_size):
        g = torch.Generator().manual_seed(seed + i)
        images = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                      height=world.SIZE, width=world.SIZE, generator=g, output_type="pt").images
        out.append(images * 2 - 1)
    return torch.cat(out)


def match_rates(evaluator: WorldEvaluator, images: torch.Tensor, prompts: list[str]) -> dict:
    """Fractions of images whose evaluator reading matches the prompt's attributes.
    For several objects, the sets of shapes and colours must match."""
    readings = read_images(evaluator, images)
    hits = {"colour": 0, "shape": 0, "background_colour": 0, "background_kind": 0, "all": 0}
    for r, p in zip(readings, prompts):
        want = world.parse_caption(p)
        colours = sorted(c for c, _ in want["objects"])
        shapes = sorted(s for _, s in want["objects"])
        ok = {"colour": sorted(r.colours) == colours if len(set(colours)) == len(colours)
              else set(r.colours) == set(colours),
              "shape": sorted(r.shapes) == shapes if len(set(shapes)) == len(shapes)
              else set(r.shapes) == set(shapes),
              "background_colour": r.background_colour == want["background_colour"],
              "background_kind": r.background_kind == want["background_kind"]}
        ok["all"] = all(ok.values())
        for k, v in ok.items():
            hits[k] += int(v)
    return {k: v / len(prompts) for k, v in hits.items()}


@torch.no_grad()
def sam_miou(model, processor, n: int = 128, seed: int = 2) -> dict:
    """Mean IoU at world resolution through the SamProcessor (pre- and post-processing):
    one positive point inside the object, and the object's bounding box."""
    scenes = world.batch(QUALITY_SEED + seed, n, concept_fraction=0.2)
    rng = np.random.default_rng(seed)
    ious = {"point": [], "box": []}
    images = [s.image for s in scenes]
    targets, points, boxes = [], [], []
    for s in scenes:
        mask = max(s.masks, key=lambda m: rng.random() if m.sum() >= 12 else -1)
        ys, xs = np.nonzero(mask)
        k = rng.integers(len(xs))
        points.append([[[float(xs[k]) + 0.5, float(ys[k]) + 0.5]]])
        boxes.append([[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]])
        targets.append(torch.from_numpy(mask))
    base = processor(images=images, return_tensors="pt")
    emb = model.get_image_embeddings(base["pixel_values"])
    for name, kwargs in (("point", {"input_points": points}), ("box", {"input_boxes": boxes})):
        prompt = processor(images=images, return_tensors="pt", **kwargs)
        extra = {k: v.float() if v.is_floating_point() else v for k, v in prompt.items()
                 if k.startswith("input_")}
        out = model(image_embeddings=emb, multimask_output=False, **extra)
        masks = processor.post_process_masks(out.pred_masks, prompt["original_sizes"],
                                             prompt["reshaped_input_sizes"])
        for m, t in zip(masks, targets):
            pred = m[0, 0]
            ious[name].append(((pred & t).sum() / (pred | t).sum().clamp_min(1)).item())
    return {k: float(np.mean(v)) for k, v in ious.items()}


@torch.no_grad()
def ddim_inversion_psnr(pipe, n: int = 16, steps: int = 25, seed: int = 3) -> dict:
    """DDIM-invert held-out scenes under their caption (guidance 1), regenerate, PSNR vs input;
    the VAE round trip alone is the ceiling."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    scenes = world.batch(QUALITY_SEED + seed, n)
    x = world.to_tensor_batch(scenes)
    vae, unet = pipe.vae, pipe.unet
    ids = pipe.tokenizer([s.caption for s in scenes], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids)[0]
    z0 = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    forward = DDIMScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    forward.set_timesteps(steps)
    z = z0
    for t in inverse.timesteps:
        z = inverse.step(unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
    for t in forward.timesteps:
        z = forward.step(unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
    rec = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    ceiling = vae.decode(z0 / vae.config.scaling_factor).sample.clamp(-1, 1)
    to01 = lambda t: (t + 1) / 2
    return {"inversion_psnr": psnr(to01(rec), to01(x)).mean().item(),
            "vae_ceiling_psnr": psnr(to01(ceiling), to01(x)).mean().item()}
