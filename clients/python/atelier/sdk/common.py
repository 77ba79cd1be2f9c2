"""Helpers shared by the service sub-clients (sync and asyncio): image arguments, Usage,
option lookups, short reprs."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, TypeVar, Union

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from atelier.sdk import codec
from atelier.v1 import common_pb2, tensor_pb2

__all__ = ["ImageLike", "to_image_proto", "Usage", "choice", "describe_array", "describe_image"]

# An image argument: a PIL image, an (H, W, 3) array (uint8, or float in [0, 1]), a path to
# an image file, the bytes of one (PNG, JPEG, or anything PIL reads), or an atelier.v1.Image.
ImageLike = Union[PILImage.Image, np.ndarray, str, "os.PathLike[str]", bytes, tensor_pb2.Image]

_PASSTHROUGH = {"PNG": tensor_pb2.Image.PNG, "JPEG": tensor_pb2.Image.JPEG}


def to_image_proto(image: ImageLike, argument: str = "image") -> tensor_pb2.Image:
    """Any ``ImageLike`` -> ``atelier.v1.Image``. Arrays and PIL images travel as PNG (lossless);
    RGB PNG/JPEG files and bytes travel as they are, other files are converted to RGB PNG.

    Raises ValueError/TypeError naming ``argument`` before anything is sent.
    """
    if isinstance(image, tensor_pb2.Image):
        return image
    if isinstance(image, PILImage.Image):
        return codec.image_from_pil(image, "png")
    if isinstance(image, np.ndarray):
        return codec.image_from_array(_rgb8(image, argument), "png")
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ValueError(f"{argument}: cannot read {os.fspath(image)!r}: {exc.strerror or exc}") from None
        return _image_from_file_bytes(data, argument)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _image_from_file_bytes(bytes(image), argument)
    raise TypeError(
        f"{argument}: expected a PIL image, a numpy array, a path or the bytes of an image file, "
        f"got {type(image).__name__}"
    )


def _rgb8(image: np.ndarray, argument: str) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{argument}: expected an (H, W, 3) RGB array, got shape {image.shape}")
    if image.dtype.kind == "f":
        if not np.all(np.isfinite(image)) or image.min() < 0.0 or image.max() > 1.0:
            raise ValueError(f"{argument}: a float image must hold finite values in [0, 1]")
        return np.rint(image * 255.0).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"{argument}: expected uint8 or float in [0, 1], got dtype {image.dtype}")
    return image


def _image_from_file_bytes(data: bytes, argument: str) -> tensor_pb2.Image:
    try:
        opened = PILImage.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{argument}: not an image file PIL can read ({len(data)} bytes)") from None
    encoding = _PASSTHROUGH.get(opened.format or "")
    if encoding is not None and opened.mode == "RGB":
        width, height = opened.size
        return tensor_pb2.Image(encoding=encoding, data=data, width=width, height=height)
    return codec.image_from_pil(opened.convert("RGB"), "png")


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

    def __repr__(self) -> str:
        return (f"Usage(unet_forward_evaluations={self.unet_forward_evaluations}, "
                f"unet_backward_evaluations={self.unet_backward_evaluations}, "
                f"wall_seconds={self.wall_seconds:.3f}, queue_seconds={self.queue_seconds:.3f})")


V = TypeVar("V")


def choice(value: Any, table: Mapping[Any, V], what: str) -> V:
    """Look up a case-insensitive option name; ValueError listing the choices otherwise."""
    key = value.lower() if isinstance(value, str) else value
    if key not in table:
        raise ValueError(f"unknown {what} {value!r}; expected one of {[k for k in table if k is not None]}")
    return table[key]


def set_present(message: Any, fields: Mapping[str, Any]) -> None:
    """Set each of ``fields`` on ``message`` whose value is not None (None means "server default")."""
    for name, value in fields.items():
        if value is not None:
            setattr(message, name, value)


def describe_array(array: Optional[np.ndarray]) -> str:
    """``float32[1, 4, 8, 8]``: an array's dtype and shape, for reprs (never its values)."""
    return "None" if array is None else f"{array.dtype}[{', '.join(str(n) for n in array.shape)}]"


def describe_image(image: Optional[PILImage.Image]) -> str:
    """``<PIL RGB 64x64>``: a PIL image's mode and size, for reprs."""
    return "None" if image is None else f"<PIL {image.mode} {image.width}x{image.height}>"
