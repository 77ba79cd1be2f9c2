"""The inversion App for the shared bootstrap: settings, model loading, servicer."""
from __future__ import annotations

import argparse
import os
from typing import Optional

from atelier.core.config import ServerConfig
from atelier.core.executor import ComputeExecutor
from atelier.core.metrics import Metrics, default_metrics
from atelier.core.models import SD, ModelRegistry
from atelier.inversion.concept_source import DEFAULT_CACHE_BYTES, ConceptSource
from atelier.inversion.servicer import SERVICE_NAME, InversionServicer, Limits
from atelier.v1 import inversion_pb2_grpc

__all__ = ["InversionApp", "add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Inversion flags for ``ServerConfig.from_args`` (values land in config.extras)."""
    env = os.environ.get
    parser.add_argument("--default-model", default=env("ATELIER_INVERSION_MODEL", "toy"),
                        help="Stable Diffusion model for requests without one [ATELIER_INVERSION_MODEL]")
    parser.add_argument("--personalization-address", default=env("ATELIER_PERSONALIZATION_ADDRESS", ""),
                        help="the personalization service, for edits with a concept "
                             "[ATELIER_PERSONALIZATION_ADDRESS]")
    parser.add_argument("--concept-cache-bytes", type=int,
                        default=int(env("ATELIER_CONCEPT_CACHE_BYTES", DEFAULT_CACHE_BYTES)),
                        help="most bytes of fetched concepts kept in memory [ATELIER_CONCEPT_CACHE_BYTES]")
    parser.add_argument("--max-steps", type=int, default=int(env("ATELIER_MAX_STEPS", Limits.max_steps)),
                        help="most DDIM steps one call may ask for [ATELIER_MAX_STEPS]")


class InversionApp:
    name = "inversion"
    service_names = (SERVICE_NAME,)

    def __init__(self, config: ServerConfig, metrics: Optional[Metrics] = None,
                 registry: Optional[ModelRegistry] = None):
        self.config = config
        self.default_model = config.extras.get("default_model", "toy")
        self.metrics = metrics if metrics is not None else default_metrics()
        self.metrics.enable_unet_metrics()
        if registry is None:
            registry = ModelRegistry.for_service(config, kinds=(SD,), metrics=self.metrics)
        self.registry = registry
        self.executor = ComputeExecutor(config.max_queue, "inversion", metrics=self.metrics)
        self.limits = Limits(max_pixels=config.max_image_pixels,
                             max_steps=config.extras.get("max_steps", Limits.max_steps))
        self.concepts = ConceptSource(config.extras.get("personalization_address") or None, config.auth.peer,
                                      cache_bytes=config.extras.get("concept_cache_bytes", DEFAULT_CACHE_BYTES))

    def add_to_server(self, server) -> None:
        servicer = InversionServicer(self.registry, self.executor, self.default_model, self.limits, self.concepts)
        inversion_pb2_grpc.add_InversionServicer_to_server(servicer, server)

    def load(self) -> None:
        # Validates every entry; health stays NOT_SERVING until the default model is loaded; the
        # others load on the registry's loader thread (--preload-models) or on first use.
        self.registry.start(self.default_model, strict=self.config.strict_models, preload=self.config.preload_models)

    def close(self) -> None:
        self.executor.shutdown()
        self.concepts.close()
        self.registry.close()
