"""Train a tiny transformers SamModel on world scenes with point and box prompts.

Image size 64 (the world's own), patch 4: a 16x16 embedding grid and 64x64 low-resolution
masks, i.e. at the world's resolution (patch 8 gave 32x32 masks and plateaued at ~0.87 mIoU:
boundaries were off by a pixel or more on every object, not just on hard ones).
Loss: BCE + dice on the single-mask output, SAM's min-over-three for the multimask output,
MSE for the IoU head.

    python -m atelier.toyworld.train_sam --steps 6000 --out .cache/toyworld/toy-sam
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                          SamPromptEncoderConfig, SamVisionConfig)

from . import world
from .train_common import WORK_DIR, Logger, two_cycle_lr, load_checkpoint, save_checkpoint, seed_everything

IMAGE_SIZE = 64
POSITIONAL_SCALE = 1.5
PATCH = 4
# Each 4x4 block of the 64x64 mask comes from one embedding token through non-overlapping
# stride-2 transposed convolutions into hidden/8 channels: 64 (8 channels) left boundaries
# ragged by a pixel (box mIoU 0.944); 128 (16 channels, one per block pixel) fixed that.
DECODER_HIDDEN = 128
SAM_CONFIG = dict(
    vision=dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, mlp_dim=384,
                patch_size=PATCH, image_size=IMAGE_SIZE, output_channels=DECODER_HIDDEN,
                num_pos_feats=DECODER_HIDDEN // 2, window_size=4, global_attn_indexes=[1, 3],
                initializer_range=0.02),  # default 1e-10
    prompt=dict(hidden_size=DECODER_HIDDEN, image_size=IMAGE_SIZE, patch_size=PATCH, mask_input_channels=16),
    decoder=dict(hidden_size=DECODER_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                 mlp_dim=4 * DECODER_HIDDEN, iou_head_hidden_dim=DECODER_HIDDEN, attention_downsample_rate=2),
)


def build_sam() -> tuple[SamModel, SamProcessor]:
    config = SamConfig(
        vision_config=SamVisionConfig(**SAM_CONFIG["vision"]).to_dict(),
        prompt_encoder_config=SamPromptEncoderConfig(**SAM_CONFIG["prompt"]).to_dict(),
        mask_decoder_config=SamMaskDecoderConfig(**SAM_CONFIG["decoder"]).to_dict())
    low = IMAGE_SIZE // PATCH * 4
    processor = SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": IMAGE_SIZE}, pad_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low}))
    model = SamModel(config)
    # transformers initialises the prompt/image positional frequencies with std hidden_size // 2
    # (48 here: aliased noise over a 64 px image); SAM's own default is 1.
    with torch.no_grad():
        pe = model.shared_image_embedding.positional_embedding
        pe.copy_(POSITIONAL_SCALE * torch.randn(pe.shape, generator=torch.Generator().manual_seed(0)))
    return model, processor


def prompts_for(scenes: list[world.Scene], rng: np.random.Generator):
    """One visible object per scene: (mask (B,64,64), point (B,2), box (B,4)) in world pixels."""
    masks, points, boxes = [], [], []
    for s in scenes:
        order = rng.permutation(len(s.masks))
        mask = next((s.masks[i] for i in order if s.masks[i].sum() >= 12), s.masks[order[0]])
        ys, xs = np.nonzero(mask)
        k = rng.integers(len(xs))
        points.append((xs[k] + 0.5, ys[k] + 0.5))
        jitter = rng.uniform(-1.0, 1.0, 4)
        boxes.append((xs.min() + jitter[0], ys.min() + jitter[1], xs.max() + 1 + jitter[2],
                      ys.max() + 1 + jitter[3]))
        masks.append(mask)
    return (torch.from_numpy(np.stack(masks)).float(), torch.tensor(points, dtype=torch.float32),
            torch.tensor(boxes, dtype=torch.float32))


def upsample(logits: torch.Tensor) -> torch.Tensor:
    """Low-resolution mask logits (..., h, w) -> world resolution, bilinear."""
    shape = logits.shape
    up = F.interpolate(logits.reshape(-1, 1, *shape[-2:]), size=(world.SIZE, world.SIZE),
                       mode="bilinear", align_corners=False)
    return up.reshape(*shape[:-2], world.SIZE, world.SIZE)


def mask_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE + dice; logits and target (B, H, W)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * target).sum((1, 2)) + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
    return bce + dice


def iou_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = logits > 0
    t = target > 0.5
    return (pred & t).sum((-2, -1)).float() / (pred | t).sum((-2, -1)).clamp_min(1).float()


def prompt_loss(model: SamModel, embeddings: torch.Tensor, target: torch.Tensor, **prompt) -> torch.Tensor:
    single = model(image_embeddings=embeddings, multimask_output=False, **prompt)
    multi = model(image_embeddings=embeddings, multimask_output=True, **prompt)
    s_logits, m_logits = upsample(single.pred_masks[:, 0, 0]), upsample(multi.pred_masks[:, 0])
    loss = mask_losses(s_logits, target).mean()
    per_mask = torch.stack([mask_losses(m_logits[:, j], target) for j in range(m_logits.shape[1])], 1)
    loss = loss + per_mask.min(1).values.mean()
    with torch.no_grad():
        s_iou = iou_of(s_logits, target)
        m_iou = iou_of(m_logits, target.unsqueeze(1))
    loss = loss + F.mse_loss(single.iou_scores[:, 0, 0], s_iou) + F.mse_loss(multi.iou_scores[:, 0], m_iou)
    return loss


def pixel_values(processor: SamProcessor, scenes: list[world.Scene]) -> torch.Tensor:
    return processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]


@torch.no_grad()
def evaluate(model: SamModel, processor: SamProcessor, n: int = 128, seed: int = 0) -> dict[str, float]:
    """Mean IoU (at world resolution) with one positive point and with the object's box."""
    from .train_common import HELD_OUT_SEED

    model.eval()
    scenes = world.batch(HELD_OUT_SEED + 30 + seed, n, concept_fraction=0.2)
    target, points, boxes = prompts_for(scenes, np.random.default_rng(seed))
    scale = IMAGE_SIZE / world.SIZE
    emb = model.get_image_embeddings(pixel_values(processor, scenes))
    res = {}
    for name, prompt in (("point", dict(input_points=(points * scale)[:, None, None],
                                        input_labels=torch.ones(n, 1, 1, dtype=torch.long))),
                         ("box", dict(input_boxes=(boxes * scale)[:, None]))):
        out = model(image_embeddings=emb, multimask_output=False, **prompt)
        res[name] = iou_of(upsample(out.pred_masks[:, 0, 0]), target).mean().item()
    model.train()
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--more-steps", type=int, default=0, help="then a second cosine cycle at lr/3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WORK_DIR / "toy-sam")
    args = ap.parse_args(argv)

    seed_everything(args.seed)
    log = Logger("sam")
    model, processor = build_sam()
    log(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ckpt_path = WORK_DIR / "sam_ckpt.pt"
    start = 0
    if (ckpt := load_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        log(f"resumed at step {start}")
    scale = IMAGE_SIZE / world.SIZE
    model.train()
    total = args.steps + args.more_steps
    for step in range(start, total):
        for g in opt.param_groups:
            g["lr"] = two_cycle_lr(step, args.steps, args.more_steps, args.lr, args.lr / 3)
        rng = np.random.default_rng(args.seed * 1_000_003 + step)
        scenes = world.batch(2_000_000 + step, args.batch_size, concept_fraction=0.3)
        target, points, boxes = prompts_for(scenes, rng)
        emb = model.get_image_embeddings(pixel_values(processor, scenes))
        b = args.batch_size
        loss = prompt_loss(model, emb, target, input_points=(points * scale)[:, None, None],
                           input_labels=torch.ones(b, 1, 1, dtype=torch.long))
        loss = loss + prompt_loss(model, emb, target, input_boxes=(boxes * scale)[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"step {step} loss {loss.item():.4f}")
        if (step + 1) % 500 == 0 or step + 1 in (args.steps, total):
            save_checkpoint(ckpt_path, model=model.state_dict(), opt=opt.state_dict(), step=step + 1)
            log(f"step {step + 1} held-out mIoU {evaluate(model, processor, 64)}")
    model.eval()
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    log(f"final held-out mIoU {evaluate(model, processor, 256)}; saved to {args.out}")


if __name__ == "__main__":
    main()
