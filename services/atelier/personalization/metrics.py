"""Job-system metrics, registered beside the core's in the service's registry.

``atelier_jobs{state}`` is read from the database at scrape time: it is the deployment's
count (every replica reports the same numbers; dashboards take max, not sum).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

__all__ = ["JobMetrics"]

_LOG = logging.getLogger(__name__)


class _JobStateCollector:
    def __init__(self, count_by_state: Callable[[], dict[str, int]]):
        self._count = count_by_state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("atelier_jobs", "Personalization jobs in the database by state", labels=["state"])
        try:
            counts = self._count()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database blinked
            _LOG.warning("atelier_jobs: could not count jobs", exc_info=True)
            counts = {}
        for state, value in sorted(counts.items()):
            family.add_metric([state], float(value))
        yield family


class JobMetrics:
    def __init__(self, registry: CollectorRegistry, count_by_state: Callable[[], dict[str, int]]):
        self.duration = Histogram(
            "atelier_job_duration_seconds", "Wall time of finished jobs, first start to end", ["state"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400), registry=registry)
        for state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            self.duration.labels(state=state)  # exported (count 0) before the first job ends
        self.steps_per_second = Gauge(
            "atelier_training_steps_per_second", "Optimisation steps per second of the running job", ["method"],
            registry=registry)
        self.checkpoint_write_seconds = Histogram(
            "atelier_checkpoint_write_seconds", "Time to serialise and durably write one checkpoint",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=registry)
        self.lease_takeovers = Counter(
            "atelier_lease_takeovers", "Jobs this replica claimed after another replica's lease expired",
            registry=registry)
        registry.register(_JobStateCollector(count_by_state))
