"""The segmentation App for the shared bootstrap: settings, model loading, encoder backend
(local or Triton), and health that follows the encoder backend."""
from __future__ import annotations

import argparse
import logging
import os
import threading
from dataclasses import dataclass
from typing import Optional

from atelier.core.config import ServerConfig
from atelier.core.errors import FailedPrecondition, quoted
from atelier.core.executor import ComputeExecutor
from atelier.core.metrics import Metrics, default_metrics
from atelier.core.models import SAM, ModelRegistry
from atelier.segmentation.metrics import segmentation_metrics
from atelier.segmentation.sam import SamPredictor
from atelier.segmentation.segmenter import BatchingOptions, Segmenter, local_encoder, triton_encoder
from atelier.segmentation.servicer import SERVICE_NAME, SegmentationServicer
from atelier.v1 import segmentation_pb2_grpc

__all__ = ["SegmentationSettings", "SegmentationApp", "add_arguments"]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentationSettings:
    default_model: str = "toy-sam"
    backend: str = "local"  # "local" | "triton": where the image encoder runs
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "sam_image_encoder"
    triton_timeout_seconds: float = 30.0
    health_interval_seconds: float = 2.0
    batching: BatchingOptions = BatchingOptions()

    @classmethod
    def from_extras(cls, extras: dict) -> "SegmentationSettings":
        known = {k: extras[k] for k in ("default_model", "backend", "triton_url", "triton_model",
                                        "triton_timeout_seconds", "health_interval_seconds") if k in extras}
        batching = BatchingOptions(
            max_batch_size=extras.get("max_batch_size", BatchingOptions.max_batch_size),
            max_wait_seconds=extras.get("max_wait_ms", BatchingOptions.max_wait_seconds * 1000) / 1000,
            max_queue=extras.get("encoder_queue", BatchingOptions.max_queue),
            adaptive_wait=not extras.get("fixed_wait", False),
            cache_bytes=extras.get("cache_bytes", BatchingOptions.cache_bytes),
        )
        return cls(batching=batching, **known)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Segmentation flags for ``ServerConfig.from_args`` (values land in config.extras)."""
    env = os.environ.get
    d = SegmentationSettings()
    parser.add_argument("--default-model", default=env("ATELIER_SEGMENTATION_MODEL", d.default_model),
                        help="SAM model for requests without one [ATELIER_SEGMENTATION_MODEL]")
    parser.add_argument("--backend", choices=("local", "triton"), default=env("ATELIER_SEGMENTATION_BACKEND", "local"),
                        help="where the image encoder runs [ATELIER_SEGMENTATION_BACKEND]")
    parser.add_argument("--triton-url", default=env("ATELIER_TRITON_URL", d.triton_url),
                        help="Triton gRPC host:port [ATELIER_TRITON_URL]")
    parser.add_argument("--triton-model", default=env("ATELIER_TRITON_MODEL", d.triton_model))
    parser.add_argument("--triton-timeout-seconds", type=float, default=d.triton_timeout_seconds,
                        help="bound on one Triton encoder call")
    parser.add_argument("--health-interval-seconds", type=float, default=d.health_interval_seconds)
    b = BatchingOptions()
    parser.add_argument("--max-batch-size", type=int, default=int(env("ATELIER_SEGMENTATION_MAX_BATCH", b.max_batch_size)),
                        help="images per encoder batch; 1 turns micro-batching off [ATELIER_SEGMENTATION_MAX_BATCH]")
    parser.add_argument("--max-wait-ms", type=float, default=b.max_wait_seconds * 1000,
                        help="how long the first image waits for company")
    parser.add_argument("--fixed-wait", action="store_true",
                        help="always wait --max-wait-ms for company (Triton's rule); default: only while "
                             "other calls are on their way to the encoder")
    parser.add_argument("--encoder-queue", type=int, default=b.max_queue, help="images that may wait for the encoder")
    parser.add_argument("--cache-bytes", type=int, default=int(env("ATELIER_SEGMENTATION_CACHE_BYTES", b.cache_bytes)),
                        help="embedding-cache budget in bytes; 0 disables [ATELIER_SEGMENTATION_CACHE_BYTES]")


class SegmentationApp:
    name = "segmentation"
    service_names = (SERVICE_NAME,)

    def __init__(self, config: ServerConfig, settings: Optional[SegmentationSettings] = None,
                 metrics: Optional[Metrics] = None, registry: Optional[ModelRegistry] = None):
        self.config = config
        self.settings = settings or SegmentationSettings.from_extras(config.extras)
        # The bootstrap polls backend_readiness() (Triton up/down) at this interval.
        config.health_interval_seconds = self.settings.health_interval_seconds
        self.metrics = metrics if metrics is not None else default_metrics()
        self.segmentation_metrics = segmentation_metrics(self.metrics.registry)
        # The registry loads SAM folders into Segmenters (model + its cache and batcher), off the
        # compute worker; an LRU unload closes the Segmenter.
        loaders = {SAM: self._load_segmenter}
        if registry is None:
            registry = ModelRegistry.for_service(config, kinds=(SAM,), metrics=self.metrics, loaders=loaders)
        else:
            registry.loaders.update(loaders)
        self.registry = registry
        self.executor = ComputeExecutor(config.max_queue, "segmentation", metrics=self.metrics)
        self._triton = None
        self._backend_ready = self.segmentation_metrics.backend_ready.labels(self.settings.backend)

    # ------------------------------------------------------------------ App protocol
    def add_to_server(self, server) -> None:
        servicer = SegmentationServicer(self.segmenter_for, self.executor, self.config.max_image_pixels,
                                        registry=self.registry, default_model=self.settings.default_model)
        segmentation_pb2_grpc.add_SegmentationServicer_to_server(servicer, server)

    def load(self) -> None:
        if self.settings.backend == "triton":
            from atelier.segmentation.triton_encoder import TritonImageEncoder

            self._triton = TritonImageEncoder(self.settings.triton_url, self.settings.triton_model,
                                              timeout_seconds=self.settings.triton_timeout_seconds)
        segmenter = self.registry.start(self.settings.default_model, strict=self.config.strict_models,
                                        preload=self.config.preload_models and self._triton is None)
        ready, reason = self.backend_readiness()
        self._backend_ready.set(1 if ready else 0)
        if ready:
            segmenter.warm_up()
        else:  # serve anyway: cached embeddings still work, health says NOT_SERVING until it is back
            _LOG.warning("segmentation: image-encoder backend not ready yet: %s", reason)

    def close(self) -> None:
        self.registry.close()  # closes every loaded Segmenter
        self.executor.shutdown()
        if self._triton is not None:
            self._triton.close()

    # ------------------------------------------------------------------ models
    def segmenter_for(self, name: str, remaining: Optional[float] = None) -> tuple[str, Segmenter]:
        """The Segmenter for a model name ("" = the default): NotFound if unknown, FAILED_PRECONDITION
        if not a servable SAM model, UNAVAILABLE while it loads (on the registry's loader thread)
        longer than the registry's wait or the caller's ``remaining`` seconds."""
        name = name or self.settings.default_model
        self.registry.check(name, kind=SAM)
        if self._triton is not None and name != self.settings.default_model:
            raise FailedPrecondition(f"model {quoted(name)}: this server runs the image encoder on Triton for "
                                     f"{self.settings.default_model!r} only")
        return name, self.registry.get(name, kind=SAM, remaining=remaining)

    def _load_segmenter(self, entry, device, dtype) -> Segmenter:
        predictor = SamPredictor.load(entry.folder, name=entry.name, device=str(device), dtype=str(dtype).replace("torch.", ""),
                                      variant=entry.variant, with_encoder=self._triton is None)
        backend = self.settings.backend
        encode = triton_encoder(self._triton) if self._triton is not None else local_encoder(predictor)
        return Segmenter(
            predictor, encode, self.settings.batching, decode_executor=self.executor,
            cache_stats=self.segmentation_metrics.cache_stats(backend, entry.name),
            batch_stats=self.segmentation_metrics.batch_stats(backend, entry.name),
            name=f"{backend} image encoder ({entry.name})")

    # ------------------------------------------------------------------ health
    def backend_readiness(self) -> tuple[bool, str]:
        """Whether the image-encoder backend answers; the bootstrap's health follows it
        (``atelier.core.server`` polls it every ``config.health_interval_seconds``)."""
        if self._triton is None:
            ready, reason = True, "local image encoder"
        else:
            ready, reason = self._triton.readiness()
        self._backend_ready.set(1 if ready else 0)
        return ready, reason
