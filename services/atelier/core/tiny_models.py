"""Deterministic, offline builders for the tiny fallback models (`toy` SD, `toy-sam`).

Until a trained model ships under services/atelier/embedded/, the registry builds these from
configs and a seed. Nothing is downloaded: the CLIP tokenizer's vocab/merges are generated
here (no library offers an offline BPE vocabulary that stock CLIPTokenizer can load).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Bump when the builders change in a way that changes the saved weights.
BUILDER_VERSION = "1"
DEFAULT_SEED = 0

# A small English vocabulary covering the toy world's captions and common editing prompts.
WORDS = (
    "a an the of and on in with at to is photo picture image painting drawing sketch "
    "red orange yellow green blue purple pink white black gray grey brown cyan magenta "
    "circle square triangle star heart ring cross disk box ball shape object shapes "
    "big small large tiny little background striped stripes dots dotted gradient solid "
    "plain texture pattern left right top bottom center middle cat dog bird tree house car "
    "flower person man woman apple sky sea grass field mountain two one three style bright dark"
).split()

SD_CONFIGS = {
    "tokenizer": dict(model_max_length=77, words=" ".join(WORDS)),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    ),
    "text_encoder": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
    ),
    "unet": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # Stable Diffusion v1.x scheduler settings.
    "scheduler": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    ),
}

SAM_CONFIG = dict(
    vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_dim=128, patch_size=16,
                image_size=256, output_channels=32, num_pos_feats=16, window_size=4,
                global_attn_indexes=[1],  # num_pos_feats = output_channels / 2 (shared pos. embedding)
                initializer_range=0.02),  # transformers defaults the vision init to 1e-10: constant embeddings
    prompt=dict(hidden_size=32, image_size=256, patch_size=16, mask_input_channels=8),
    decoder=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_dim=64,
                 iou_head_hidden_dim=32, attention_downsample_rate=2),
)


def config_hash(kind: str, configs: dict, seed: int) -> str:
    blob = json.dumps({"kind": kind, "configs": configs, "seed": seed, "v": BUILDER_VERSION},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("ATELIER_CACHE") or Path.home() / ".cache" / "atelier")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable unicode map (the base alphabet of byte-level BPE).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_clip_vocab(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocab/merges: byte-level base characters, their ``</w>`` variants, then BPE
    merges learned on ``words`` until each word is a single token.

    Learned here rather than with tokenizers' BpeTrainer, whose tie-breaking between equally
    frequent pairs varies from run to run; this loop breaks ties lexicographically.
    """
    base = list(_bytes_to_unicode().values())
    segmented = [list(word[:-1]) + [word[-1] + "</w>"] for word in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for symbols in segmented:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
                i += 1
    tokens = base + [c + "</w>" for c in base] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def build_tiny_sd(seed: int = DEFAULT_SEED, configs: dict = SD_CONFIGS):
    """A tiny SD-1.x-architecture StableDiffusionPipeline with seeded random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = build_clip_vocab(configs["tokenizer"]["words"].split())
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=configs["tokenizer"]["model_max_length"])
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], **configs["text_encoder"])
    # One seed per component, so changing one config leaves the others' weights unchanged.
    torch.manual_seed(seed)
    vae = AutoencoderKL(**configs["vae"])
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**configs["unet"])
    scheduler = DDIMScheduler(**configs["scheduler"])
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_sam(seed: int = DEFAULT_SEED, configs: dict = SAM_CONFIG):
    """A tiny transformers SamModel (seeded random weights) with its SamProcessor."""
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel,
                              SamProcessor, SamPromptEncoderConfig, SamVisionConfig)

    config = SamConfig(
        vision_config=SamVisionConfig(**configs["vision"]).to_dict(),
        prompt_encoder_config=SamPromptEncoderConfig(**configs["prompt"]).to_dict(),
        mask_decoder_config=SamMaskDecoderConfig(**configs["decoder"]).to_dict())
    torch.manual_seed(seed)
    model = SamModel(config)
    size = configs["vision"]["image_size"]
    processor = SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": size}, pad_size={"height": size, "width": size},
        mask_size={"longest_edge": size // 4}, mask_pad_size={"height": size // 4, "width": size // 4}))
    return model, processor


def _save_atomically(target: Path, save) -> Path:
    """Run ``save(tmpdir)`` then rename into place; concurrent builders race harmlessly."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        save(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():  # a genuine failure, not a lost race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_sd(seed: int = DEFAULT_SEED, root: Path | None = None) -> Path:
    """Path to the cached tiny SD folder, building it on first use."""
    target = (root or cache_root()) / f"toy-{config_hash('sd', SD_CONFIGS, seed)}"
    return _save_atomically(target, lambda tmp: build_tiny_sd(seed).save_pretrained(tmp))


def ensure_tiny_sam(seed: int = DEFAULT_SEED, root: Path | None = None) -> Path:
    """Path to the cached tiny SAM folder (model + processor), building it on first use."""
    target = (root or cache_root()) / f"toy-sam-{config_hash('sam', SAM_CONFIG, seed)}"

    def save(tmp):
        model, processor = build_tiny_sam(seed)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return _save_atomically(target, save)
