"""Helpers shared by the service sub-clients: image arguments, Usage, option lookups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image as PILImage

from atelier.sdk import codec
from atelier.v1 import common_pb2, tensor_pb2

__all__ = ["ImageLike", "to_image_proto", "Usage", "choice"]

ImageLike = Union[PILImage.Image, np.ndarray, tensor_pb2.Image]


def to_image_proto(image: ImageLike, argument: str = "image") -> tensor_pb2.Image:
    """A PIL image, an (H, W, 3) uint8 array, a float array in [0, 1], or an
    ``atelier.v1.Image`` -> ``atelier.v1.Image`` (PNG, lossless).

    Raises ValueError/TypeError naming ``argument`` before anything is sent.
    """
    if isinstance(image, tensor_pb2.Image):
        return image
    if isinstance(image, PILImage.Image):
        return codec.image_from_pil(image, "png")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{argument}: expected an (H, W, 3) RGB array, got shape {image.shape}")
        if image.dtype.kind == "f":
            if not np.all(np.isfinite(image)) or image.min() < 0.0 or image.max() > 1.0:
                raise ValueError(f"{argument}: a float image must hold finite values in [0, 1]")
            image = np.rint(image * 255.0).astype(np.uint8)
        elif image.dtype != np.uint8:
            raise ValueError(f"{argument}: expected uint8 or float in [0, 1], got dtype {image.dtype}")
        return codec.image_from_array(image, "png")
    raise TypeError(f"{argument}: expected a PIL image or a numpy array, got {type(image).__name__}")


@dataclass(frozen=True)
class Usage:
    """What a call consumed on the server (atelier.v1.Usage)."""

    unet_forward_evaluations: int
    unet_backward_evaluations: int
    wall_seconds: float
    queue_seconds: float
    vae_decoder_backward_evaluations: int = 0

    @classmethod
    def from_proto(cls, msg: common_pb2.Usage) -> "Usage":
        return cls(msg.unet_forward_evaluations, msg.unet_backward_evaluations, msg.wall_seconds, msg.queue_seconds,
                   msg.vae_decoder_backward_evaluations)


def choice(value, table: dict, what: str):
    """Look up a case-insensitive option name; ValueError listing the choices otherwise."""
    key = value.lower() if isinstance(value, str) else value
    if key not in table:
        raise ValueError(f"unknown {what} {value!r}; expected one of {[k for k in table if k is not None]}")
    return table[key]
