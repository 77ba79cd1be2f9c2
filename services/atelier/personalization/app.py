"""The personalization App for the shared bootstrap: settings, store, worker, servicer."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Mapping, Optional

from atelier.core.config import ServerConfig
from atelier.core.executor import ComputeExecutor
from atelier.core.metrics import Metrics, default_metrics
from atelier.core.models import SD, ModelRegistry
from atelier.personalization.artifacts import ArtifactStore
from atelier.personalization.masks import SegmentationMasks
from atelier.personalization.methods import TrainingMethod
from atelier.personalization.metrics import JobMetrics
from atelier.personalization.servicer import SERVICE_NAME, PersonalizationServicer
from atelier.personalization.store import JobStore
from atelier.personalization.worker import JobWorker, WorkerSettings
from atelier.v1 import personalization_pb2_grpc

__all__ = ["PersonalizationApp", "add_arguments", "default_methods"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Personalization flags for ``ServerConfig.from_args`` (values land in config.extras)."""
    env = os.environ.get
    parser.add_argument("--default-model", default=env("ATELIER_PERSONALIZATION_MODEL", "toy"),
                        help="base model for requests without one [ATELIER_PERSONALIZATION_MODEL]")
    parser.add_argument("--data-dir", default=env("ATELIER_DATA_DIR", "personalization-data"),
                        help="folder of the SQLite database and the artifacts [ATELIER_DATA_DIR]")
    parser.add_argument("--database", default=env("ATELIER_DATABASE", ""),
                        help="SQLAlchemy URL, e.g. postgresql://user@host/db (several replicas share one); "
                             "default: SQLite in --data-dir [ATELIER_DATABASE]")
    parser.add_argument("--artifact-dir", default=env("ATELIER_ARTIFACT_DIR", ""),
                        help="concepts and checkpoints; a volume every replica mounts (ReadWriteMany); "
                             "default: --data-dir/artifacts [ATELIER_ARTIFACT_DIR]")
    parser.add_argument("--segmentation-address", default=env("ATELIER_SEGMENTATION_ADDRESS", ""),
                        help="segmentation service for jobs sent without masks [ATELIER_SEGMENTATION_ADDRESS]")
    parser.add_argument("--lease-seconds", type=float, default=float(env("ATELIER_LEASE_SECONDS", "30")),
                        help="a job whose worker has not renewed its lease this long is resumed elsewhere "
                             "[ATELIER_LEASE_SECONDS]")
    parser.add_argument("--checkpoint-every", type=int, default=int(env("ATELIER_CHECKPOINT_EVERY", "50")),
                        help="optimisation steps between checkpoints [ATELIER_CHECKPOINT_EVERY]")
    parser.add_argument("--max-pending-jobs", type=int, default=int(env("ATELIER_MAX_PENDING_JOBS", "64")),
                        help="PENDING jobs in the deployment beyond which CreateJob answers RESOURCE_EXHAUSTED "
                             "[ATELIER_MAX_PENDING_JOBS]")
    parser.add_argument("--job-retention-hours", type=float,
                        default=float(env("ATELIER_JOB_RETENTION_HOURS", str(7 * 24))),
                        help="finished jobs (records, events, checkpoints) are deleted after this; 0 keeps "
                             "them; concepts stay until DeleteConcept [ATELIER_JOB_RETENTION_HOURS]")
    parser.add_argument("--job-max-attempts", type=int, default=int(env("ATELIER_JOB_MAX_ATTEMPTS", "5")),
                        help="a job claimed this often (each time its replica died) is failed "
                             "[ATELIER_JOB_MAX_ATTEMPTS]")
    parser.add_argument("--job-poll-seconds", type=float, default=float(env("ATELIER_JOB_POLL_SECONDS", "1")),
                        help="how often an idle worker looks for claimable jobs [ATELIER_JOB_POLL_SECONDS]")
    parser.add_argument("--replica-id", default=env("ATELIER_REPLICA_ID", ""),
                        help="this replica's name in leases and events; default host-pid-random "
                             "[ATELIER_REPLICA_ID]")


def default_methods() -> dict[str, TrainingMethod]:
    """The training methods this build offers, by CreateJobRequest ``method`` field."""
    from atelier.personalization.eqdiff_method import EqDiffMethod
    from atelier.personalization.layerdiffusion.job import LayerEditMethod

    return {"eqdiff": EqDiffMethod(), "layer_edit": LayerEditMethod()}


class PersonalizationApp:
    name = "personalization"
    service_names = (SERVICE_NAME,)

    def __init__(self, config: ServerConfig, metrics: Optional[Metrics] = None,
                 registry: Optional[ModelRegistry] = None, methods: Optional[Mapping[str, TrainingMethod]] = None):
        extras = config.extras
        self.config = config
        self.default_model = extras.get("default_model", "toy")
        self.metrics = metrics if metrics is not None else default_metrics()
        self.metrics.enable_unet_metrics()
        if registry is None:
            registry = ModelRegistry.for_service(config, kinds=(SD,), metrics=self.metrics)
        self.registry = registry
        self.methods = dict(default_methods() if methods is None else methods)
        data_dir = Path(extras.get("data_dir") or "personalization-data").expanduser()
        data_dir.mkdir(parents=True, exist_ok=True)
        database = extras.get("database") or f"sqlite:///{(data_dir / 'jobs.db').resolve()}"
        self.store = JobStore(database)
        self.artifacts = ArtifactStore(extras.get("artifact_dir") or data_dir / "artifacts")
        self.executor = ComputeExecutor(config.max_queue, "personalization", metrics=self.metrics)
        self.job_metrics = JobMetrics(self.metrics.registry, self.store.count_by_state)
        self.settings = WorkerSettings(
            lease_seconds=extras.get("lease_seconds", 30.0), checkpoint_every=extras.get("checkpoint_every", 50),
            poll_seconds=extras.get("job_poll_seconds", 1.0),
            retention_seconds=extras.get("job_retention_hours", 7 * 24) * 3600,
            max_pending=extras.get("max_pending_jobs", 64), owner=extras.get("replica_id") or None,
            max_attempts=extras.get("job_max_attempts", 5))
        self.segmentation = SegmentationMasks(extras.get("segmentation_address") or None, config.auth.peer)
        for method in self.methods.values():
            bind = getattr(method, "bind", None)
            if bind is not None:
                bind(self.segmentation, config.max_image_pixels)
        self.worker = JobWorker(self.store, self.artifacts, self.registry, self.executor, self.methods,
                                self.job_metrics, self.settings, config.max_image_pixels)

    def add_to_server(self, server) -> None:
        self.servicer = servicer = PersonalizationServicer(
            self.store, self.artifacts, self.registry, self.executor, self.methods, self.worker, self.segmentation,
            self.default_model, self.config.max_image_pixels, self.settings.max_pending)
        personalization_pb2_grpc.add_PersonalizationServicer_to_server(servicer, server)

    def attach(self, running) -> None:
        """Let open WatchJob streams end (UNAVAILABLE, resumable) as soon as the server drains.
        ``running``: the RunningServer from ``atelier.core.server.start``."""
        self.servicer.draining = lambda: running.readiness.state == "draining"

    def load(self) -> None:
        # Validates every entry; health stays NOT_SERVING until the default model is loaded; the
        # worker starts then (the others load on the registry's loader thread or on first use).
        self.registry.start(self.default_model, strict=self.config.strict_models, preload=self.config.preload_models)
        self.worker.start()

    def close(self) -> None:
        self.worker.stop()
        self.executor.shutdown()
        self.segmentation.close()
        self.store.close()
        self.registry.close()
