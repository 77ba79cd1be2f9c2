"""Which service exports each metric the rules and dashboard read.

tests/deploy/test_launcher.py scrapes every service it can start and checks its part of this
table against the real /metrics; a service whose module is not installed yet
(``atelier.synthesis``, ``atelier.personalization`` while they are being built) has its
rows checked only once it exists - the test says which rows it could not check."""
from __future__ import annotations

ALL = ("inversion", "segmentation", "personalization", "synthesis")

EXPORTED_BY: dict[str, tuple[str, ...]] = {
    # atelier.core.metrics: every service.
    "grpc_server_handled_total": ALL,
    "grpc_server_handling_seconds_bucket": ALL,
    "atelier_queue_depth": ALL,
    "atelier_in_flight": ALL,
    # Only where a UNet runs (Metrics.enable_unet_metrics): never segmentation.
    "atelier_unet_evaluations_total": ("inversion", "personalization", "synthesis"),
    "atelier_model_load_seconds": ALL,
    "atelier_device_memory_bytes": ALL,
    # Services that call others report whether they can reach them (core metric, synthesis first).
    "atelier_dependency_up": ("synthesis",),
    # atelier.segmentation.metrics
    "atelier_segmentation_cache_hits_total": ("segmentation",),
    "atelier_segmentation_cache_misses_total": ("segmentation",),
    "atelier_segmentation_encoder_backend_ready": ("segmentation",),
    # atelier.personalization.metrics (the job system)
    "atelier_jobs": ("personalization",),
    "atelier_job_duration_seconds_count": ("personalization",),
}
