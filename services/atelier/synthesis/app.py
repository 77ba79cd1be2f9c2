"""The synthesis App for the shared bootstrap: settings, model loading, servicer."""
from __future__ import annotations

import argparse
import os
from typing import Optional

from atelier.core.config import ServerConfig
from atelier.core.executor import ComputeExecutor
from atelier.core.metrics import Metrics, default_metrics
from atelier.core.models import SD, ModelRegistry
from atelier.synthesis.servicer import SERVICE_NAME, Limits, SynthesisServicer
from atelier.v1 import synthesis_pb2_grpc

__all__ = ["SynthesisApp", "add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Synthesis flags for ``ServerConfig.from_args`` (values land in config.extras)."""
    env = os.environ.get
    parser.add_argument("--default-model", default=env("ATELIER_SYNTHESIS_MODEL", "toy"),
                        help="Stable Diffusion model for requests without one [ATELIER_SYNTHESIS_MODEL]")
    parser.add_argument("--max-steps", type=int, default=int(env("ATELIER_MAX_STEPS", Limits.max_steps)),
                        help="most DDIM steps one call may ask for [ATELIER_MAX_STEPS]")
    parser.add_argument("--inversion-address", default=env("ATELIER_INVERSION_ADDRESS", "127.0.0.1:50051"),
                        help="the inversion service, for Variations [ATELIER_INVERSION_ADDRESS]")


class SynthesisApp:
    name = "synthesis"
    service_names = (SERVICE_NAME,)

    def __init__(self, config: ServerConfig, metrics: Optional[Metrics] = None,
                 registry: Optional[ModelRegistry] = None):
        self.config = config
        self.default_model = config.extras.get("default_model", "toy")
        self.inversion_address = config.extras.get("inversion_address", "127.0.0.1:50051")
        self.metrics = metrics if metrics is not None else default_metrics()
        self.metrics.enable_unet_metrics()
        if registry is None:
            registry = ModelRegistry.for_service(config, kinds=(SD,), metrics=self.metrics)
        self.registry = registry
        self.executor = ComputeExecutor(config.max_queue, "synthesis", metrics=self.metrics)
        self.limits = Limits(max_pixels=config.max_image_pixels,
                             max_steps=config.extras.get("max_steps", Limits.max_steps))
        self.variations = None

    def add_to_server(self, server) -> None:
        from atelier.synthesis.variations_rpc import VariationsHandler

        servicer = SynthesisServicer(self.registry, self.executor, self.default_model, self.limits)
        self.variations = VariationsHandler(servicer, self.registry, self.executor, self.limits,
                                            self.inversion_address, self.metrics, self.config.auth.peer)
        servicer._variations = self.variations
        synthesis_pb2_grpc.add_SynthesisServicer_to_server(servicer, server)

    def load(self) -> None:
        # Validates every entry; health stays NOT_SERVING until the default model is loaded; the
        # others load on the registry's loader thread (--preload-models) or on first use.
        self.registry.start(self.default_model, strict=self.config.strict_models, preload=self.config.preload_models)

    def close(self) -> None:
        if self.variations is not None:
            self.variations.close()
        self.executor.shutdown()
        self.registry.close()
