"""Training data for EqDiff: input checks, the reference-image zoom, prior-preservation images."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from atelier.core.control import CallControl
from atelier.core.diffusion import sample
from atelier.core.errors import InvalidArgument

MAX_IMAGES = 32


def check_images_and_masks(model, images, masks) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (N,3,H,W) images in [-1,1] and (N,1,H,W) masks; InvalidArgument names the field."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise InvalidArgument("images", "expected a (N, 3, H, W) tensor of RGB images")
    count = images.shape[0]
    if count < 1 or count > MAX_IMAGES:
        raise InvalidArgument("images", f"give between 1 and {MAX_IMAGES} images, got {count}")
    if not torch.isfinite(images).all() or images.min() < -1.0001 or images.max() > 1.0001:
        raise InvalidArgument("images", "pixel values must be finite and in [-1, 1]")
    multiple = model.vae_scale_factor * 2 ** (len(model.unet.down_blocks) - 1)
    height, width = images.shape[-2:]
    if height % multiple or width % multiple:
        raise InvalidArgument("images", f"height and width must be multiples of {multiple}, got {height}x{width}")
    if not isinstance(masks, torch.Tensor) or masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] != count:
        raise InvalidArgument("masks", f"expected a (N={count}, 1, H, W) tensor, one mask per image")
    if masks.shape[-2:] != images.shape[-2:]:
        raise InvalidArgument("masks", f"mask size {tuple(masks.shape[-2:])} differs from the image size "
                                       f"{tuple(images.shape[-2:])}")
    masks = masks.bool()
    empty = [i for i in range(count) if not masks[i].any()]
    if empty:
        raise InvalidArgument(f"masks[{empty[0]}]", "the mask is empty (no subject pixel)")
    return images.float(), masks


def zoom(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference image's random-scale zoom (reference dataset :707-716), image and mask alike.

    Side s ~ U{size/3..size} with p 0.66 (zoom out: pasted at a random place on a zero canvas),
    else U{1.2 size..1.4 size} (zoom in: a random crop). No flip or rotation: the reference code
    has none, although the paper says so.
    """
    out_images, out_masks = torch.zeros_like(images), torch.zeros_like(masks, dtype=torch.float32)
    size_h, size_w = images.shape[-2:]
    for i in range(images.shape[0]):
        if torch.rand((), generator=generator) < 0.66:
            side = int(torch.randint(size_h // 3, size_h + 1, (), generator=generator))
        else:
            side = int(torch.randint(int(1.2 * size_h), int(1.4 * size_h), (), generator=generator))
        side_w = max(1, round(side * size_w / size_h))
        image = F.interpolate(images[i:i + 1].float(), size=(side, side_w), mode="bilinear", align_corners=False)
        mask = F.interpolate(masks[i:i + 1].float(), size=(side, side_w), mode="nearest")
        if side <= size_h:
            top = int(torch.randint(0, size_h - side + 1, (), generator=generator))
            left = int(torch.randint(0, size_w - side_w + 1, (), generator=generator)) if side_w <= size_w else 0
            out_images[i, :, top:top + side, left:left + side_w] = image[0, :, :, :size_w]
            out_masks[i, :, top:top + side, left:left + side_w] = mask[0, :, :, :size_w]
        else:
            top = int(torch.randint(0, side - size_h + 1, (), generator=generator))
            left = int(torch.randint(0, side_w - size_w + 1, (), generator=generator))
            out_images[i] = image[0, :, top:top + size_h, left:left + size_w]
            out_masks[i] = mask[0, :, top:top + size_h, left:left + size_w]
    return out_images.to(images.dtype), out_masks


def generate_class_images(model, class_prompt: str, count: int, height: int, width: int, seed: int,
                          steps: int = 50, guidance_scale: float = 7.5, control: CallControl | None = None
                          ) -> torch.Tensor:
    """Prior-preservation images: ``count`` DDIM samples of the base model for ``class_prompt``.

    Returns (count,3,H,W) float in [-1,1], quantised to 8 bits as the reference's saved class
    images are. Deterministic in ``seed`` (image i uses noise from seed + i).
    """
    control = control or CallControl()
    cond, uncond = model.encode_prompt([class_prompt]), model.encode_prompt([""])
    factor = model.vae_scale_factor
    channels = model.unet.config.in_channels
    noise = torch.stack([torch.randn((channels, height // factor, width // factor),
                                     generator=torch.Generator().manual_seed(seed + i)) for i in range(count)])
    latents = sample(model, noise.to(model.device), cond, uncond, steps, guidance_scale, control,
                     stage="class_images")
    control.vae()
    images = model.decode_latents(latents)
    return (images * 255).round() / 255 * 2 - 1
