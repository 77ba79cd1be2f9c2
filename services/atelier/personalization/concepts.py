"""Concept files: one safetensors file, the learned tensors plus string metadata in its header.

Metadata keys every concept has: ``base_model``, ``method``, ``placeholder_token``,
``class_word``, ``params`` (the training parameters as JSON), ``job_id`` (empty when made
elsewhere), ``format`` (``atelier-concept/1``). The method's own metadata is kept beside them.
"""
from __future__ import annotations

import json
import struct


from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from atelier.core.errors import InvalidArgument
from atelier.personalization.training import Concept

__all__ = ["serialize", "deserialize", "read_metadata", "metadata_json", "REQUIRED_KEYS", "FORMAT"]

FORMAT = "atelier-concept/1"
REQUIRED_KEYS = ("base_model", "method", "placeholder_token")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def serialize(concept: Concept, *, base_model: str, method: str, placeholder_token: str, class_word: str,
              params_json: str, job_id: str) -> tuple[bytes, dict[str, str]]:
    metadata = {str(k): str(v) for k, v in concept.metadata.items()}
    metadata.update(format=FORMAT, base_model=base_model, method=method, placeholder_token=placeholder_token,
                    class_word=class_word, params=params_json, job_id=job_id)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in concept.tensors.items()}
    return save_tensors(tensors, metadata=metadata), metadata


def read_metadata(data: bytes, field: str = "safetensors") -> dict[str, str]:
    """The header metadata of a safetensors file (format: 8-byte little-endian header length,
    then a JSON header whose ``__metadata__`` holds str -> str); InvalidArgument if malformed."""
    if len(data) < 8:
        raise InvalidArgument(field, "not a safetensors file (shorter than its header length)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise InvalidArgument(field, "not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8:8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidArgument(field, "not a safetensors file (header is not JSON)") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidArgument(field, "safetensors metadata must map strings to strings")
    return metadata


def deserialize(data: bytes, field: str = "safetensors") -> Concept:
    metadata = read_metadata(data, field)
    try:
        tensors = load_tensors(data)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise InvalidArgument(field, f"not a loadable safetensors file: {error}") from None
    return Concept(tensors=tensors, metadata=metadata)


def metadata_json(metadata: dict[str, str]) -> str:
    return json.dumps(metadata, sort_keys=True)


