"""EqDiff on the toy world: training speed with RRA on vs off, and the paper's Fig. 7 ablation.

Speed: training steps/s with RRA on and off, interleaved in one run (same model, same data).

Ablation (rows as Fig. 7; the cross-attention loss stays on in every row, as in the
reference's training path): A Custom Diffusion baseline, B A+RRA, C B+L_ra, D C+FDTE,
E D+masked loss (MDL), F D+MGDP (= EqDiff). For each of the world's 4 concepts, each row
trains on the same concept images (all on one plain gray background, like a DreamBooth
subject photographed in one place) with the same class images, then generates one image per
prompt. The evaluator (atelier.toyworld.evaluator) judges:
  - subject fidelity (CLIP-I/DINO analogue): cosine of the evaluator's concept-identity
    embedding of each image to the mean embedding of the concept images; and how often the
    evaluator names the concept;
  - text alignment (CLIP-T analogue): how often the evaluator reads the prompt's background
    colour AND kind;
on "unstylized" prompts (plain backgrounds of other colours) and "stylized" ones (striped /
dotted / gradient backgrounds). The "base" row is the un-personalised model prompted with the
class word. Caveat (toy model): "a box on a striped blue background" comes out on a SOLID
background, while "a box box on ..." or "a red square on ..." (two words before "on", the
dominant caption shape) keep the texture; so the base row's stylized text score is low for a
reason unrelated to personalisation, and every "a <new2> box on ..." row reads textures.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_eqdiff.py [--steps 30] [--sample-steps 20]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from atelier.core.control import CallControl
from atelier.core.diffusion import sample
from atelier.core.models import ModelRegistry
from atelier.personalization.eqdiff.data import generate_class_images
from atelier.personalization.eqdiff.generate import generate_with_concept
from atelier.personalization.eqdiff.params import EqDiffParams
from atelier.personalization.eqdiff.run import EqDiffRun
from atelier.toyworld import evaluator, world

TRAIN_BACKGROUND = ("solid", "gray")
UNSTYLIZED = [("solid", c) for c in ("white", "yellow", "pink", "blue")]
STYLIZED = [("striped", "blue"), ("dotted", "yellow"), ("gradient", "pink"), ("striped", "green")]
OFF = dict(fdte=False, mgdp=False, masked_loss=False, rra=False, reference_attention_loss=False)
ROWS = {
    "A CD": {**OFF},
    "B +RRA": {**OFF, "rra": True},
    "C +L_ra": {**OFF, "rra": True, "reference_attention_loss": True},
    "D +FDTE": {**OFF, "rra": True, "reference_attention_loss": True, "fdte": True},
    "E D+MDL": {**OFF, "rra": True, "reference_attention_loss": True, "fdte": True, "masked_loss": True},
    "F D+MGDP": {**OFF, "rra": True, "reference_attention_loss": True, "fdte": True, "mgdp": True,
                 "masked_loss": True},
}


def where(kind: str, colour: str) -> str:
    return {"solid": f"on a {colour} background", "gradient": f"on a {colour} gradient background",
            "striped": f"on a striped {colour} background", "dotted": f"on a dotted {colour} background"}[kind]


def concept_data(name: str, count: int):
    kind, colour = TRAIN_BACKGROUND
    scenes = [world.draw_concept(name, 1000 + i, background_kind=kind, background_colour=colour)
              for i in range(count)]
    masks = torch.from_numpy(np.stack([s.masks[0] for s in scenes]))[:, None]
    return world.to_tensor_batch(scenes), masks


def judge(judge_model, images01: torch.Tensor, name: str, centre: torch.Tensor, backgrounds) -> dict:
    readings = evaluator.read_images(judge_model, images01 * 2 - 1)
    sims = [float(F.cosine_similarity(r.embedding, centre, dim=0)) for r in readings]
    text = [r.background_kind == k and r.background_colour == c for r, (k, c) in zip(readings, backgrounds)]
    named = [r.concept == name for r in readings]
    return {"fidelity": float(np.mean(sims)), "named": float(np.mean(named)), "text": float(np.mean(text))}


def speed(model, steps: int) -> dict:
    images, masks = concept_data("checker_box", 3)
    classes = world.to_tensor_batch(world.batch(7, 4))
    runs = {flag: EqDiffRun(model, images, masks, EqDiffParams(class_word="box", prompt_template="a {token} {class_word}",
                                                              steps=steps + 1, rra=flag), class_images=classes)
            for flag in (True, False)}
    for run in runs.values():
        run.step(CallControl())  # warm-up
    seconds = {True: 0.0, False: 0.0}
    for _ in range(steps):
        for flag, run in runs.items():
            started = time.perf_counter()
            run.step(CallControl())
            seconds[flag] += time.perf_counter() - started
    on, off = steps / seconds[True], steps / seconds[False]
    return {"steps_per_s_rra_on": on, "steps_per_s_rra_off": off, "rra_cost_ratio": off / on}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=1.5e-4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--speed-steps", type=int, default=6)
    parser.add_argument("--concepts", default=",".join(world.CONCEPT_NAMES))
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = ModelRegistry().load_sd("toy")
    judge_model = evaluator.load_evaluator()
    started = time.perf_counter()
    report = {"speed": speed(model, args.speed_steps)}
    print(json.dumps(report["speed"]), flush=True)

    rows = ["base"] + args.rows.split(",")
    results = {row: {"unstylized": [], "stylized": []} for row in rows}
    for name in args.concepts.split(","):
        noun = world.CONCEPTS[name].noun
        images, masks = concept_data(name, args.images)
        centre = F.normalize(torch.stack([r.embedding for r in evaluator.read_images(judge_model, images)]).mean(0), dim=0)
        classes = generate_class_images(model, noun, args.class_images, 64, 64, seed=11,
                                        steps=args.sample_steps, guidance_scale=args.guidance)
        for row in rows:
            for style, backgrounds in (("unstylized", UNSTYLIZED), ("stylized", STYLIZED)):
                if row == "base":
                    generated = []
                    for i, (kind, colour) in enumerate(backgrounds):
                        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i))
                        latents = sample(model, noise, model.encode_prompt([f"a {noun} {where(kind, colour)}"]),
                                         model.encode_prompt([""]), args.sample_steps, args.guidance, CallControl())
                        generated.append(model.decode_latents(latents))
                    results[row][style].append(judge(judge_model, torch.cat(generated), name, centre, backgrounds))
                    continue
            if row == "base":
                continue
            params = EqDiffParams(class_word=noun, prompt_template="a {token} {class_word}", steps=args.steps,
                                  learning_rate=args.learning_rate, **ROWS[row])
            run = EqDiffRun(model, images, masks, params, class_images=classes, seed=0)
            while run.step_index < run.total_steps:
                run.step(CallControl())
            concept = run.finish()
            for style, backgrounds in (("unstylized", UNSTYLIZED), ("stylized", STYLIZED)):
                generated = [generate_with_concept(model, concept, f"a <new2> {noun} {where(kind, colour)}",
                                                   num_inference_steps=args.sample_steps,
                                                   guidance_scale=args.guidance, seed=i)
                             for i, (kind, colour) in enumerate(backgrounds)]
                results[row][style].append(judge(judge_model, torch.cat(generated), name, centre, backgrounds))
        print(name, f"{time.perf_counter() - started:.0f}s", flush=True)

    table = {}
    for row in rows:
        table[row] = {style: {metric: float(np.mean([r[metric] for r in results[row][style]]))
                              for metric in ("text", "fidelity", "named")}
                      for style in ("unstylized", "stylized")}
        u, s = table[row]["unstylized"], table[row]["stylized"]
        print(f"{row:9s} unstylized text {u['text']:.3f} fidelity {u['fidelity']:.3f} named {u['named']:.2f} | "
              f"stylized text {s['text']:.3f} fidelity {s['fidelity']:.3f} named {s['named']:.2f}")
    report["ablation"] = table
    report["config"] = vars(args)
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report))


if __name__ == "__main__":
    main()
