"""LayerDiffusion on the toy world: phase wall times and steps/s, and a Table 1 ablation analogue.

Speed: one run per phase (reference generation, stage-1 embedding steps, stage-2 fine-tuning
steps, sampling) on the embedded model: wall seconds and steps/s for each.

Ablation: toy-world edits that change the object's colour via T_a and the background via T_b
("a green circle on a solid white background" -> T_a "a red circle", T_b "on a striped blue
background"). The reference background O_r is a rendered world scene with the target background
(and another object elsewhere, masked out by its true mask M_r); M_t is the input's true mask.
Stage 1 runs once per edit and is shared by the rows that keep it; each row then runs its own
stage 2 and draws ``--images`` seeds. The evaluator (atelier.toyworld.evaluator) reads back:
  text       the object's colour is T_a's AND the background (kind and colour) is T_b's
             (the paper's "outputs that satisfy the text", 43% -> 81% for iterative guidance);
  object     T_a's colour read;  background  T_b's kind and colour read;
  subject    the input's shape kept and one object (subject preservation).
Rows: (f) full, (a) w/o L_obj, (b) w/o L_bg, (g) w/o layered optimisation, (h) w/o fine-tune,
(i) w/o iterative guidance, (j) alpha=1, (k) alpha=0.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_layerdiffusion.py [--embedding-steps 500]
        [--finetune-steps 250] [--finetune-lr 2e-6] [--edits 3] [--images 4] [--sample-steps 50]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from atelier.core.control import CallControl
from atelier.core.models import ModelRegistry
from atelier.personalization.layerdiffusion import LayerDiffusionParams, LayerDiffusionRun
from atelier.toyworld import evaluator, world

# (input: shape, colour, background kind, background colour) -> (T_a colour, T_b kind, T_b colour)
EDITS = [
    (("circle", "green", "solid", "white"), ("red", "striped", "blue")),
    (("square", "blue", "solid", "yellow"), ("red", "dotted", "white")),
    (("triangle", "red", "gradient", "gray"), ("blue", "solid", "yellow")),
    (("square", "red", "solid", "gray"), ("green", "striped", "yellow")),
    (("circle", "blue", "dotted", "white"), ("green", "solid", "pink")),
]
ROWS = {
    "(f) full": {},
    "(a) w/o L_obj": {"object_loss": False},
    "(b) w/o L_bg": {"background_loss": False},
    "(g) w/o layered opt.": {"layered_optimization": False},
    "(h) w/o fine-tune": {"finetune": False},
    "(i) w/o iterative guidance": {"iterative_guidance": False},
    "(j) alpha=1": {"alpha": 1.0},
    "(k) alpha=0": {"alpha": 0.0},
}


def where(kind: str, colour: str) -> str:
    return {"solid": f"on a {colour} background", "gradient": f"on a {colour} gradient background",
            "striped": f"on a striped {colour} background", "dotted": f"on a dotted {colour} background"}[kind]


def single_object_scene(seed: int, shape: str, colour: str, kind: str, bg: str):
    scene = world.render(world.sample_spec(np.random.default_rng(seed), num_objects=1, shapes=[shape],
                                           colours=[colour], background_kind=kind, background_colour=bg))
    return world.to_tensor_batch([scene]), torch.from_numpy(scene.masks[0])[None, None]


def edit_inputs(index: int):
    (shape, colour, kind, bg), (new_colour, new_kind, new_bg) = EDITS[index]
    image, mask = single_object_scene(100 + index, shape, colour, kind, bg)
    other = "triangle" if shape != "triangle" else "circle"
    ref_colour = next(c for c in ("yellow", "green", "red") if c not in (new_colour, new_bg))
    reference, reference_mask = single_object_scene(200 + index, other, ref_colour, new_kind, new_bg)
    return image, mask, reference, reference_mask


def fork(run: LayerDiffusionRun, source: LayerDiffusionRun, steps_done: int) -> None:
    """Start ``run`` where ``source`` finished stage 1 (bench only: shares the stage-1 result)."""
    with torch.no_grad():
        run.e_a.copy_(source.e_a)
        run.e_b.copy_(source.e_b)
    run.generator.set_state(source.generator.get_state())
    run.step_index = steps_done


def judge(judge_model, images01, shape, new_colour, new_kind, new_bg) -> dict:
    readings = evaluator.read_images(judge_model, images01 * 2 - 1)
    obj = [r.colours[:1] == [new_colour] for r in readings]
    bg = [r.background_kind == new_kind and r.background_colour == new_bg for r in readings]
    subject = [r.shapes[:1] == [shape] and r.count == 1 for r in readings]
    return {"text": [o and b for o, b in zip(obj, bg)], "object": obj, "background": bg, "subject": subject}


def speed(model, args) -> dict:
    image, mask, reference, reference_mask = edit_inputs(0)
    (_, _, _, _), (c, k, b) = EDITS[0]
    params = LayerDiffusionParams(object_text=f"a {c} circle", background_text=where(k, b),
                                  embedding_steps=args.speed_steps, finetune_steps=args.speed_steps,
                                  num_images=2, num_inference_steps=args.sample_steps,
                                  reference_steps=args.sample_steps)
    run = LayerDiffusionRun(model, image, mask, params, segment=lambda img: reference_mask, seed=0)
    times: dict[str, float] = {}
    counts: dict[str, int] = {}
    for _ in range(run.total_steps):
        phase, _ = run.phase_at(run.step_index)
        started = time.perf_counter()
        run.step(CallControl())
        times[phase] = times.get(phase, 0.0) + time.perf_counter() - started
        counts[phase] = counts.get(phase, 0) + 1
    return {phase: {"steps": counts[phase], "wall_s": round(times[phase], 3),
                    "steps_per_s": round(counts[phase] / times[phase], 2)} for phase in times}


def ablation(model, args) -> dict:
    judge_model = evaluator.load_evaluator()
    totals = {row: {"text": [], "object": [], "background": [], "subject": []} for row in ROWS}
    for index in range(args.edits):
        (shape, _, _, _), (new_colour, new_kind, new_bg) = EDITS[index]
        image, mask, reference, reference_mask = edit_inputs(index)
        base = LayerDiffusionParams(object_text=f"a {new_colour} {shape}", background_text=where(new_kind, new_bg),
                                    embedding_steps=args.embedding_steps, finetune_steps=args.finetune_steps,
                                    finetune_learning_rate=args.finetune_lr, num_images=args.images,
                                    num_inference_steps=args.sample_steps)
        inputs = dict(reference=reference, reference_mask=reference_mask, seed=index)
        stage1 = LayerDiffusionRun(model, image, mask, dataclasses.replace(base, finetune=False, num_images=0),
                                   **inputs)
        for _ in range(stage1.total_steps):
            stage1.step(CallControl())
        for row, change in ROWS.items():
            params = dataclasses.replace(base, **change)
            run = LayerDiffusionRun(model, image, mask, params, **inputs)
            if params.layered_optimization:
                fork(run, stage1, params.embedding_steps)
            while run.step_index < run.total_steps:
                run.step(CallControl())
            images = run.finish().tensors["result.images"]
            for name, values in judge(judge_model, images, shape, new_colour, new_kind, new_bg).items():
                totals[row][name].extend(values)
        print(f"edit {index} done", flush=True)
    return {row: {name: round(float(np.mean(values)), 3) for name, values in scores.items()}
            for row, scores in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--embedding-steps", type=int, default=500)
    parser.add_argument("--finetune-steps", type=int, default=250)
    parser.add_argument("--finetune-lr", type=float, default=2e-6)
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--speed-steps", type=int, default=20)
    parser.add_argument("--skip-ablation", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ModelRegistry().load_sd(args.model)
    report = {"config": vars(args), "speed": speed(model, args)}
    print(json.dumps(report["speed"]), flush=True)
    if not args.skip_ablation:
        report["ablation"] = ablation(model, args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
