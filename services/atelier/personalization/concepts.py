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

from atelier.core.errors import FailedPrecondition, InvalidArgument
from atelier.personalization.training import Concept

__all__ = ["serialize", "deserialize", "read_metadata", "metadata_json", "check_header", "check_base_model",
           "REQUIRED_KEYS", "FORMAT"]

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




def check_header(concept: Concept, method: str, params_type):
    """(params, height, width) of a concept trained with ``method``, its ``params`` metadata read
    with ``params_type.from_json(...).validate()``: FailedPrecondition naming what is wrong (an
    imported file may hold anything). Each method then checks its own tensors."""
    metadata = concept.metadata
    if metadata.get("method") != method:
        raise FailedPrecondition(f"concept was trained with method {metadata.get('method')!r}, not {method}")
    try:
        params = params_type.from_json(metadata["params"]).validate()
        height, width = int(metadata["height"]), int(metadata["width"])
    except (KeyError, ValueError, TypeError, AttributeError, InvalidArgument) as error:
        raise FailedPrecondition(f"the concept's metadata is malformed: {type(error).__name__}: {error}") from None
    if not (0 < height <= 8192 and 0 < width <= 8192):
        raise FailedPrecondition(f"the concept's size {height}x{width} is out of range")
    return params, height, width


def check_base_model(concept: Concept, model) -> None:
    """FailedPrecondition unless ``concept`` was trained on ``model``."""
    if concept.metadata.get("base_model") != model.name:
        raise FailedPrecondition(f"concept was trained on base model {concept.metadata.get('base_model')!r}, "
                                 f"not {model.name!r}")
