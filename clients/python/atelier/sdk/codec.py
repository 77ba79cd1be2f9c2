"""Wire codecs: atelier.v1 Tensor/Image/Mask <-> numpy arrays and PIL images.

Pure numpy + PIL (no torch, no grpc) so the SDK and the server share one
implementation of the validation rules. Every error is a ``CodecError`` naming
the dotted proto field at fault, which the server turns into a BadRequest
field violation.
"""
from __future__ import annotations

import io
import math
import re
import warnings
from typing import Optional, Union, cast

import numpy as np
from PIL import Image as PILImage

from atelier.v1 import tensor_pb2

__all__ = [
    "DATATYPES",
    "CodecError",
    "tensor_from_numpy",
    "tensor_to_numpy",
    "float32_to_bf16_bits",
    "bf16_bits_to_float32",
    "image_from_pil",
    "image_from_array",
    "image_to_pil",
    "image_to_array",
    "mask_from_numpy",
    "mask_to_numpy",
]

# Open Inference Protocol datatype -> numpy dtype (little endian). numpy has no
# bfloat16, so BF16 travels as the raw uint16 bit patterns.
DATATYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}

_NUMPY_TO_DATATYPE = {
    np.dtype("float32"): "FP32",
    np.dtype("float16"): "FP16",
    np.dtype("int64"): "INT64",
    np.dtype("uint8"): "UINT8",
    np.dtype("bool"): "BOOL",
}

# numpy's own limit is 32 (numpy 1) or 64 (numpy 2) dims; no tensor in the API has more
# than 5, so a generous fixed bound keeps the error the same on every numpy.
MAX_TENSOR_DIMS = 32

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"

Encoding = tensor_pb2.Image.Encoding
_ENCODING_NAMES = {
    "png": Encoding.PNG,
    "jpeg": Encoding.JPEG,
    "jpg": Encoding.JPEG,
    "raw": Encoding.RAW_RGB8,
    "raw_rgb8": Encoding.RAW_RGB8,
}


class CodecError(ValueError):
    """Malformed wire data; ``field`` is the dotted proto path at fault."""

    def __init__(self, field: str, description: str):
        super().__init__(f"{field}: {description}" if field else description)
        self.field = field
        self.description = description


