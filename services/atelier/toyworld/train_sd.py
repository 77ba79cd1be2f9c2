"""Train the text encoder and UNet jointly on latents of world scenes (frozen trained VAE).

A fixed pool of scenes is encoded once (posterior mean and std); each step samples a latent
from the stored posterior. Epsilon prediction, SD-1.x scaled_linear DDPM betas, 10% caption
dropout for classifier-free guidance, EMA of both trained models.

The pool is encoded with <work>/vae-encoder (the VAE frozen-encoder snapshot, same latent
space and scaling_factor as the final VAE); the exported pipeline carries --vae. `make` trains
with the snapshot as --vae while the decoder still trains, then exports again with
--export-only and the final VAE.

    python -m atelier.toyworld.train_sd --steps 3000 --more-steps 1200
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.training_utils import EMAModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import world
from .train_common import (SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, WORK_DIR, Logger,
                           two_cycle_lr, load_checkpoint, save_checkpoint, seed_everything)
from .vocab import build_tokenizer


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, tokenizer, size: int, seed: int, log) -> dict:
    """Render ``size`` ordinary scenes (no concepts), encode them and tokenize captions."""
    path = WORK_DIR / f"latent_pool_{size}_{seed}.pt"
    if path.exists():
        return torch.load(path)
    means, stds, ids = [], [], []
    chunk = 256
    for i in range(0, size, chunk):
        scenes = world.batch(seed + i, min(chunk, size - i))
        post = vae.encode(world.to_tensor_batch(scenes)).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
        ids.append(tokenizer([s.caption for s in scenes], padding="max_length",
                             max_length=tokenizer.model_max_length, return_tensors="pt").input_ids)
        if i % (chunk * 40) == 0:
            log(f"encoded {i}/{size}")
    pool = dict(mean=torch.cat(means), std=torch.cat(stds), ids=torch.cat(ids).to(torch.int16))
    save_checkpoint(path, **pool)
    return pool


def build_text_encoder(tokenizer) -> CLIPTextModel:
    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                            **{**TEXT_CONFIG, "max_position_embeddings": tokenizer.model_max_length})
    return CLIPTextModel(config)


def export_pipeline(vae, text_encoder, tokenizer, unet, out: Path) -> None:
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae-encoder", type=Path, default=WORK_DIR / "vae-encoder")
    ap.add_argument("--vae", type=Path, default=WORK_DIR / "vae", help="final VAE, for the export")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--more-steps", type=int, default=0, help="then a second cosine cycle at lr/2")
    ap.add_argument("--pool-size", type=int, default=20_000)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--init", type=Path, default=None,
                    help="fine-tune the UNet and text encoder of this pipeline folder")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WORK_DIR / "toy")
    ap.add_argument("--export-only", action="store_true", help="export the last checkpoint's EMA")
    args = ap.parse_args(argv)

    seed_everything(args.seed)
    log = Logger("sd")
    vae = AutoencoderKL.from_pretrained(args.vae_encoder).eval().requires_grad_(False)
    tokenizer = build_tokenizer()
    if args.init:
        if CLIPTokenizer.from_pretrained(args.init / "tokenizer").get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"{args.init}'s tokenizer differs from the generated one")
        text_encoder = CLIPTextModel.from_pretrained(args.init / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(args.init / "unet", torch_dtype=torch.float32)
    else:
        text_encoder = build_text_encoder(tokenizer)
        unet = UNet2DConditionModel(**UNET_CONFIG)
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M params")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet = EMAModel(unet.parameters(), decay=args.ema_decay)
    ema_text = EMAModel(text_encoder.parameters(), decay=args.ema_decay)
    ckpt_path = WORK_DIR / "sd_ckpt.pt"
    start = 0
    if (ckpt := load_checkpoint(ckpt_path)) is not None:
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text"])
        opt.load_state_dict(ckpt["opt"])
        ema_unet.load_state_dict(ckpt["ema_unet"])
        ema_text.load_state_dict(ckpt["ema_text"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        log(f"resumed at step {start}")

    total = args.steps + args.more_steps
    if args.export_only and start != total:
        raise SystemExit(f"{ckpt_path} is at step {start}, not {total}: finish the training first")
    if not args.export_only:
        pool = encode_pool(vae, tokenizer, args.pool_size, seed=args.seed * 1_000_000 + 5_000_000, log=log)
        scale = vae.config.scaling_factor
        empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids
        noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                           if k not in ("set_alpha_to_one",)})
        gen = np.random.default_rng(args.seed + start)
        unet.train()
        text_encoder.train()
        for step in range(start, total):
            if step == args.steps:  # the second cycle's draws do not depend on where a run resumed
                gen = np.random.default_rng(args.seed + args.steps)
                torch.manual_seed(args.seed + args.steps)
            for g in opt.param_groups:
                g["lr"] = two_cycle_lr(step, args.steps, args.more_steps, args.lr, args.lr / 2,
                                       warmup=args.warmup)
            idx = torch.from_numpy(gen.integers(0, len(pool["ids"]), args.batch_size))
            mean, std = pool["mean"][idx].float(), pool["std"][idx].float()
            latents = (mean + std * torch.randn_like(mean)) * scale
            ids = pool["ids"][idx].long()
            drop = torch.from_numpy(gen.random(args.batch_size) < args.caption_dropout)
            ids[drop] = empty_ids
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch_size,))
            noisy = noise_scheduler.add_noise(latents, noise, t)
            cond = text_encoder(ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema_unet.step(unet.parameters())
            ema_text.step(text_encoder.parameters())
            if step % 25 == 0:
                log(f"step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
            if (step + 1) % 250 == 0 or step + 1 in (args.steps, total):
                save_checkpoint(ckpt_path, unet=unet.state_dict(), text=text_encoder.state_dict(),
                                opt=opt.state_dict(), ema_unet=ema_unet.state_dict(),
                                ema_text=ema_text.state_dict(), rng=torch.get_rng_state(),
                                step=step + 1)
                log(f"checkpoint at step {step + 1}")

    ema_u, ema_t = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    ema_unet.copy_to(ema_u.parameters())
    ema_text.copy_to(ema_t.parameters())
    final_vae = AutoencoderKL.from_pretrained(args.vae).eval()
    if final_vae.config.scaling_factor != vae.config.scaling_factor:
        raise SystemExit("the final VAE's scaling_factor differs from the encoder snapshot's")
    export_pipeline(final_vae, ema_t.eval(), tokenizer, ema_u.eval(), args.out)
    log(f"saved pipeline to {args.out}")


if __name__ == "__main__":
    main()
