"""The services the fuzz test runs: ONE list, ``TARGETS``.

A new service joins by adding one ``FuzzTarget`` here: its name, its App class (anything
with the ``atelier.core.server.App`` shape whose class attribute ``service_names`` lists its
proto services) and how to build it from a ServerConfig and Metrics. Every RPC of every
listed service is then fuzzed with the shared per-message strategies of fuzz_strategies.py,
and sent garbled bytes; nothing else needs writing.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from google.protobuf import descriptor_pool

from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics


@dataclass(frozen=True)
class FuzzTarget:
    name: str
    app_class: type
    build: Callable[[ServerConfig, Metrics], Any]
    config: dict = field(default_factory=dict)  # ServerConfig overrides (limits kept small)

    def methods(self):
        """(service descriptor, method descriptor) for every RPC of the app's services."""
        pool = descriptor_pool.Default()
        for service_name in self.app_class.service_names:
            service = pool.FindServiceByName(service_name)
            for method in service.methods:
                yield service, method


def _inversion() -> FuzzTarget:
    from atelier.inversion.app import InversionApp

    return FuzzTarget("inversion", InversionApp, lambda config, metrics: InversionApp(config, metrics=metrics))


def _segmentation() -> FuzzTarget:
    from atelier.segmentation.app import SegmentationApp

    return FuzzTarget("segmentation", SegmentationApp, lambda config, metrics: SegmentationApp(config, metrics=metrics))


def _synthesis() -> FuzzTarget:
    from atelier.synthesis.app import SynthesisApp

    return FuzzTarget("synthesis", SynthesisApp, lambda config, metrics: SynthesisApp(config, metrics=metrics))


def _personalization() -> FuzzTarget:
    from atelier.personalization.app import PersonalizationApp

    def build(config: ServerConfig, metrics: Metrics) -> Any:
        # Its own job store and artifacts (SQLite under a temporary folder, removed with the app);
        # no segmentation service, so requests without masks are refused at CreateJob.
        data_dir = tempfile.mkdtemp(prefix="atelier-fuzz-personalization-")
        config = dataclasses.replace(config, extras={**config.extras, "data_dir": data_dir,
                                                     "job_poll_seconds": 0.2})
        app = PersonalizationApp(config, metrics=metrics)
        weakref.finalize(app, shutil.rmtree, data_dir, True)
        return app

    return FuzzTarget("personalization", PersonalizationApp, build)


TARGETS: list[FuzzTarget] = [_inversion(), _segmentation(), _synthesis(), _personalization()]
