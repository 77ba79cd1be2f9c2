"""Which guidance scale the toy model should serve by default: the README snippet, measured.

The README's edit, run as written (SPDInv inversion, 50 steps, caption as prompt, no chain sent
back, P2P with the service's defaults, guidance left to the model's default), on seeded
one-object scenes of "a red circle on a solid blue background" turned green, at each guidance
scale. Reads every edit with the toy evaluator: right = colour green, shape circle, background
blue; background MSE (0-255 scale) outside the dilated circle against the input.

    .venv/bin/python bench/bench_default_guidance.py [--scenes 6] [--guidance 1.5 2.5 3.5 5 7.5]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from atelier.core.models import ModelRegistry
from atelier.inversion.editing import edit
from atelier.inversion.inversion import invert
from atelier.toyworld import world
from atelier.toyworld.evaluator import load_evaluator, read_images

SOURCE = "a red circle on a blue background"
TARGET = "a green circle on a blue background"


def scenes(n: int, seed: int) -> list[world.Scene]:
    rng = np.random.default_rng(seed)
    return [world.render(world.sample_spec(rng, num_objects=1, shapes=["circle"], colours=["red"],
                                           background_kind="solid", background_colour="blue"))
            for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 2.5, 3.5, 5.0, 7.5])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = ModelRegistry().load_sd("toy")
    evaluator = load_evaluator()
    results = {g: {"right": 0, "bg_mse": []} for g in args.guidance}
    for scene in scenes(args.scenes, args.seed):
        image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        outside = ~(F.max_pool2d(torch.from_numpy(scene.masks[0])[None, None].float(), 7, 1, 3) > 0)
        inv = invert(model, image.to(model.device, model.dtype), SOURCE, method="spdinv", steps=args.steps)
        z_T = inv.chain[-1:]
        for g in args.guidance:
            edited = edit(model, z_T, SOURCE, TARGET, args.steps, engine="p2p", guidance=g, method="spdinv").image.cpu()
            reading = read_images(evaluator, edited * 2 - 1)[0]
            right = (reading.colours[0] == "green" and reading.shapes[0] == "circle"
                     and reading.background_colour == "blue")
            diff = ((edited * 255 - (image + 1) * 127.5) ** 2).mean(1, keepdim=True)
            results[g]["right"] += int(right)
            results[g]["bg_mse"].append(float(diff[outside].mean()))
    print(f"{args.scenes} scenes, {args.steps} steps, '{SOURCE}' -> '{TARGET}'")
    print("| guidance | right (colour, shape, background) | background MSE outside the circle (0-255) |")
    print("|---|---|---|")
    for g, r in results.items():
        print(f"| {g:g} | {r['right']}/{args.scenes} | {np.mean(r['bg_mse']):.0f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": {str(k): v for k, v in results.items()}}, handle, indent=1)


if __name__ == "__main__":
    main()
