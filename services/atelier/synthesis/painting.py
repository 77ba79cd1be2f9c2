"""GradOP+'s painting functions f(x): what a decoded image looks like "as a painting".

The released code compares kornia's gaussian_blur2d(x, (35, 35), (7, 7)) of the decoded image
with the scribble. kornia is not a dependency here and the blur is a separable convolution,
so it is written out (same kernel, same reflect padding as kornia's default).

Both functions take and return (B, 3, H, W) float tensors in [0, 1] and are differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAINTINGS = ("gaussian_blur", "median_quantize")

# The reference's blur at its 512 px working size.
REFERENCE_SIZE = 512
REFERENCE_SIGMA = 7.0
REFERENCE_KERNEL = 35


def blur_parameters(height: int, width: int) -> tuple[int, float]:
    """(kernel, sigma) for an image of this size: sigma scales with the shorter side
    (7 at 512 px), the kernel keeps the reference's kernel/sigma ratio (35/7 = 5),
    rounded to the nearest odd size of at least 3. At 512 px this is exactly (35, 7)."""
    sigma = REFERENCE_SIGMA * min(height, width) / REFERENCE_SIZE
    kernel = int(round(sigma * REFERENCE_KERNEL / REFERENCE_SIGMA))
    kernel = max(3, kernel if kernel % 2 == 1 else kernel + 1)
    return kernel, sigma


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (kornia.filters.gaussian_blur2d's default)."""
    coords = torch.arange(kernel, dtype=torch.float32, device=x.device) - (kernel - 1) / 2
    weights = torch.exp(-(coords**2) / (2 * sigma**2))
    weights = (weights / weights.sum()).to(x.dtype)
    channels = x.shape[1]
    pad = kernel // 2
    # Reflect padding needs pad < size; very small images fall back to replicate.
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, weights.view(1, 1, 1, kernel).expand(channels, 1, 1, kernel), groups=channels)
    return F.conv2d(x, weights.view(1, 1, kernel, 1).expand(channels, 1, kernel, 1), groups=channels)


def median_filter(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per-channel median over kernel x kernel windows (reflect padding); the gradient flows to
    the median element of each window."""
    pad = kernel // 2
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    patches = padded.unfold(2, kernel, 1).unfold(3, kernel, 1)  # (B, C, H, W, k, k)
    return patches.reshape(*patches.shape[:4], -1).median(dim=-1).values


def scribble_palette(scribble: torch.Tensor, max_colors: int = 16) -> torch.Tensor:
    """The scribble's colours, most frequent first: (K, 3) in [0, 1]."""
    pixels = (scribble[0].permute(1, 2, 0).reshape(-1, 3) * 255).round().to(torch.int64)
    codes = pixels[:, 0] * 65536 + pixels[:, 1] * 256 + pixels[:, 2]
    values, counts = codes.unique(return_counts=True)
    top = values[counts.argsort(descending=True)[:max_colors]]
    rgb = torch.stack([top // 65536, (top // 256) % 256, top % 256], dim=1)
    return rgb.to(scribble.dtype) / 255.0


def quantize(x: torch.Tensor, palette: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Each pixel -> its nearest palette colour. The forward value is the hard assignment; the
    gradient is that of a soft (softmax over -distance/temperature) assignment (straight-through):
    a hard argmin alone has zero gradient almost everywhere."""
    flat = x.permute(0, 2, 3, 1)  # (B, H, W, 3)
    distances = ((flat.unsqueeze(-2) - palette.to(x.dtype)) ** 2).sum(-1)  # (B, H, W, K)
    soft = distances.neg().div(temperature).softmax(-1) @ palette.to(x.dtype)
    hard = palette.to(x.dtype)[distances.argmin(-1)]
    return (soft + (hard - soft).detach()).permute(0, 3, 1, 2)


class Painter:
    """f(x) for one request: the painting function bound to the image size and scribble."""

    def __init__(self, name: str, scribble: torch.Tensor):
        if name not in PAINTINGS:
            raise ValueError(f"unknown painting function {name!r}; expected one of {PAINTINGS}")
        self.name = name
        height, width = scribble.shape[-2:]
        self.kernel, self.sigma = blur_parameters(height, width)
        # The median window: the blur's effective width (about 2 sigma), odd, at least 3.
        median = max(3, int(round(2 * self.sigma)))
        self.median_kernel = median if median % 2 == 1 else median + 1
        self.palette = scribble_palette(scribble) if name == "median_quantize" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "gaussian_blur":
            return gaussian_blur(x, self.kernel, self.sigma)
        return quantize(median_filter(x, self.median_kernel), self.palette)

    def describe(self) -> str:
        if self.name == "gaussian_blur":
            return f"gaussian_blur(kernel={self.kernel}, sigma={self.sigma:.3g})"
        return f"median_quantize(kernel={self.median_kernel}, colors={len(self.palette)})"


def stroke_loss(painter: Painter, image: torch.Tensor, scribble: torch.Tensor) -> float:
    """MSE(f(image), scribble), the quantity GradOP+ minimises (mean reduction)."""
    with torch.no_grad():
        return float(F.mse_loss(painter(image.float()), scribble.float()))

