"""A CreateJobRequest's images and masks: checks (field names as the SDK spells them) and
decoding into the tensors a TrainingMethod takes."""
from __future__ import annotations

from typing import Optional

import torch

from atelier.core import codecs
from atelier.core.errors import InvalidArgument
from atelier.personalization.methods import TrainingInputs
from atelier.v1 import personalization_pb2

__all__ = ["decode_inputs", "check_images", "check_masks", "MAX_IMAGES", "MAX_CLASS_IMAGES"]

MAX_IMAGES = 32
MAX_CLASS_IMAGES = 1000


def check_images(request: personalization_pb2.CreateJobRequest, max_pixels: int) -> list[torch.Tensor]:
    """Decode the concept images: 1..MAX_IMAGES, all one size, sides multiples of 8."""
    count = len(request.images)
    if not 1 <= count <= MAX_IMAGES:
        raise InvalidArgument("images", f"give between 1 and {MAX_IMAGES} images of the concept, got {count}")
    images = [codecs.image_to_torch(image, field=f"images[{i}]", max_pixels=max_pixels, multiple_of=8)
              for i, image in enumerate(request.images)]
    size = tuple(images[0].shape[2:])
    for i, image in enumerate(images[1:], start=1):
        if tuple(image.shape[2:]) != size:
            raise InvalidArgument(f"images[{i}]", f"is {image.shape[3]}x{image.shape[2]} (WxH) but images[0] is "
                                                  f"{size[1]}x{size[0]}: all images must have one size")
    count = len(request.class_images)
    if count > MAX_CLASS_IMAGES:
        raise InvalidArgument("class_images", f"at most {MAX_CLASS_IMAGES}, got {count}")
    return images


def check_masks(request: personalization_pb2.CreateJobRequest, size: tuple[int, int],
                max_pixels: int, field: str = "masks") -> list[torch.Tensor]:
    """Decode the masks: none (to be segmented) or one per image, each the image's size and not empty."""
    if len(request.masks) not in (0, len(request.images)):
        raise InvalidArgument(field, f"give one mask per image ({len(request.images)}) or none, "
                                     f"got {len(request.masks)}")
    masks = []
    for i, mask in enumerate(request.masks):
        decoded = codecs.mask_to_torch(mask, field=f"{field}[{i}]", size=size, max_pixels=max_pixels)
        if not bool(decoded.any()):
            raise InvalidArgument(f"{field}[{i}]", "the mask is empty: it must cover the subject")
        masks.append(decoded)
    return masks


def decode_inputs(request: personalization_pb2.CreateJobRequest, max_pixels: int) -> TrainingInputs:
    """The stored request (masks already filled in) -> tensors."""
    images = check_images(request, max_pixels)
    size = tuple(images[0].shape[2:])
    masks = check_masks(request, size, max_pixels)
    if len(masks) != len(images):
        raise InvalidArgument("masks", "the stored job has no masks (segmentation did not run)")
    class_images: Optional[torch.Tensor] = None
    if request.class_images:
        decoded = [codecs.image_to_torch(image, field=f"class_images[{i}]", max_pixels=max_pixels, multiple_of=8)
                   for i, image in enumerate(request.class_images)]
        for i, image in enumerate(decoded):
            if tuple(image.shape[2:]) != size:
                raise InvalidArgument(f"class_images[{i}]", "class images must have the concept images' size")
        class_images = torch.cat(decoded)
    return TrainingInputs(
        images=torch.cat(images),
        masks=torch.stack(masks)[:, None],
        class_images=class_images,
        seed=int(request.seed) if request.HasField("seed") else 0,
    )
