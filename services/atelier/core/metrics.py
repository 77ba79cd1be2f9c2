"""Prometheus metrics: go-grpc-prometheus names for the RPC layer, atelier_* for the work.

One ``Metrics`` object owns one ``CollectorRegistry``. The process default
(``default_metrics()``) registers in prometheus_client's global registry, so the
process_* collectors come along; a service runs one server per process, which
makes process-wide counters the right scope. Tests that need isolation build
their own ``Metrics(CollectorRegistry())`` and pass it to ``start``/the executor.
"""
from __future__ import annotations

import sys
import threading
from typing import Iterator, Optional

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

__all__ = ["Metrics", "default_metrics", "grpc_code_name", "DeviceMemoryCollector"]

_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# go-grpc-prometheus reports codes with Go's codes.Code.String() spelling.
_GO_CODE_NAMES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}


def grpc_code_name(code) -> str:
    """grpc.StatusCode -> go-grpc-prometheus label value ("OK", "Canceled", ...)."""
    return _GO_CODE_NAMES.get(code.name, code.name)


class DeviceMemoryCollector:
    """atelier_device_memory_bytes{device,kind=allocated|reserved} from torch.cuda.

    Exported only when CUDA is in use: on CPU there is no device memory separate
    from process memory (process_resident_memory_bytes covers it), and a fake 0
    would mislead dashboards. Reads torch only if something already imported it,
    so scraping never pays torch's import time.
    """

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "atelier_device_memory_bytes",
            "Accelerator memory held by this process's torch caching allocator",
            labels=["device", "kind"],
        )
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                device = f"cuda:{index}"
                family.add_metric([device, "allocated"], float(torch.cuda.memory_allocated(index)))
                family.add_metric([device, "reserved"], float(torch.cuda.memory_reserved(index)))
        yield family


class Metrics:
    """All Atelier collectors, registered in ``registry``."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._model_kinds: dict[str, str] = {}
        r = self.registry
        self.started = Counter(
            "grpc_server_started", "Total number of RPCs started on the server.", _RPC_LABELS, registry=r
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            _RPC_LABELS + ("grpc_code",),
            registry=r,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            _RPC_LABELS,
            # Diffusion calls run from milliseconds (health) to minutes (SPDInv at 50 steps).
            buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received", "Total number of RPC stream messages received on the server.", _RPC_LABELS,
            registry=r,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.", _RPC_LABELS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "atelier_queue_depth", "Calls waiting for the compute executor", ["service"], registry=r
        )
        self.in_flight = Gauge(
            "atelier_in_flight", "Calls running on the compute executor", ["service"], registry=r
        )
        self.inflight_bytes = Gauge(
            "atelier_inflight_bytes", "Request + estimated response bytes of the calls admitted now",
            ["service"], registry=r
        )
        # Created on first use (``enable_unet_metrics``): only services that run a UNet export it.
        self._unet_evaluations: Optional[Counter] = None
        self._unet_lock = threading.Lock()
        self._decoder_evaluations: Optional[Counter] = None
        self.dependency_up = Gauge(
            "atelier_dependency_up", "1 when a service this one calls answers its health check SERVING, else 0",
            ["dependency", "address"], registry=r,
        )
        self.model_load_seconds = Gauge(
            "atelier_model_load_seconds", "Wall time of the latest load of each model", ["model"], registry=r
        )
        self.model_loaded = Gauge(
            "atelier_model_loaded", "1 while the model is loaded (0 after an LRU unload)", ["model", "kind"],
            registry=r
        )
        self.model_bytes = Gauge(
            "atelier_model_bytes", "Parameter and buffer bytes of each loaded model", ["model"], registry=r
        )
        r.register(DeviceMemoryCollector())

    @property
    def unet_evaluations(self) -> Counter:
        with self._unet_lock:
            if self._unet_evaluations is None:
                self._unet_evaluations = Counter(
                    "atelier_unet_evaluations",
                    "UNet evaluations (a CFG batch counts once); kind=backward counts forward+backward passes",
                    ["kind"],
                    registry=self.registry,
                )
            return self._unet_evaluations

    @property
    def decoder_evaluations(self) -> Counter:
        """VAE-decoder forward+backward passes (GradOP+); created on first use like the UNet's."""
        with self._unet_lock:
            if self._decoder_evaluations is None:
                self._decoder_evaluations = Counter(
                    "atelier_vae_decoder_backward_evaluations",
                    "VAE-decoder forward+backward passes (gradients through the decoder, e.g. GradOP+)",
                    registry=self.registry,
                )
            return self._decoder_evaluations

    def enable_unet_metrics(self) -> None:
        """Export the UNet counters (at 0) from the start; services that run a UNet call this."""
        for kind in ("forward", "backward"):
            self.unet_evaluations.labels(kind=kind)

    def observe_model_load(self, model: str, seconds: float, kind: str = "", nbytes: Optional[int] = None) -> None:
        self.model_load_seconds.labels(model=model).set(seconds)
        if kind:
            self._model_kinds[model] = kind
            self.model_loaded.labels(model=model, kind=kind).set(1)
        if nbytes is not None:
            self.model_bytes.labels(model=model).set(nbytes)

    def observe_model_unload(self, model: str) -> None:
        kind = self._model_kinds.get(model)
        if kind:
            self.model_loaded.labels(model=model, kind=kind).set(0)
        self.model_bytes.labels(model=model).set(0)


_default: Optional[Metrics] = None
_default_lock = threading.Lock()


def default_metrics() -> Metrics:
    """The process-wide metrics, registered in prometheus_client's global registry."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Metrics(prometheus_client.REGISTRY)
        return _default
