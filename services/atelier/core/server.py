"""Server bootstrap shared by every service.

``start(app, config)`` brings up a gRPC server with health, reflection, the
metrics and error interceptors, and a Prometheus endpoint, then loads the
app's models in the background so health is observable while loading.
``serve(app, config)`` blocks and drains on SIGTERM/SIGINT.

Lifecycle of the app's services: loading (health NOT_SERVING, RPCs answer
UNAVAILABLE) -> serving -> draining (NOT_SERVING, new RPCs UNAVAILABLE, in-flight
ones finish within the grace period) -> stopped.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Optional, Protocol, Sequence

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from atelier.core import auth
from atelier.core.admission import AdmissionInterceptor, ByteBudget
from atelier.core.config import ServerConfig
from atelier.core.interceptors import ErrorInterceptor, MetricsInterceptor, Readiness
from atelier.core.metrics import Metrics, default_metrics
from atelier.core.reflection import enable_reflection

__all__ = ["App", "RunningServer", "ServerConfig", "start", "serve"]

_LOG = logging.getLogger(__name__)

# Threads beyond one per queued/running call: health checks, reflection, calls
# that are refused quickly (queue full, invalid input).
_SPARE_THREADS = 8


class App(Protocol):
    name: str
    service_names: Sequence[str]  # full proto names, e.g. "atelier.v1.Inversion"

    def add_to_server(self, server: grpc.Server) -> None: ...

    def load(self) -> None: ...

    def close(self) -> None: ...


class RunningServer:
    """A started server. ``stop`` drains and is idempotent."""

    def __init__(self, app: App, config: ServerConfig, server: grpc.Server, port: int,
                 health_servicer: health.HealthServicer, readiness: Readiness, metrics: Metrics,
                 metrics_http: Optional[tuple]):
        self.app = app
        self.config = config
        self.port = port
        self.health = health_servicer
        self.readiness = readiness
        self.metrics = metrics
        self.load_error: Optional[BaseException] = None
        self.load_seconds: Optional[float] = None
        self._server = server
        self._metrics_http = metrics_http
        self._loaded = threading.Event()  # set when load() returned or failed
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def metrics_port(self) -> Optional[int]:
        return self._metrics_http[0].server_port if self._metrics_http else None

    @property
    def address(self) -> str:
        host = self.config.host
        if host in ("", "0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def wait_loaded(self, timeout: Optional[float] = None) -> bool:
        """True once load() finished (check ``load_error``); False on timeout."""
        return self._loaded.wait(timeout)

    def _set_health(self, status) -> None:
        for name in ("", *self.app.service_names):
            self.health.set(name, status)

    def _load(self) -> None:
        started = time.monotonic()
        try:
            self.app.load()
        except BaseException as error:  # noqa: BLE001 - reported through load_error and the log
            self.load_error = error
            self.readiness.set_state("failed")
            _LOG.exception("%s: loading failed; the service stays NOT_SERVING", self.app.name)
        else:
            self.load_seconds = time.monotonic() - started
            if self.readiness.state == "loading":  # not if a stop began meanwhile
                self.readiness.set_state("serving")
                self._set_health(health_pb2.HealthCheckResponse.SERVING)
            _LOG.info("%s: ready on %s after %.1f s", self.app.name, self.address, self.load_seconds)
        finally:
            self._loaded.set()

    def stop(self, grace: Optional[float] = None) -> None:
        """Drain: NOT_SERVING and refuse new calls, let in-flight calls finish for up
        to ``grace`` seconds (config.grace_seconds by default), then stop."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.grace_seconds if grace is None else grace
            deadline = time.monotonic() + grace
            self.readiness.set_state("draining")
            self.health.enter_graceful_shutdown()
            _LOG.info("%s: draining (grace %.1f s)", self.app.name, grace)
            if not self.readiness.wait_idle(grace):
                _LOG.warning("%s: grace period over; cancelling the remaining calls", self.app.name)
            # Calls still running after the grace period are cancelled by gRPC; their
            # work stops at its next UNet evaluation.
            self._server.stop(max(0.0, deadline - time.monotonic())).wait()
            if self._metrics_http is not None:
                httpd, _ = self._metrics_http
                # shutdown() waits out serve_forever's 0.5 s poll; nobody needs to wait for it.
                threading.Thread(target=lambda: (httpd.shutdown(), httpd.server_close()), daemon=True).start()
            try:
                self.app.close()
            except Exception:  # noqa: BLE001 - shutting down anyway
                _LOG.exception("%s: close() failed", self.app.name)
            self._stopped.set()
            _LOG.info("%s: stopped", self.app.name)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until stopped; False on timeout."""
        return self._stopped.wait(timeout)


def _byte_budget(app: App, config: ServerConfig, metrics: Metrics) -> ByteBudget:
    return ByteBudget(config.max_inflight_bytes, app.name, max_message_bytes=config.max_message_bytes,
                      gauge=metrics.inflight_bytes.labels(service=app.name))


def start(app: App, config: ServerConfig, metrics: Optional[Metrics] = None) -> RunningServer:
    """Start serving ``app`` (non-blocking). Models load in a background thread."""
    metrics = metrics if metrics is not None else default_metrics()
    readiness = Readiness(app.service_names)
    # A sync gRPC handler holds its thread for the whole call, including the time
    # it waits for the executor: one thread per admissible call, plus spares.
    threads = config.max_queue + 1 + _SPARE_THREADS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"grpc-{app.name}"),
        # Admission is inside the error interceptor, which maps its refusals to statuses.
        interceptors=[MetricsInterceptor(metrics), *auth.server_interceptors(config.auth), ErrorInterceptor(readiness),
                      AdmissionInterceptor(_byte_budget(app, config, metrics), app.service_names)],
        options=config.grpc_options(),
        # Beyond this gRPC answers RESOURCE_EXHAUSTED itself instead of letting
        # requests (each up to max_message_bytes) pile up in memory.
        maximum_concurrent_rpcs=2 * threads,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", *app.service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    app.add_to_server(server)
    # Reflection from descriptors that carry the .proto comments (grpcurl describe shows them).
    enable_reflection((*app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = auth.server_credentials(config.auth)
    bind = f"{config.host}:{config.port}"
    port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"cannot bind gRPC port {config.host}:{config.port}")
    server.start()

    metrics_http = None
    if config.metrics_port >= 0:
        try:
            metrics_http = prometheus_client.start_http_server(
                config.metrics_port, addr=config.host, registry=metrics.registry
            )
        except OSError:
            server.stop(0)
            raise
    running = RunningServer(app, config, server, port, health_servicer, readiness, metrics, metrics_http)
    _LOG.info("%s: listening on %s:%d, metrics on %s; loading models", app.name, config.host, port,
              running.metrics_port if metrics_http else "(disabled)")
    threading.Thread(target=running._load, name=f"load-{app.name}", daemon=True).start()
    return running


def serve(
    app: App,
    config: ServerConfig,
    metrics: Optional[Metrics] = None,
    on_started: Optional[Callable[[RunningServer], None]] = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain and stop. Returns the exit status:
    0 after a clean drain, 1 when the models failed to load. ``on_started`` sees
    the RunningServer first (e.g. to make health follow an external backend)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    running = start(app, config, metrics)
    if on_started is not None:
        on_started(running)
    stop_requested = threading.Event()

    def on_signal(signum, _frame):
        _LOG.info("%s: received %s", app.name, signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Short waits keep the main thread responsive to signals.
        while not stop_requested.wait(0.5):
            if running.wait_loaded(0) and running.load_error is not None:
                break
        running.stop(config.grace_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if running.load_error is not None else 0
