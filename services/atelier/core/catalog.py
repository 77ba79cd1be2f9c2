"""The ListModels RPC, one implementation for every service.

A servicer mixes in ``ListModelsRpc`` (before its generated base class) and sets
``model_registry`` and ``default_model_name``; the answer lists the service's own kind of
models only, with no folder paths or sources.
"""
from __future__ import annotations

from atelier.core.models import ModelRegistry
from atelier.v1 import common_pb2

__all__ = ["ListModelsRpc", "list_models"]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else ""


def list_models(registry: ModelRegistry, default_model: str) -> common_pb2.ListModelsResponse:
    response = common_pb2.ListModelsResponse()
    for name in registry.names():
        entry = registry.entries[name]
        dtype = None
        if entry.problem is None:
            _, dtype = registry.device_dtype(entry)
        response.models.add(
            name=name,
            kind=entry.detected_kind or "",
            loaded=registry.is_loaded(name),
            available=entry.problem is None,
            unavailable_reason=entry.problem or "",
            default_guidance_scale=entry.default_guidance_scale if entry.detected_kind == "stable-diffusion" else 0.0,
            dtype=_dtype_name(dtype),
            is_default=name == default_model,
        )
    return response


class ListModelsRpc:
    """Mixin for a servicer: ``ListModels`` over ``self.model_registry``."""

    model_registry: ModelRegistry
    default_model_name: str = ""

    def ListModels(self, request, context) -> common_pb2.ListModelsResponse:
        return list_models(self.model_registry, self.default_model_name)
