"""Train a tiny IP-Adapter for the embedded `toy` model, in diffusers' format, on toy-world images.

    python -m atelier.synthesis.train_ip_adapter --steps 500 --out services/atelier/embedded/toy

Writes <out>/ip_adapter/ip-adapter_toy.safetensors (keys "image_proj.proj/norm.*" and
"ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight", as the original IP-Adapter and diffusers'
`load_ip_adapter` expect) and <out>/ip_adapter/image_encoder/ (a CLIPVisionModelWithProjection).

Objective (IP-Adapter's): the frozen UNet's noise-prediction loss with the image's own embedding
as extra cross-attention tokens; text and image are each dropped 5% of the time. Unlike the
original, no pretrained CLIP image encoder exists for the toy world, so the tiny encoder trains
jointly with the projection and to_k_ip/to_v_ip (from scratch). The adapter modules are created by
diffusers itself (`UNet2DConditionModel._load_ip_adapter_weights` from a seeded initial state
dict), so the trained weights are exactly in the layout `load_ip_adapter` reads back.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from atelier.core.models import EMBEDDED_DIR, load_sd_folder
from atelier.toyworld import world

WEIGHT_NAME = "ip-adapter_toy.safetensors"
SUBFOLDER = "ip_adapter"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_image_encoder(seed: int) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=8, projection_dim=64)
    return CLIPVisionModelWithProjection(config)


def initial_state_dict(unet, clip_dim: int, seed: int) -> dict:
    """A seeded adapter in the original format: image_proj (Linear clip -> 4 x cross, LayerNorm)
    and to_k_ip/to_v_ip per cross-attention layer (keys 1, 3, 5, ... in attn_processors order),
    initialised from the layer's text to_k/to_v as IP-Adapter's training does."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * cross, clip_dim, generator=generator) / clip_dim**0.5,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attention = unet.get_submodule(name.removesuffix(".processor"))
        ip_adapter[f"{key}.to_k_ip.weight"] = attention.to_k.weight.detach().clone()
        ip_adapter[f"{key}.to_v_ip.weight"] = attention.to_v.weight.detach().clone()
        key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def export_state_dict(unet) -> dict[str, torch.Tensor]:
    """The trained adapter back in the original (safetensors-prefixed) format."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    tensors = {
        "image_proj.proj.weight": projection.image_embeds.weight,
        "image_proj.proj.bias": projection.image_embeds.bias,
        "image_proj.norm.weight": projection.norm.weight,
        "image_proj.norm.bias": projection.norm.bias,
    }
    key = 1
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            continue
        tensors[f"ip_adapter.{key}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        tensors[f"ip_adapter.{key}.to_v_ip.weight"] = processor.to_v_ip[0].weight
        key += 2
    return {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B,3,64,64) in [-1,1] -> CLIPImageProcessor's normalisation (the images are already 64 px)."""
    x = (images + 1) / 2
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_DIR / "toy"))
    parser.add_argument("--out", default=str(EMBEDDED_DIR / "toy"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_sd_folder(args.model, device="cpu", dtype=torch.float32)
    unet, scheduler = model.unet, model.new_scheduler()
    encoder = tiny_image_encoder(args.seed)
    unet._load_ip_adapter_weights([initial_state_dict(unet, encoder.config.projection_dim, args.seed)],
                                  low_cpu_mem_usage=False)
    adapter = [p for n, p in unet.named_parameters() if "encoder_hid_proj" in n or "_ip." in n]
    for parameter in adapter:
        parameter.requires_grad_(True)
    trainable = adapter + list(encoder.parameters())
    optimiser = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=1e-2)

    scenes = world.batch(args.seed + 1, args.images)
    images = world.to_tensor_batch(scenes)
    with torch.no_grad():
        latents = torch.cat([model.encode_image(chunk) for chunk in images.split(64)])
        captions = model.encode_prompt([s.caption for s in scenes])
        empty = model.encode_prompt([""])
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.from_numpy(rng.choice(args.images, args.batch, replace=False))
        noise = torch.randn_like(latents[index])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,))
        noisy = scheduler.add_noise(latents[index], noise, t)
        text = captions[index].clone()
        drop_text = torch.from_numpy(rng.random(args.batch) < 0.05)
        text[drop_text] = empty
        embeds = encoder(pixel_values=clip_pixels(images[index])).image_embeds
        drop_image = torch.from_numpy(rng.random(args.batch) < 0.05)
        embeds = torch.where(drop_image[:, None], torch.zeros_like(embeds), embeds)
        # diffusers' UNet takes image_embeds as a list (one per adapter) of (B, 1, D) tensors.
        eps = unet(noisy, t, encoder_hidden_states=text,
                   added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        loss = F.mse_loss(eps, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)

    folder = Path(args.out) / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    save_file(export_state_dict(unet), str(folder / WEIGHT_NAME))
    encoder.save_pretrained(folder / "image_encoder")
    print(f"wrote {folder / WEIGHT_NAME} and {folder / 'image_encoder'}")


if __name__ == "__main__":
    main()
