"""Server-side codecs: atelier.v1 messages <-> torch tensors.

Thin wrappers over ``atelier.sdk.codec`` (one set of validation rules for both
ends) that add torch dtypes (FP16, BF16) and raise ``InvalidArgument`` naming the
field, so servicers need no tensor math of their own.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from atelier.core.control import CallControl
from atelier.core.errors import InvalidArgument, from_codec_error
from atelier.sdk import codec
from atelier.v1 import common_pb2, tensor_pb2

__all__ = [
    "tensor_to_torch",
    "tensor_from_torch",
    "image_to_torch",
    "image_from_torch",
    "array_to_torch",
    "torch_to_array",
    "mask_to_torch",
    "usage_to_proto",
]

_TORCH_TO_DATATYPE = {
    torch.float32: "FP32",
    torch.float16: "FP16",
    torch.bfloat16: "BF16",
    torch.int64: "INT64",
    torch.uint8: "UINT8",
    torch.bool: "BOOL",
}


def tensor_to_torch(
    msg: tensor_pb2.Tensor,
    field: str = "tensor",
    shape: Optional[Sequence[Optional[int]]] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Decode a Tensor (BF16 as torch.bfloat16). ``shape`` checks rank and the
    given dims (None = any size); ``dtype``/``device`` convert after decoding."""
    try:
        array = codec.tensor_to_numpy(msg, field)
    except codec.CodecError as error:
        raise from_codec_error(error) from None
    if msg.datatype == "BF16":
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    if shape is not None:
        _check_shape(tuple(tensor.shape), tuple(shape), f"{field}.shape")
    if dtype is not None or device is not None:
        tensor = tensor.to(device=device, dtype=dtype)
    return tensor


def _check_shape(actual: tuple, expected: tuple, field: str) -> None:
    matches = len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected))
    if not matches:
        wanted = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise InvalidArgument(field, f"expected shape {wanted}, got {list(actual)}")


def tensor_from_torch(tensor: torch.Tensor, name: str = "") -> tensor_pb2.Tensor:
    """Encode a torch tensor (moved to CPU) in its own datatype."""
    datatype = _TORCH_TO_DATATYPE.get(tensor.dtype)
    if datatype is None:
        # A server-side bug, not the caller's: not a CodecError/InvalidArgument.
        raise TypeError(f"cannot encode torch dtype {tensor.dtype}; convert to one of {list(_TORCH_TO_DATATYPE)}")
    cpu = tensor.detach().to("cpu").contiguous()
    if datatype == "BF16":
        return codec.tensor_from_numpy(cpu.view(torch.int16).numpy().view(np.uint16), name=name, datatype="BF16")
    return codec.tensor_from_numpy(cpu.numpy(), name=name)


def image_to_torch(
    msg: tensor_pb2.Image,
    field: str = "image",
    max_pixels: Optional[int] = None,
    multiple_of: Optional[int] = None,
) -> torch.Tensor:
    """Decode an Image to a (1, 3, H, W) float32 tensor in [-1, 1] (the VAE's range)."""
    try:
        array = codec.image_to_array(msg, field, max_pixels=max_pixels, multiple_of=multiple_of)
    except codec.CodecError as error:
        raise from_codec_error(error) from None
    return array_to_torch(array)


def array_to_torch(array: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 RGB array -> (1, 3, H, W) float32 in [-1, 1] (the VAE's range)."""
    pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    return pixels / 127.5 - 1.0


def image_from_torch(image: torch.Tensor, encoding: str = "png") -> tensor_pb2.Image:
    """Encode a (1, 3, H, W) or (3, H, W) tensor in [0, 1] as an Image."""
    return codec.image_from_array(torch_to_array(image), encoding=encoding)


def torch_to_array(image: torch.Tensor) -> np.ndarray:
    """A (1, 3, H, W) or (3, H, W) tensor in [0, 1] -> an (H, W, 3) uint8 RGB array."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected (3, H, W), got {tuple(image.shape)}")
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def mask_to_torch(
    msg: tensor_pb2.Mask,
    field: str = "mask",
    size: Optional[tuple[int, int]] = None,
    max_pixels: Optional[int] = None,
) -> torch.Tensor:
    """Decode a Mask to an (H, W) bool tensor; ``size`` = (H, W) it must have."""
    try:
        array = codec.mask_to_numpy(msg, field, max_pixels=max_pixels)
    except codec.CodecError as error:
        raise from_codec_error(error) from None
    if size is not None and tuple(array.shape) != tuple(size):
        raise InvalidArgument(field, f"mask is {array.shape[0]}x{array.shape[1]} (HxW) but must be {size[0]}x{size[1]}")
    return torch.from_numpy(array)


def usage_to_proto(control: CallControl) -> common_pb2.Usage:
    return common_pb2.Usage(
        unet_forward_evaluations=control.forward_evaluations,
        unet_backward_evaluations=control.backward_evaluations,
        wall_seconds=control.elapsed(),
        queue_seconds=control.queue_seconds(),
        vae_decoder_backward_evaluations=control.decoder_backward_evaluations,
    )
