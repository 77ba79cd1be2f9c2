"""Segmentation metrics: embedding cache, encoder batching (Triton-style counts), backend readiness.

``atelier_segmentation_encoder_executions_total`` and ``..._encoder_images_total`` are
Triton's nv_inference_exec_count / nv_inference_count; their ratio is the mean batch size,
``atelier_segmentation_encoder_batch_size`` its distribution. Cache and encoder metrics carry
the SAM model's name (each model has its own cache and batcher).
"""
from __future__ import annotations

import threading
import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from atelier.segmentation.batching import BatchStats
from atelier.segmentation.cache import CacheStats

__all__ = ["SegmentationMetrics", "segmentation_metrics"]


class SegmentationMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.cache_hits = Counter("atelier_segmentation_cache_hits", "Image-embedding cache hits", ["backend", "model"],
                                  registry=r)
        self.cache_misses = Counter("atelier_segmentation_cache_misses", "Image-embedding cache misses",
                                    ["backend", "model"], registry=r)
        self.cache_evictions = Counter("atelier_segmentation_cache_evictions",
                                       "Embeddings evicted to stay within the byte budget", ["backend", "model"], registry=r)
        self.cache_bytes = Gauge("atelier_segmentation_cache_bytes", "Bytes of embeddings held in the cache",
                                 ["backend", "model"], registry=r)
        self.cache_entries = Gauge("atelier_segmentation_cache_entries", "Embeddings held in the cache",
                                   ["backend", "model"], registry=r)
        self.encoder_executions = Counter(
            "atelier_segmentation_encoder_executions",
            "Image-encoder batch executions (Triton's exec_count)", ["backend", "model"], registry=r)
        self.encoder_images = Counter(
            "atelier_segmentation_encoder_images",
            "Images run through the image encoder (Triton's inference_count)", ["backend", "model"], registry=r)
        self.encoder_batch_size = Histogram(
            "atelier_segmentation_encoder_batch_size", "Images per image-encoder execution", ["backend", "model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.encoder_seconds = Histogram(
            "atelier_segmentation_encoder_seconds", "Wall time of one image-encoder execution", ["backend", "model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.encoder_queue_depth = Gauge("atelier_segmentation_encoder_queue_depth",
                                         "Images waiting for the image encoder", ["backend", "model"], registry=r)
        self.backend_ready = Gauge("atelier_segmentation_encoder_backend_ready",
                                   "1 when the image-encoder backend (local model or Triton) can serve", ["backend"],
                                   registry=r)

    def cache_stats(self, backend: str, model: str) -> CacheStats:
        return _CacheObserver(self, backend, model)

    def batch_stats(self, backend: str, model: str) -> BatchStats:
        return _BatchObserver(self, backend, model)


class _CacheObserver(CacheStats):
    def __init__(self, metrics: SegmentationMetrics, backend: str, model: str):
        self._hits = metrics.cache_hits.labels(backend, model)
        self._misses = metrics.cache_misses.labels(backend, model)
        self._evictions = metrics.cache_evictions.labels(backend, model)
        self._bytes = metrics.cache_bytes.labels(backend, model)
        self._entries = metrics.cache_entries.labels(backend, model)

    def hit(self) -> None:
        self._hits.inc()

    def miss(self) -> None:
        self._misses.inc()

    def evicted(self, count: int) -> None:
        self._evictions.inc(count)

    def size(self, entries: int, nbytes: int) -> None:
        self._entries.set(entries)
        self._bytes.set(nbytes)


class _BatchObserver(BatchStats):
    def __init__(self, metrics: SegmentationMetrics, backend: str, model: str):
        self._executions = metrics.encoder_executions.labels(backend, model)
        self._images = metrics.encoder_images.labels(backend, model)
        self._batch_size = metrics.encoder_batch_size.labels(backend, model)
        self._seconds = metrics.encoder_seconds.labels(backend, model)
        self._depth = metrics.encoder_queue_depth.labels(backend, model)

    def executed(self, batch_size: int, seconds: float) -> None:
        self._executions.inc()
        self._images.inc(batch_size)
        self._batch_size.observe(batch_size)
        self._seconds.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)


_by_registry: "weakref.WeakKeyDictionary[CollectorRegistry, SegmentationMetrics]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def segmentation_metrics(registry: CollectorRegistry) -> SegmentationMetrics:
    """The SegmentationMetrics registered in ``registry`` (created once per registry)."""
    with _lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = _by_registry[registry] = SegmentationMetrics(registry)
        return metrics
