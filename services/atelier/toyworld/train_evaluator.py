"""Train the world evaluator on clean, blurred and VAE round-tripped scenes.

    python -m atelier.toyworld.train_evaluator --vae .cache/toyworld/vae-phase1 --steps 2000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import world
from .evaluator import CONCEPT_CLASSES, WorldEvaluator, head_accuracy, labels_for, load_evaluator
from .train_common import (HELD_OUT_SEED, WORK_DIR, Logger, two_cycle_lr, load_checkpoint, save_checkpoint,
                           seed_everything)

HEADS = ("shape", "colour", "count", "background_kind", "background_colour", "concept")


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma (B,)) with a 5x5 kernel."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :])  # (B,5,5)
    b, c, h, w = x.shape
    weight = k2[:, None].repeat_interleave(c, 0)  # (B*C,1,5,5)
    out = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate"), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def degrade(x: torch.Tensor, vae: AutoencoderKL | None, gen: torch.Generator) -> torch.Tensor:
    """A third each: clean, blurred (+ noise), VAE round trip (sampled latent)."""
    b = x.shape[0]
    kind = torch.randint(0, 3, (b,), generator=gen)
    out = x.clone()
    blur = kind == 1
    if blur.any():
        sigma = 0.4 + 1.1 * torch.rand(int(blur.sum()), generator=gen)
        noisy = gaussian_blur(x[blur], sigma) + 0.03 * torch.randn(x[blur].shape, generator=gen)
        out[blur] = noisy.clamp(-1, 1)
    trip = kind == 2
    if trip.any() and vae is not None:
        with torch.no_grad():
            post = vae.encode(x[trip]).latent_dist
            z = post.mean + 0.5 * post.std * torch.randn(post.mean.shape, generator=gen)
            out[trip] = vae.decode(z).sample.clamp(-1, 1)
    return out


def head_losses(out: dict, y: dict) -> torch.Tensor:
    ordinary = y["ordinary"].bool()
    loss = F.cross_entropy(out["background_kind"], y["background_kind"])
    loss = loss + F.cross_entropy(out["background_colour"], y["background_colour"])
    loss = loss + F.cross_entropy(out["concept"], y["concept"])
    if ordinary.any():
        loss = loss + F.binary_cross_entropy_with_logits(out["shape"][ordinary], y["shape"][ordinary])
        loss = loss + F.binary_cross_entropy_with_logits(out["colour"][ordinary], y["colour"][ordinary])
        loss = loss + F.cross_entropy(out["count"][ordinary], y["count"][ordinary])
    return loss


@torch.no_grad()
def accuracy(model: WorldEvaluator, x: torch.Tensor, y: dict) -> dict[str, float]:
    """Per-head accuracy as read (see evaluator.head_accuracy)."""
    model.eval()
    out = {k: torch.cat(v) for k, v in
           zip(HEADS, zip(*[[model(c)[h] for h in HEADS] for c in x.split(128)]))}
    model.train()
    return head_accuracy(out, y)


def held_out(n: int, vae: AutoencoderKL | None, seed: int = 0):
    scenes = world.batch(HELD_OUT_SEED + 50 + seed, n, concept_fraction=0.2)
    x = world.to_tensor_batch(scenes)
    return x, degrade(x, vae, torch.Generator().manual_seed(seed)), labels_for(scenes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", type=Path, default=WORK_DIR / "vae")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--more-steps", type=int, default=0, help="then a second cosine cycle at lr/4")
    ap.add_argument("--init", type=Path, default=None, help="fine-tune this evaluator folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WORK_DIR / "toy-evaluator")
    args = ap.parse_args(argv)

    seed_everything(args.seed)
    log = Logger("evaluator")
    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False) if args.vae.exists() else None
    log(f"VAE round trips: {'on' if vae is not None else 'off (no VAE)'}; concepts {CONCEPT_CLASSES}")
    model = load_evaluator(args.init).train().requires_grad_(True) if args.init else WorldEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ckpt_path = WORK_DIR / "evaluator_ckpt.pt"
    start = 0
    if (ckpt := load_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    gen = torch.Generator().manual_seed(args.seed + start)
    model.train()
    total = args.steps + args.more_steps
    for step in range(start, total):
        if step == args.steps:  # the second cycle's draws do not depend on where a run resumed
            gen = torch.Generator().manual_seed(args.seed + args.steps)
        for g in opt.param_groups:
            g["lr"] = two_cycle_lr(step, args.steps, args.more_steps, args.lr, args.lr / 4)
        scenes = world.batch(3_000_000 + step, args.batch_size, concept_fraction=0.25)
        x = degrade(world.to_tensor_batch(scenes), vae, gen)
        loss = head_losses(model(x), labels_for(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log(f"step {step} loss {loss.item():.4f}")
        if (step + 1) % 250 == 0 or step + 1 in (args.steps, total):
            save_checkpoint(ckpt_path, model=model.state_dict(), opt=opt.state_dict(), step=step + 1)
            _, xd, y = held_out(256, vae)
            log(f"step {step + 1} held-out accuracy (degraded) {accuracy(model, xd, y)}")
    model.eval()
    model.save(args.out)
    x, xd, y = held_out(1024, vae, seed=1)
    log(f"final held-out accuracy clean {accuracy(model, x, y)}")
    log(f"final held-out accuracy degraded {accuracy(model, xd, y)}; saved to {args.out}")


if __name__ == "__main__":
    main()
