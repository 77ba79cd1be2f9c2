"""DDIM vs SPDInv inversion quality on toy-world scenes (issue 2's report-only numbers).

For each one-object scene: invert (DDIM and SPDInv, same steps), then
  - reconstruction, PSNR against the input: the edit whose target equals the source at
    guidance 7.5 (psnr_recon_g; with the source prompt as unconditional this equals the
    guidance-1 regeneration psnr_recon_g1), and classic CFG with the empty prompt as
    unconditional at the same guidance (psnr_recon_null_g);
  - P2P colour edit ("a red circle ..." -> "a blue circle ..."): background change =
    mean |edited - input| outside the dilated object mask, object change inside it, and
    (when the evaluator ships) whether the evaluator reads the target colour and shape;
  - the mean fixed-point residual of the chain.

    .venv/bin/python bench/bench_inversion_quality.py [--scenes 8] [--steps 50]
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
from atelier.core.diffusion import sample
from atelier.core.models import ModelRegistry
from atelier.inversion.editing import edit
from atelier.inversion.inversion import invert
from atelier.toyworld import world


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.float(), b.float()).item()
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def scenes(n: int, seed: int) -> list[world.Scene]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        spec = world.sample_spec(rng, num_objects=1, background_kind=str(rng.choice(["solid", "gradient"])))
        if spec.objects[0].colour != "blue":
            out.append(world.render(spec))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = ModelRegistry().load_sd("toy")
    try:
        from atelier.toyworld.evaluator import load_evaluator, read_images

        evaluator = load_evaluator()
    except (FileNotFoundError, OSError):
        evaluator = None

    rows: dict[str, list[dict]] = {"ddim": [], "spdinv": []}
    for scene in scenes(args.scenes, args.seed):
        source = scene.caption
        obj = scene.spec.objects[0]
        target = source.replace(f"a {obj.colour} {obj.shape}", f"a blue {obj.shape}", 1)
        image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        truth01 = (image + 1) / 2
        mask = torch.from_numpy(scene.masks[0])[None, None].float()
        inside = F.max_pool2d(mask, 7, 1, 3) > 0  # dilated object region
        outside = ~inside
        for method in ("ddim", "spdinv"):
            control = CallControl()
            started = time.perf_counter()
            inv = invert(model, image.to(model.device, model.dtype), source, method=method, steps=args.steps,
                         control=control)
            seconds = time.perf_counter() - started
            z_T = inv.chain[-1:].to(model.device, model.dtype)
            recon = edit(model, z_T, source, source, args.steps, guidance=args.guidance).image.cpu()
            cond = model.encode_prompt([source])
            plain01 = model.decode_latents(sample(model, z_T, cond, None, args.steps, 1.0, CallControl())).cpu()
            # Classic CFG with the empty prompt as unconditional: where plain DDIM inversion drifts.
            null = model.encode_prompt([""])
            null01 = model.decode_latents(sample(model, z_T, cond, null, args.steps, args.guidance, CallControl())).cpu()
            edited = edit(model, z_T, source, target, args.steps, guidance=args.guidance).image.cpu()
            diff = (edited - truth01).abs().mean(1, keepdim=True)
            row = {
                "residual": float(np.mean(inv.residuals)),
                "psnr_recon_g": psnr(recon, truth01),
                "psnr_recon_g1": psnr(plain01, truth01),
                "psnr_recon_null_g": psnr(null01, truth01),
                "bg_change": float(diff[outside.expand_as(diff)].mean()),
                "obj_change": float(diff[inside.expand_as(diff)].mean()),
                "seconds": seconds,
                "backward": inv.backward_evaluations,
            }
            if evaluator is not None:
                reading = read_images(evaluator, edited * 2 - 1)[0]
                row["edit_ok"] = float(reading.colours[0] == "blue" and reading.shapes[0] == obj.shape)
            rows[method].append(row)
    summary = {m: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for m, rs in rows.items()}
    print(f"{args.scenes} scenes, {args.steps} steps, guidance {args.guidance}, evaluator: {evaluator is not None}")
    for method, s in summary.items():
        print(method, " ".join(f"{k}={v:.4g}" for k, v in s.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "summary": summary, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
