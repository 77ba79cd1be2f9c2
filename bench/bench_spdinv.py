"""SPDInv vs DDIM inversion: wall time, UNet evaluations, fixed-point residuals.

Runs side by side in one process on the registry's default model at 64x64:
  ddim                reference DDIM inversion (+ batched residual diagnostics)
  spdinv              SPDInv in the reference order (step, then check; leeruibin/SPDInv SPD_loop)
  spdinv-check-first  the check_first option (delta checked before each AdamW step)
  fixed_point         AIDI-style Anderson-accelerated fixed-point iteration (forward passes
                      only), the same fixed point with the same K and delta: a candidate
                      faster solver, measured against the reference's residual

  .venv/bin/python bench/bench_spdinv.py [--steps 25 50] [--rounds 25] [--threshold 5e-6]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from atelier.core import diffusion
from atelier.core.control import CallControl
from atelier.core.codecs import array_to_torch
from atelier.core.models import ModelRegistry
from atelier.inversion.inversion import invert

PROMPT = "a red circle on a striped blue background"


def test_scene(size: int = 64) -> torch.Tensor:
    canvas = Image.new("RGB", (size, size), (40, 60, 200))
    draw = ImageDraw.Draw(canvas)
    for x in range(0, size, 8):
        draw.rectangle([x, 0, x + 3, size], fill=(230, 230, 240))
    draw.ellipse([size * 0.25, size * 0.25, size * 0.75, size * 0.75], fill=(220, 30, 30))
    return array_to_torch(np.asarray(canvas.convert("RGB")))


@torch.no_grad()
def residuals_of(model, chain, prompt, steps):
    """Fixed-point residual of each z_t in ``chain`` ((steps+1,4,h,w); not timed)."""
    cond = model.encode_prompt([prompt])
    control = CallControl()
    out = []
    for i, (t, alpha_prev, alpha_t) in enumerate(diffusion.inversion_schedule(model, steps)):
        c1, c2 = diffusion.inversion_coefficients(alpha_prev, alpha_t)
        z_prev, z_t = chain[i:i + 1].to(model.device), chain[i + 1:i + 2].to(model.device)
        eps = diffusion.unet_eps(model, z_t, t, cond, control).float()
        out.append(F.mse_loss(z_t, c1 * z_prev + c2 * eps).item())
    return out


@torch.no_grad()
def reconstruction_psnr(model, chain, prompt, steps, guidance):
    """PSNR (dB) of regenerating from z_T against the VAE's own reconstruction of z_0.

    The unconditional branch is the empty prompt (with the source prompt as unconditional,
    as the editing engines use, CFG reduces to guidance 1 for a reconstruction).
    """
    cond, uncond = model.encode_prompt([prompt]), model.encode_prompt([""])
    regenerated = diffusion.sample(model, chain[-1:], cond, uncond, steps, guidance, CallControl())
    error = torch.mean((model.decode_latents(regenerated) - model.decode_latents(chain[:1])) ** 2)
    return float(10 * torch.log10(1 / error))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threshold", type=float, default=5e-6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 7.5],
                        help="guidances for the (reported) reconstruction PSNR")
    parser.add_argument("--fixed-point-thresholds", type=float, nargs="*", default=[],
                        help="extra fixed_point rows at these deltas (its cost at SPDInv's residual)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per method; fastest kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on shared CPUs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    registry = ModelRegistry()
    model = registry.load_sd(args.model)
    image = test_scene()
    print(f"model {args.model} ({registry.resolve(args.model)}), device {model.device} {model.dtype}, "
          f"threads {torch.get_num_threads()}, K={args.rounds}, delta={args.threshold:g}, lr={args.lr:g}")
    invert(model, image, PROMPT, method="ddim", steps=2)  # warm-up

    header = (f"{'method':<18} {'steps':>5} {'wall s':>8} {'x ddim':>7} {'fwd':>6} {'fwd+bwd':>8} {'bwd run':>8} "
              f"{'rounds med':>10} {'mean residual':>14} {'median resid':>13}")
    print(header)
    print("-" * len(header))
    chains = {}
    for steps in args.steps:
        results, best_seconds = {}, {}
        # Interleaved repeats, fastest kept: on a shared CPU the minimum is the least noisy estimate.
        for _ in range(args.repeats):
            extra = [f"fixed_point@{delta:g}" for delta in args.fixed_point_thresholds]
            for method in ("ddim", "spdinv", "spdinv-check-first", "fixed_point", *extra):
                name, _, delta = method.partition("@")
                out = invert(model, image, PROMPT, method=name.removesuffix("-check-first"), steps=steps,
                             control=CallControl(), max_rounds=args.rounds, learning_rate=args.lr,
                             loss_threshold=float(delta) if delta else args.threshold,
                             check_first=method.endswith("check-first"))
                seconds = out.seconds
                results[method] = (out.chain, out.forward_evaluations, out.backward_evaluations, out.rounds,
                                   out.residuals)
                best_seconds[method] = min(seconds, best_seconds.get(method, float("inf")))
        rows = []
        for method, (chain, forward, backward, rounds, residuals) in results.items():
            residuals = residuals or residuals_of(model, chain, PROMPT, steps)
            rows.append((method, best_seconds[method], forward, backward, sum(rounds), rounds, residuals))
        ddim_seconds = rows[0][1]
        for method, seconds, forward, backward, passes, rounds, residuals in rows:
            print(f"{method:<18} {steps:>5} {seconds:>8.2f} {seconds / ddim_seconds:>7.1f} {forward:>6} {backward:>8} "
                  f"{passes:>8} {statistics.median(rounds):>10.0f} {statistics.fmean(residuals):>14.3g} "
                  f"{statistics.median(residuals):>13.3g}")
        chains[steps] = {method: result[0] for method, result in results.items()}
    print("fwd: forward-only UNet calls; fwd+bwd: calls made with autograd (an upper bound on backward "
          "passes for check-first); bwd run: optimiser steps (fixed_point: accelerated rounds, forward only)")
    print("\nreconstruction PSNR (dB) vs the VAE reconstruction of z_0, regenerated from z_T "
          "(reported, not a goal of inversion alone):")
    for steps, by_method in chains.items():
        for guidance in args.guidance:
            cells = [f"{method} {reconstruction_psnr(model, chain, PROMPT, steps, guidance):6.2f}"
                     for method, chain in by_method.items()]
            print(f"  steps {steps:>3} guidance {guidance:>4}: " + "   ".join(cells))


if __name__ == "__main__":
    main()
