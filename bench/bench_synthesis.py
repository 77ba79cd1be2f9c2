"""Synthesis benchmarks, side by side in one process on the embedded toy model (64 px):

  timing   ISA-DCA (N variations, one batch with the shared reference branch) / plain DDIM
           sampling of the same N images with CFG, same steps; N=4 batched vs 4 sequential
           calls; GradOP+ / SDEdit wall time and VAE-decoder passes
  quality  toy-world one-object scenes: stroke fidelity (MSE of the blurred output to the
           scribble) and realism (evaluator: the output reads as the caption's shape and
           colour) for SDEdit at 3 strengths, plain text-to-image and GradOP+; variations'
           diversity (mean pairwise L1) and fidelity (L1 to the reference) at lambda 0/0.5/0.7/1

  .venv/bin/python bench/bench_synthesis.py [--steps 20] [--scenes 16] [--references 6]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch

from atelier.core.attention import controlled_attention
from atelier.core.control import CallControl
from atelier.core.diffusion import sample
from atelier.core.models import ModelRegistry
from atelier.inversion.inversion import invert
from atelier.synthesis.gradop import SynthesisParams, gradop_plus, sdedit
from atelier.synthesis.ip_adapter import adapter_for
from atelier.synthesis.variations import RIVAL_NEGATIVE, DCAContext, VariationParams, isa_dca_variations
from atelier.toyworld import world
from atelier.toyworld.evaluator import load_evaluator
from atelier.toyworld.quality import match_rates


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def reference(model, seed: int, steps: int):
    scene = world.scene_from_seed(seed, num_objects=1)
    image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255
    chain = invert(model, image * 2 - 1, scene.caption, method="ddim", steps=steps).chain
    return scene, image, chain


def dca_for(model, image, text_embedding):
    adapter = adapter_for(model)
    if adapter is None:
        return DCAContext(text_embedding)
    return DCAContext(adapter.image_tokens(image).to(model.dtype), adapter.layers)


def variations(model, chain, caption, image, n, steps, lam, seed=0):
    cond, uncond_ref, uncond_gen = model.encode_prompt([caption, "", RIVAL_NEGATIVE]).chunk(3)
    dca = dca_for(model, image, cond)
    with controlled_attention(model.unet):
        return isa_dca_variations(model, chain, cond, uncond_ref, uncond_gen, dca,
                                  VariationParams(n=n, steps=steps, seed=seed, lam=lam), CallControl())


def bench_timing(model, steps: int, repeats: int) -> None:
    scene, image, chain = reference(model, 5, steps)
    cond, uncond = model.encode_prompt([scene.caption, RIVAL_NEGATIVE]).chunk(2)
    n = 4
    z_T = chain[-1:].expand(n, -1, -1, -1).clone()
    plain = timed(lambda: sample(model, z_T, cond, uncond, steps, 7.0, CallControl()), repeats)
    isa = timed(lambda: variations(model, chain, scene.caption, image, n, steps, 0.7), repeats)
    sequential = timed(lambda: [variations(model, chain, scene.caption, image, 1, steps, 0.7, seed=k)
                                for k in range(n)], repeats)
    print(f"\n## timing ({steps} steps, 64 px, median of {repeats})")
    print(f"ISA-DCA N=4: {isa:.3f} s   plain DDIM N=4 (CFG, same steps): {plain:.3f} s   "
          f"ratio {isa / plain:.3f}")
    print(f"N=4 batched {isa:.3f} s vs 4 sequential N=1 {sequential:.3f} s: throughput x{sequential / isa:.2f}")
    scribble = torch.from_numpy(world.scribble_of(scene)).permute(2, 0, 1)[None].float() / 255
    for name, run in (("gradop_plus", gradop_plus), ("sdedit", sdedit)):
        control = CallControl()
        run(model, scribble, cond[:1], model.encode_prompt([""]), SynthesisParams(steps=steps), control)
        wall = timed(lambda: run(model, scribble, cond[:1], model.encode_prompt([""]), SynthesisParams(steps=steps),
                                 CallControl()), repeats)
        print(f"{name}: {wall:.3f} s, UNet evaluations {control.forward_evaluations}, "
              f"decoder forward+backward {control.decoder_backward_evaluations}")


def bench_gradop_quality(model, evaluator, steps: int, scenes: int) -> None:
    rows = {"text-to-image": [], "sdedit 0.5": [], "sdedit 0.8": [], "sdedit 0.95": [], "gradop_plus 0.8": []}
    images = {name: [] for name in rows}
    captions = []
    empty = model.encode_prompt([""])
    for index in range(scenes):
        scene = world.scene_from_seed(1000 + index, num_objects=1)
        scribble = torch.from_numpy(world.scribble_of(scene)).permute(2, 0, 1)[None].float() / 255
        cond = model.encode_prompt([scene.caption])
        captions.append(scene.caption)
        runs = {
            "text-to-image": lambda: gradop_plus(model, scribble, cond, empty,
                                                 SynthesisParams(steps=steps, seed=index, iterative_steps=0),
                                                 CallControl()),
            "gradop_plus 0.8": lambda: gradop_plus(model, scribble, cond, empty,
                                                   SynthesisParams(steps=steps, seed=index), CallControl()),
        }
        for strength in (0.5, 0.8, 0.95):
            runs[f"sdedit {strength}"] = (lambda s=strength: sdedit(
                model, scribble, cond, empty, SynthesisParams(steps=steps, seed=index, strength=s), CallControl()))
        for name, run in runs.items():
            out = run()
            rows[name].append(out.stroke_loss)
            images[name].append(out.image)
    print(f"\n## GradOP+ quality ({scenes} one-object toy-world scribbles, {steps} steps, same seed per scene)")
    print("method            stroke MSE (blurred)   evaluator: colour  shape  all")
    for name, losses in rows.items():
        rates = match_rates(evaluator, torch.cat(images[name]) * 2 - 1, captions)
        print(f"{name:17s} {np.mean(losses):.4f}                 {rates['colour']:.2f}    {rates['shape']:.2f}   "
              f"{rates['all']:.2f}")


def bench_variation_quality(model, steps: int, references: int) -> None:
    print(f"\n## variations ({references} toy-world references, N=4, {steps} steps): L1 in 0..255")
    print("lambda  fidelity (to reference)  diversity (pairwise)")
    prepared = [reference(model, 5 + k, steps) for k in range(references)]
    for lam in (0.0, 0.5, 0.7, 1.0):
        fidelity, diversity = [], []
        for scene, image, chain in prepared:
            out = variations(model, chain, scene.caption, image, 4, steps, lam)
            fidelity.extend(float((x - image[0]).abs().mean() * 255) for x in out)
            diversity.extend(float((a - b).abs().mean() * 255) for a, b in itertools.combinations(out, 2))
        print(f"{lam:.1f}     {np.mean(fidelity):6.2f}                   {np.mean(diversity):6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--references", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ModelRegistry().load_sd("toy")
    adapter = adapter_for(model)
    print(f"model toy ({model.device}, {model.dtype}); DCA path: {'ip_adapter ' + adapter.weight_name if adapter else 'text'}")
    bench_timing(model, args.steps, args.repeats)
    bench_gradop_quality(model, load_evaluator(), args.steps, args.scenes)
    bench_variation_quality(model, args.steps, args.references)


if __name__ == "__main__":
    main()
