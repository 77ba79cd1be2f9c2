"""PIL <-> torch image conversion: models take (1,3,H,W) in [-1,1], decoders give [0,1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1,3,H,W) float32 in [-1,1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(image: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """(1,3,H,W) or (3,H,W) in ``value_range`` (default [0,1], as decode_latents gives) -> RGB PIL."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    low, high = value_range
    unit = ((image.detach().float().cpu() - low) / (high - low)).clamp(0, 1)
    return Image.fromarray((unit.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
