"""Train the f8 AutoencoderKL on on-the-fly world scenes (L1 + MSE + edge + small KL).

At --freeze-encoder-at the encoder is frozen and saved (with its scaling_factor) to
<work>/vae-encoder: the latent space is final from then on, so the UNet can train on it
while the decoder keeps improving (decoder-only fine-tuning, as SD's ft-MSE VAE did).
``--stop-at-freeze`` exits right there; the same command without it resumes from the
checkpoint, so `make` can start the UNet while the decoder trains.

    python -m atelier.toyworld.train_vae --steps 2600 --out .cache/toyworld/vae
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import quality, world
from .train_common import (HELD_OUT_SEED, VAE_CONFIG, WORK_DIR, Logger, two_cycle_lr, load_checkpoint,
                           save_checkpoint, seed_everything)


# How many held-out scenes measure progress and the latent std (read at call time, so a test
# of the training mechanics can make them small).
PROGRESS_SCENES, PSNR_SCENES, LATENT_STD_SCENES = 128, 256, 1024


def edge_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    return (dx(x) - dx(y)).abs().mean() + (dy(x) - dy(y)).abs().mean()


def training_scenes(step: int, batch_size: int, crop: int | None = None) -> torch.Tensor:
    """A batch of scenes; with ``crop``, one random crop (multiple of 8) per scene."""
    x = world.to_tensor_batch(world.batch(1000 + step, batch_size, concept_fraction=0.15))
    if crop is None:
        return x
    g = torch.Generator().manual_seed(step)
    offsets = torch.randint(0, (world.SIZE - crop) // 8 + 1, (batch_size, 2), generator=g) * 8
    return torch.stack([im[:, y:y + crop, x0:x0 + crop] for im, (y, x0) in zip(x, offsets.tolist())])


def evaluate_psnr(vae: AutoencoderKL, n: int | None = None, by_kind: bool = False):
    """Held-out PSNR (training seeds' held-out range, not the quality test's)."""
    n = n or PSNR_SCENES
    was_training = vae.training
    vae.eval()
    result = quality.vae_psnr(vae, n, seed=HELD_OUT_SEED + 1, by_kind=by_kind)
    vae.train(was_training)
    return result


@torch.no_grad()
def latent_std(vae: AutoencoderKL, n: int | None = None) -> float:
    n = n or LATENT_STD_SCENES
    x = world.to_tensor_batch(world.batch(HELD_OUT_SEED + 2, n, concept_fraction=0.15))
    z = torch.cat([vae.encode(c).latent_dist.mode() for c in x.split(128)])
    return z.std().item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--edge-weight", type=float, default=0.5)
    ap.add_argument("--crop", type=int, default=32, help="train on crops (cheaper) before ...")
    ap.add_argument("--full-from", type=float, default=0.85, help="... this fraction of the steps")
    ap.add_argument("--freeze-encoder-at", type=int, default=800)
    ap.add_argument("--decoder-steps", type=int, default=0,
                    help="then this many decoder-only full-resolution steps, own cosine schedule")
    ap.add_argument("--decoder-lr", type=float, default=5e-4)
    ap.add_argument("--init", type=Path, default=None,
                    help="fine-tune this AutoencoderKL folder instead of starting from scratch")
    ap.add_argument("--keep-scaling", action="store_true",
                    help="with --init: keep its scaling_factor (a UNet trained on it stays close)")
    ap.add_argument("--stop-at-freeze", action="store_true",
                    help="exit once the encoder snapshot is saved (run again without it to go on)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WORK_DIR / "vae")
    args = ap.parse_args(argv)

    seed_everything(args.seed)
    log = Logger("vae")
    vae = AutoencoderKL.from_pretrained(args.init) if args.init else AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt_path = WORK_DIR / "vae_ckpt.pt"
    start = 0
    if (ckpt := load_checkpoint(ckpt_path)) is not None:
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        log(f"resumed at step {start}")
    log(f"params {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M")
    encoder_dir = args.out.parent / "vae-encoder"
    vae.train()
    total = args.steps + args.decoder_steps
    for step in range(start, total):
        if step == args.freeze_encoder_at or (step > args.freeze_encoder_at and step == start):
            freeze_encoder(vae)
            if step == args.freeze_encoder_at and not snapshot_matches(vae, encoder_dir):
                std = latent_std(vae)
                if not (args.init and args.keep_scaling):
                    vae.register_to_config(scaling_factor=1.0 / std)
                vae.save_pretrained(encoder_dir)
                log(f"encoder frozen at step {step}, scaling_factor "
                    f"{vae.config.scaling_factor:.4f} (1/latent std {1.0 / std:.4f}); saved to {encoder_dir}")
            if args.stop_at_freeze:
                save_checkpoint(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(),
                                rng=torch.get_rng_state(), step=step)
                log(f"stopping at the encoder freeze (step {step}); run again without --stop-at-freeze")
                return
        for g in opt.param_groups:
            g["lr"] = two_cycle_lr(step, args.steps, args.decoder_steps, args.lr, args.decoder_lr)
        full = step >= args.full_from * args.steps
        x = training_scenes(step, args.batch_size, None if full else args.crop)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.edge_weight * edge_l1(rec, x)
                + args.kl_weight * post.kl().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in vae.parameters() if p.requires_grad], 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
        if (step + 1) % 250 == 0 or step + 1 in (args.steps, total):
            save_checkpoint(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(),
                            rng=torch.get_rng_state(), step=step + 1)
            mean, by_kind = evaluate_psnr(vae, PROGRESS_SCENES, by_kind=True)
            log(f"step {step + 1} held-out PSNR {mean:.2f} dB {by_kind}")
        if step + 1 == args.steps and args.decoder_steps:
            export(vae, encoder_dir, args.out.parent / "vae-phase1", log)
    export(vae, encoder_dir, args.out, log)


def export(vae: AutoencoderKL, encoder_dir: Path, out: Path, log) -> None:
    """Save with the encoder snapshot's scaling_factor (the latent space the UNet learns)."""
    vae.eval()
    scaling = AutoencoderKL.from_pretrained(encoder_dir).config.scaling_factor
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(out)
    log(f"held-out PSNR {evaluate_psnr(vae):.2f} dB, scaling_factor {scaling:.4f} "
        f"(latent std {latent_std(vae):.3f}); saved to {out}")
    vae.train()


def snapshot_matches(vae: AutoencoderKL, encoder_dir: Path) -> bool:
    """Whether ``encoder_dir`` already holds this encoder (a run resumed exactly at the freeze):
    saving it again would only make its files newer, and `make` retrain the UNet."""
    if not (encoder_dir / "config.json").exists():
        return False
    saved = AutoencoderKL.from_pretrained(encoder_dir)
    for name in ("encoder", "quant_conv"):
        mine, theirs = getattr(vae, name).state_dict(), getattr(saved, name).state_dict()
        if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
            return False
    return True


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Freeze encoder and quant_conv: the posterior (the latent space) no longer changes."""
    for module in (vae.encoder, vae.quant_conv):
        if module is not None:
            module.requires_grad_(False)
            module.eval()


if __name__ == "__main__":
    main()
