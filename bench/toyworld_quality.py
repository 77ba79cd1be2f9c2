"""Fuller quality numbers for the shipped toy-world models, and the docs sample grid.

    .venv/bin/python bench/toyworld_quality.py [--samples 96] [--grid docs/toy_samples.png]
        [--models .cache/toyworld/final]   # candidates before `ship` (default: the shipped ones)

Prints JSON: VAE PSNR, evaluator accuracy (clean and through the VAE), generated-sample match
rates for one-object, two-object and textured-background prompts (25 DDIM steps, guidance 5),
SAM mean IoU (point, box), DDIM inversion + reconstruction PSNR at guidance 1.
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from atelier.toyworld import quality, world
from atelier.toyworld.evaluator import load_evaluator
from atelier.toyworld.train_common import EMBEDDED


def sample_grid(images: torch.Tensor, prompts: list[str], path: Path, columns: int = 6, scale: int = 2) -> None:
    cell = world.SIZE * scale
    text_h = 44
    rows = (len(prompts) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        r, c = divmod(i, columns)
        x0, y0 = 8 + c * (cell + 8), 8 + r * (cell + text_h + 8)
        arr = ((img.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()
        grid.paste(Image.fromarray(arr).resize((cell, cell), Image.NEAREST), (x0, y0))
        lines = textwrap.wrap(prompt, width=22)[:4]
        draw.multiline_text((x0, y0 + cell + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import SamModel, SamProcessor

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--grid", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", type=Path, default=EMBEDDED,
                    help="folder holding toy/, toy-sam/ and toy-evaluator/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = StableDiffusionPipeline.from_pretrained(args.models / "toy", local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    evaluator = load_evaluator(args.models / "toy-evaluator")
    sam = SamModel.from_pretrained(args.models / "toy-sam", local_files_only=True).eval()
    processor = SamProcessor.from_pretrained(args.models / "toy-sam", local_files_only=True)

    results = {"vae_psnr_db": quality.vae_psnr(pipe.vae, 256, by_kind=True)}
    with torch.no_grad():
        results["evaluator_clean"] = quality.evaluator_accuracy(evaluator, None, 1024)
        results["evaluator_vae_round_trip"] = quality.evaluator_accuracy(evaluator, pipe.vae, 1024)
    one = quality.one_object_prompts(args.samples, seed=11)
    two = quality.two_object_prompts(args.samples // 2, seed=12)
    textured = [p for p in quality.one_object_prompts(args.samples * 2, seed=13)
                if world.parse_caption(p)["background_kind"] in ("striped", "dotted")][:args.samples // 2]
    for name, prompts in (("one_object", one), ("two_object", two), ("textured_one_object", textured)):
        images = quality.generate(pipe, prompts, seed=100)
        results[f"samples_{name}"] = quality.match_rates(evaluator, images, prompts)
    results["sam_miou"] = quality.sam_miou(sam, processor, 256)
    results["ddim_inversion_guidance1"] = quality.ddim_inversion_psnr(pipe, n=32, steps=25)
    print(json.dumps(results, indent=2))

    if args.grid is not None:
        prompts = one[:8] + two[:6] + textured[:4]
        sample_grid(quality.generate(pipe, prompts, seed=7), prompts, args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
