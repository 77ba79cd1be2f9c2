"""Shared pieces of the toy-world training scripts: configs, seeds, checkpoints, logging."""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
WORK_DIR = Path(os.environ.get("TOYWORLD_WORK", REPO_ROOT / ".cache" / "toyworld"))
EMBEDDED = REPO_ROOT / "services" / "atelier" / "embedded"

# Seed ranges: training scenes are drawn from seeds below HELD_OUT_SEED, evaluation above.
HELD_OUT_SEED = 10_000_000

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
TEXT_CONFIG = dict(
    hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=32, projection_dim=96, hidden_act="quick_gelu",
)
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 128), norm_num_groups=32, cross_attention_dim=96,
    attention_head_dim=8,
    # SD 1.x's layout scaled down: cross- and self-attention at every resolution of the 8x8
    # latent (8x8, 4x4, 2x2) and in the mid block. Attention methods (P2P, MasaCtrl, ISA/DCA,
    # EqDiff's losses) then act on 64-token maps as they do on SD's 64x64..16x16 ones.
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("TOYWORLD_THREADS", "2")))


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.02) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def two_cycle_lr(step: int, first: int, second: int, peak: float, second_peak: float,
                 warmup: int = 100) -> float:
    """A cosine cycle over ``first`` steps, then a second one (50 warm-up steps) at ``second_peak``:
    the scripts' "more steps" continue from a finished schedule without replaying it."""
    if step < first:
        return cosine_lr(step, first, peak, warmup=warmup)
    return cosine_lr(step - first, second, second_peak, warmup=50)


class Logger:
    def __init__(self, name: str):
        self.start = time.time()
        self.name = name

    def __call__(self, msg: str) -> None:
        print(f"[{self.name} {time.time() - self.start:7.0f}s] {msg}", flush=True)


def save_checkpoint(path: Path, **state) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=False) if path.exists() else None


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)
