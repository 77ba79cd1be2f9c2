"""Concept-aware editing of real images (issue 13): P2P edits of toy-world scenes towards a trained
EqDiff concept, with the concept (its embedding and Custom Diffusion K/V on the target branch)
versus without it (the concept's class noun in its place), side by side in one run.

For each concept: train EqDiff (bench_eqdiff's data: concept images on a gray background), then
for each one-object scene: SPDInv inversion, and the edit "a <colour> <shape> ..." ->
"a <new2> <noun> ..." (with) / "a <noun> ..." (without). The toy evaluator judges:
  - edit success: how often it names the concept in the edited image;
  - fidelity: cosine of its concept-identity embedding to the concept images' mean;
  - background preservation: mean |edited - input| outside the dilated source object.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_concept_edit.py [--concepts a,b] [--scenes 6]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from atelier.core.control import CallControl
from atelier.core.models import ModelRegistry
from atelier.inversion.concept_edit import prepare_concept
from atelier.inversion.editing import edit
from atelier.inversion.inversion import invert
from atelier.personalization.eqdiff.data import generate_class_images
from atelier.personalization.eqdiff.params import EqDiffParams
from atelier.personalization.eqdiff.run import EqDiffRun
from atelier.toyworld import evaluator, world
from bench_eqdiff import concept_data


def scenes(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [world.render(world.sample_spec(rng, num_objects=1, background_kind="solid")) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", default=",".join(world.CONCEPT_NAMES[:2]))
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=1.5e-4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = ModelRegistry().load_sd("toy")
    judge_model = evaluator.load_evaluator()
    started = time.perf_counter()
    test_scenes = scenes(args.scenes, args.seed)
    inverted = []
    for scene in test_scenes:
        image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        chain = invert(model, image.to(model.device, model.dtype), scene.caption, method="spdinv",
                       steps=args.steps, control=CallControl()).chain
        outside = ~(F.max_pool2d(torch.from_numpy(scene.masks[0])[None, None].float(), 7, 1, 3) > 0)
        inverted.append((scene, (image + 1) / 2, chain, outside))
    rows: dict[str, list[dict]] = {"without": [], "with": []}
    for name in args.concepts.split(","):
        noun = world.CONCEPTS[name].noun
        images, masks = concept_data(name, args.images)
        centre = F.normalize(torch.stack([r.embedding for r in evaluator.read_images(judge_model, images)]).mean(0),
                             dim=0)
        classes = generate_class_images(model, noun, args.class_images, 64, 64, seed=11, steps=args.steps,
                                        guidance_scale=7.5)
        params = EqDiffParams(class_word=noun, prompt_template="a {token} {class_word}", steps=args.train_steps,
                              learning_rate=args.learning_rate)
        run = EqDiffRun(model, images, masks, params, class_images=classes, seed=0)
        while run.step_index < run.total_steps:
            run.step(CallControl())
        concept = run.finish()
        for scene, truth01, chain, outside in inverted:
            obj = scene.spec.objects[0]
            source = scene.caption
            for variant, phrase in (("without", f"a {noun}"), ("with", f"a {params.placeholder_token} {noun}")):
                target = source.replace(f"a {obj.colour} {obj.shape}", phrase, 1)
                extra = {"concept": prepare_concept(model, concept, target)} if variant == "with" else {}
                edited = edit(model, chain[-1:].to(model.device, model.dtype), source, target, args.steps,
                              guidance=args.guidance, chain=chain, **extra).image.cpu()
                reading = evaluator.read_images(judge_model, edited * 2 - 1)[0]
                diff = (edited - truth01).abs().mean(1, keepdim=True)
                rows[variant].append({
                    "named": float(reading.concept == name),
                    "fidelity": float(F.cosine_similarity(reading.embedding, centre, dim=0)),
                    "bg_change": float(diff[outside.expand_as(diff)].mean()),
                })
        print(name, f"{time.perf_counter() - started:.0f}s", flush=True)
    summary = {v: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for v, rs in rows.items()}
    print(f"{args.concepts}: {args.scenes} scenes, {args.steps} steps, guidance {args.guidance}, "
          f"EqDiff {args.train_steps} steps")
    for variant, values in summary.items():
        print(variant, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "summary": summary, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