# --------------------------------------------------------------------------- tensors


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even like torch."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding_bias = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = ((bits + rounding_bias) >> np.uint32(16)).astype(np.uint16)
    # Rounding could carry a NaN's mantissa into the sign bit; keep a quiet NaN.
    nan = np.isnan(np.asarray(values, dtype=np.float32))
    if nan.any():
        sign = ((bits >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16)
        rounded = np.where(nan, sign | np.uint16(0x7FC0), rounded)
    return rounded


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    widened = np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return widened.view(np.float32)


def tensor_from_numpy(arr: np.ndarray, name: str = "", datatype: Optional[str] = None) -> tensor_pb2.Tensor:
    """Encode an array as a Tensor.

    ``datatype`` is inferred from the dtype; pass ``datatype="BF16"`` with a float32
    array (converted) or a uint16 array (taken as bf16 bits).
    """
    field = name or "tensor"
    arr = np.asarray(arr)
    if datatype is None:
        datatype = _NUMPY_TO_DATATYPE.get(arr.dtype)
        if datatype is None:
            raise CodecError(
                field,
                f"unsupported dtype {arr.dtype}; use one of float32, float16, int64, uint8, bool "
                "(convert explicitly, e.g. arr.astype(np.float32))",
            )
    if datatype not in DATATYPES:
        raise CodecError(f"{field}.datatype", f"unknown datatype {datatype!r}; expected one of {sorted(DATATYPES)}")
    if datatype == "BF16":
        if arr.dtype == np.uint16:
            payload = arr
        elif arr.dtype.kind == "f":
            payload = float32_to_bf16_bits(arr.astype(np.float32))
        else:
            raise CodecError(field, f"BF16 needs a float array or uint16 bit patterns, got {arr.dtype}")
    else:
        if arr.dtype != DATATYPES[datatype]:
            raise CodecError(field, f"datatype {datatype} needs dtype {DATATYPES[datatype]}, got {arr.dtype}")
        payload = arr
    _check_shape(arr.shape, f"{field}.shape")
    payload = np.ascontiguousarray(payload, dtype=DATATYPES[datatype])
    return tensor_pb2.Tensor(datatype=datatype, shape=list(arr.shape), raw=payload.tobytes(), name=name)


def tensor_to_numpy(msg: tensor_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Decode and validate a Tensor. BF16 comes back as uint16 bit patterns
    (see ``bf16_bits_to_float32``). The result is a writable array."""
    if not msg.datatype:
        raise CodecError(f"{field}.datatype", f"datatype is empty; expected one of {sorted(DATATYPES)}")
    dtype = DATATYPES.get(msg.datatype)
    if dtype is None:
        raise CodecError(f"{field}.datatype", f"unknown datatype {msg.datatype!r}; expected one of {sorted(DATATYPES)}")
    shape = tuple(int(d) for d in msg.shape)
    _check_shape(shape, f"{field}.shape")
    expected = math.prod(shape) * dtype.itemsize
    if len(msg.raw) != expected:
        raise CodecError(
            f"{field}.raw",
            f"has {len(msg.raw)} bytes, but shape {list(shape)} of {msg.datatype} needs {expected}",
        )
    if msg.datatype == "BOOL":
        as_bytes = np.frombuffer(msg.raw, dtype=np.uint8)
        if as_bytes.size and as_bytes.max() > 1:
            raise CodecError(f"{field}.raw", "BOOL elements must be bytes 0 or 1")
        return as_bytes.view(np.bool_).reshape(shape).copy()
    return np.frombuffer(msg.raw, dtype=dtype).reshape(shape).copy()


def _check_shape(shape: tuple[int, ...], field: str) -> None:
    if len(shape) > MAX_TENSOR_DIMS:
        raise CodecError(field, f"has {len(shape)} dimensions; at most {MAX_TENSOR_DIMS} are supported")
    for axis, dim in enumerate(shape):
        if dim <= 0:
            raise CodecError(field, f"dimension {axis} is {dim}; every dimension must be positive (shape {list(shape)})")


# --------------------------------------------------------------------------- images


def _encoding_value(encoding: Union[str, int]) -> "tensor_pb2.Image.Encoding":
    if isinstance(encoding, str):
        value = _ENCODING_NAMES.get(encoding.lower())
        if value is None:
            raise CodecError("image.encoding", f"unknown encoding {encoding!r}; expected png, jpeg or raw")
        return value
    return cast("tensor_pb2.Image.Encoding", int(encoding))


def image_from_pil(img: PILImage.Image, encoding: Union[str, int] = "png", quality: int = 95) -> tensor_pb2.Image:
    """Encode a PIL image (converted to RGB) as PNG, JPEG or raw RGB8."""
    rgb = img.convert("RGB")
    value = _encoding_value(encoding)
    if value == Encoding.RAW_RGB8:
        data = rgb.tobytes()
    elif value in (Encoding.PNG, Encoding.JPEG):
        buffer = io.BytesIO()
        if value == Encoding.PNG:
            rgb.save(buffer, format="PNG")
        else:
            rgb.save(buffer, format="JPEG", quality=quality)
        data = buffer.getvalue()
    else:
        raise CodecError("image.encoding", f"cannot encode with encoding {value}")
    return tensor_pb2.Image(encoding=value, data=data, width=rgb.width, height=rgb.height)


def image_from_array(arr: np.ndarray, encoding: Union[str, int] = "png") -> tensor_pb2.Image:
    """Encode an (H, W, 3) uint8 array (or (H, W) grayscale) as an Image."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise CodecError("image", f"array must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CodecError("image", f"array must have shape (H, W, 3), got {arr.shape}")
    return image_from_pil(PILImage.fromarray(np.ascontiguousarray(arr), mode="RGB"), encoding)


def _sniff(data: bytes) -> Optional[int]:
    if data.startswith(_PNG_MAGIC):
        return Encoding.PNG
    if data.startswith(_JPEG_MAGIC):
        return Encoding.JPEG
    return None


def _check_size(width: int, height: int, field: str, max_pixels: Optional[int], multiple_of: Optional[int]) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise CodecError(
            f"{field}.width",
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
    if multiple_of:
        for side, value in (("width", width), ("height", height)):
            if value % multiple_of:
                raise CodecError(f"{field}.{side}", f"{side} {value} is not a multiple of {multiple_of}")


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def _describe(error: Exception) -> str:
    """PIL's message without object reprs ("cannot identify image file <_io.BytesIO object
    at 0x7f...>"): heap addresses mean nothing to a caller and must not leave the server."""
    return _OBJECT_REPR.sub("", str(error)).strip() or type(error).__name__


def _open_lazily(data: bytes, data_field: str, size_field: str) -> PILImage.Image:
    """Open without decoding pixels: PIL reads only the header, so the size can be
    checked before a decompression bomb is expanded."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check replaces PIL's warning; its hard limit
            # (2x Image.MAX_IMAGE_PIXELS) still applies, already at open().
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            return PILImage.open(io.BytesIO(data))
    except PILImage.DecompressionBombError as exc:
        raise CodecError(size_field, f"image too large to decode: {_describe(exc)}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CodecError(data_field, f"cannot read image header: {_describe(exc)}") from None


def _decode_fully(img: PILImage.Image, data_field: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise CodecError(data_field, f"cannot decode image: {_describe(exc)}") from None


def image_to_pil(
    msg: tensor_pb2.Image,
    field: str = "image",
    max_pixels: Optional[int] = None,
    multiple_of: Optional[int] = None,
) -> PILImage.Image:
    """Decode and validate an Image into an RGB PIL image.

    Checks, in order: data present, encoding known (sniffed when unspecified),
    declared width/height against the real size, ``max_pixels`` (before decoding
    pixels), sides multiples of ``multiple_of``.
    """
    if not msg.data:
        raise CodecError(f"{field}.data", "image data is empty")
    if msg.width < 0 or msg.height < 0:
        side = "width" if msg.width < 0 else "height"
        raise CodecError(f"{field}.{side}", f"{side} must not be negative, got {getattr(msg, side)}")
    encoding: Optional[int] = msg.encoding
    if encoding == Encoding.ENCODING_UNSPECIFIED:
        encoding = _sniff(msg.data)
        if encoding is None:
            raise CodecError(f"{field}.encoding", "encoding unspecified and data is neither PNG nor JPEG")
    if encoding == Encoding.RAW_RGB8:
        return _raw_rgb8_to_pil(msg, field, max_pixels, multiple_of)
    if encoding not in (Encoding.PNG, Encoding.JPEG):
        raise CodecError(f"{field}.encoding", f"unknown encoding {encoding}")

    img = _open_lazily(msg.data, f"{field}.data", f"{field}.width")
    expected_format = "PNG" if encoding == Encoding.PNG else "JPEG"
    if img.format != expected_format:
        raise CodecError(f"{field}.encoding", f"declared {expected_format} but the data is {img.format}")
    width, height = img.size
    if msg.width and msg.width != width:
        raise CodecError(f"{field}.width", f"declared width {msg.width} but the image is {width} wide")
    if msg.height and msg.height != height:
        raise CodecError(f"{field}.height", f"declared height {msg.height} but the image is {height} high")
    _check_size(width, height, field, max_pixels, multiple_of)
    _decode_fully(img, f"{field}.data")
    return img.convert("RGB")


def _raw_rgb8_to_pil(msg: tensor_pb2.Image, field: str, max_pixels: Optional[int],
                     multiple_of: Optional[int]) -> PILImage.Image:
    for side in ("width", "height"):
        if getattr(msg, side) <= 0:
            raise CodecError(f"{field}.{side}", f"RAW_RGB8 needs a positive {side}, got {getattr(msg, side)}")
    _check_size(msg.width, msg.height, field, max_pixels, multiple_of)
    expected = msg.width * msg.height * 3
    if len(msg.data) != expected:
        raise CodecError(
            f"{field}.data",
            f"RAW_RGB8 {msg.width}x{msg.height} needs {expected} bytes, got {len(msg.data)}",
        )
    return PILImage.frombytes("RGB", (msg.width, msg.height), msg.data)


def image_to_array(msg: tensor_pb2.Image, field: str = "image", max_pixels: Optional[int] = None,
                   multiple_of: Optional[int] = None) -> np.ndarray:
    """Decode an Image to an (H, W, 3) uint8 array (same checks as ``image_to_pil``)."""
    return np.asarray(image_to_pil(msg, field, max_pixels, multiple_of), dtype=np.uint8).copy()


# --------------------------------------------------------------------------- masks


def mask_from_numpy(arr: np.ndarray, encoding: str = "tensor") -> tensor_pb2.Mask:
    """Encode an (H, W) bool/uint8 mask as a tensor (default) or a grayscale PNG."""
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise CodecError("mask", f"mask must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype not in (np.dtype(bool), np.dtype(np.uint8)):
        raise CodecError("mask", f"mask must be bool or uint8, got {arr.dtype}")
    if encoding == "tensor":
        return tensor_pb2.Mask(tensor=tensor_from_numpy(arr, name="mask"))
    if encoding == "png":
        pixels = (arr.astype(bool).astype(np.uint8) * 255) if arr.dtype == bool else arr
        buffer = io.BytesIO()
        PILImage.fromarray(np.ascontiguousarray(pixels), mode="L").save(buffer, format="PNG")
        return tensor_pb2.Mask(png=buffer.getvalue())
    raise CodecError("mask", f"unknown mask encoding {encoding!r}; expected 'tensor' or 'png'")


def mask_to_numpy(msg: tensor_pb2.Mask, field: str = "mask", max_pixels: Optional[int] = None) -> np.ndarray:
    """Decode a Mask into an (H, W) bool array; non-zero means inside."""
    which = msg.WhichOneof("value")
    if which is None:
        raise CodecError(field, "mask is empty: set tensor or png")
    if which == "tensor":
        tensor_field = f"{field}.tensor"
        if msg.tensor.datatype not in ("UINT8", "BOOL"):
            raise CodecError(
                f"{tensor_field}.datatype", f"a mask tensor must be UINT8 or BOOL, got {msg.tensor.datatype!r}"
            )
        values = tensor_to_numpy(msg.tensor, tensor_field)
        if values.ndim != 2:
            raise CodecError(f"{tensor_field}.shape", f"a mask tensor must be 2-D (H, W), got {list(values.shape)}")
        if max_pixels is not None and values.size > max_pixels:
            raise CodecError(f"{tensor_field}.shape", f"mask has {values.size} pixels; the limit is {max_pixels}")
        return values.astype(bool)
    png_field = f"{field}.png"
    if not msg.png.startswith(_PNG_MAGIC):
        raise CodecError(png_field, "mask data is not a PNG")
    img = _open_lazily(msg.png, png_field, png_field)
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise CodecError(png_field, f"mask is {img.width}x{img.height}; the limit is {max_pixels} pixels")
    _decode_fully(img, png_field)
    return np.asarray(img.convert("L")) > 0
