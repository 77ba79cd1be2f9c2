"""Device and dtype selection for model loading.

CUDA with fp16 when a GPU is present, else CPU with fp32. ``ATELIER_DEVICE`` (e.g. ``cpu``,
``cuda``, ``cuda:1``) overrides the device; ``ATELIER_DTYPE`` (``fp32``/``fp16``/``bf16``)
overrides the dtype.
"""

from __future__ import annotations

import os

import torch

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def pick_device(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """Return ``(device, dtype)``: explicit arguments, then ATELIER_DEVICE/ATELIER_DTYPE, then auto."""
    name = device or os.environ.get("ATELIER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(name)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    dtype_name = dtype or os.environ.get("ATELIER_DTYPE")
    if dtype_name:
        chosen_dtype = parse_dtype(dtype_name)
    else:
        # fp16 halves memory and doubles throughput on GPUs; CPU kernels want fp32.
        chosen_dtype = torch.float16 if chosen.type == "cuda" else torch.float32
    return chosen, chosen_dtype


def parse_dtype(name: str) -> torch.dtype:
    """"fp16"/"float16"/"bf16"/... -> torch dtype; ValueError naming the choices."""
    try:
        return _DTYPES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown dtype {str(name)[:20]!r}; choose one of {sorted(_DTYPES)}") from None


def device_memory_bytes(device: torch.device) -> int:
    """Bytes currently allocated by torch on ``device`` (0 on CPU, where torch does not track it)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return 0
