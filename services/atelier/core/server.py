"""Server bootstrap shared by every service.

``start(app, config)`` brings up a gRPC server with health, reflection, the
metrics and error interceptors, and a Prometheus endpoint, then loads the
app's models in the background so health is observable while loading. With
``config.health_port`` a second, plaintext server serves only that health
(kubelet's gRPC probes cannot speak TLS); it stops after the main server.
``serve(app, config)`` blocks and drains on SIGTERM/SIGINT.

Lifecycle of the app's services: loading (health NOT_SERVING, RPCs answer
UNAVAILABLE) -> serving -> draining (NOT_SERVING, new RPCs UNAVAILABLE, in-flight
ones finish within the grace period) -> stopped.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import warnings
from concurrent import futures
from typing import Callable, Optional, Protocol, Sequence

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from atelier.core import auth
from atelier.core.admission import AdmissionInterceptor, ByteBudget
from atelier.core.config import ServerConfig
from atelier.core.interceptors import ErrorInterceptor, MetricsInterceptor, Readiness
from atelier.core.metrics import Metrics, default_metrics
from atelier.core.reflection import enable_reflection

__all__ = ["App", "RunningServer", "ServerConfig", "start", "serve", "quiet_third_party_logs", "apply_threads",
           "EXIT_OK", "EXIT_LOAD_FAILED", "EXIT_CALLS_CUT_OFF"]

_LOG = logging.getLogger(__name__)

EXIT_OK, EXIT_LOAD_FAILED, EXIT_CALLS_CUT_OFF = 0, 1, 2

# Threads beyond one per queued/running call: health checks, reflection, calls
# that are refused quickly (queue full, invalid input).
_SPARE_THREADS = 8

# The health-only port answers probes: tiny requests, few threads, and a bound on concurrent
# calls (gRPC answers RESOURCE_EXHAUSTED beyond it), since it is plaintext and open to anyone
# who can reach it (as health on the main port is).
_HEALTH_PORT_THREADS = 2
_HEALTH_PORT_MAX_CALLS = 32
_HEALTH_PORT_MAX_MESSAGE_BYTES = 4096


class App(Protocol):
    """A service for ``start``/``serve``. Optional members the bootstrap uses when present:
    ``executor`` (a ComputeExecutor: a wedged worker makes health NOT_SERVING) and
    ``backend_readiness() -> (ready, reason)`` (an external backend, e.g. Triton, that health
    follows)."""

    name: str
    service_names: Sequence[str]  # full proto names, e.g. "atelier.v1.Inversion"

    def add_to_server(self, server: grpc.Server) -> None: ...

    def load(self) -> None: ...

    def close(self) -> None: ...


# Third-party loggers whose warnings say nothing an operator can act on in a server log
# (deprecations inside torchvision/diffusers/transformers, unused-weights notes).
_QUIET_LOGGERS = ("diffusers", "transformers", "torchvision", "accelerate", "huggingface_hub", "PIL")


def quiet_third_party_logs() -> None:
    """Server processes: no progress bars (their carriage returns garble log lines) and only
    errors from third-party libraries. Python warnings from them go to the log once, at most."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("torchvision", "diffusers", "transformers", "accelerate", "huggingface_hub", "torch"):
        warnings.filterwarnings("ignore", module=module + r"(\.|$)")
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    except ImportError:
        pass


def apply_threads(threads: int) -> None:
    """Intra-op threads for torch and OpenMP/MKL. The environment variables reach libraries
    that read them at first use (call this before loading models); torch.set_num_threads
    changes a torch already imported."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


class RunningServer:
    """A started server. ``stop`` drains and is idempotent."""

    def __init__(self, app: App, config: ServerConfig, server: grpc.Server, port: int,
                 health_servicer: health.HealthServicer, readiness: Readiness, metrics: Metrics,
                 metrics_http: Optional[tuple], health_server: Optional[tuple[grpc.Server, int]] = None):
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
        self._health_server = health_server
        self._loaded = threading.Event()  # set when load() returned or failed
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._health_lock = threading.Lock()
        self._serving: Optional[bool] = None  # what health last reported for the app
        self._announced_ready = False
        # False once a stop's grace period ran out with calls still in flight (cut off).
        self.drained_cleanly = True

    @property
    def metrics_port(self) -> Optional[int]:
        return self._metrics_http[0].server_port if self._metrics_http else None

    @property
    def health_port(self) -> Optional[int]:
        """The plaintext health-only port, or None without ``config.health_port``."""
        return self._health_server[1] if self._health_server else None

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
                self.refresh_health()
        finally:
            self._loaded.set()

    def serving_problem(self) -> Optional[str]:
        """Why the app must not be reported SERVING now, or None."""
        state = self.readiness.state
        if state != "serving":
            return f"state {state}"
        executor = getattr(self.app, "executor", None)
        if executor is not None:
            wedged = executor.wedged(self.config.wedged_after_seconds)
            if wedged:
                return wedged
        backend_readiness = getattr(self.app, "backend_readiness", None)
        if backend_readiness is not None:
            try:
                ready, reason = backend_readiness()
            except Exception as error:  # noqa: BLE001 - a failing probe means not ready
                ready, reason = False, f"backend readiness check failed: {type(error).__name__}"
            if not ready:
                return reason
        return None

    def refresh_health(self) -> None:
        """Set health from the state, the compute worker and the app's backend. The bootstrap
        owns health: loading, draining, a wedged worker and a backend that is down all give
        NOT_SERVING. Logs "ready" the first time the app is SERVING, and every change."""
        with self._health_lock:
            if self.readiness.state in ("draining", "failed"):
                return  # stop() / _load() set those for good
            problem = self.serving_problem()
            serving = problem is None
            if serving == self._serving:
                return
            self._serving = serving
            self._set_health(health_pb2.HealthCheckResponse.SERVING if serving
                             else health_pb2.HealthCheckResponse.NOT_SERVING)
            if serving and not self._announced_ready:
                self._announced_ready = True
                _LOG.info("%s: ready on %s after %.1f s", self.app.name, self.address, self.load_seconds or 0.0)
            elif serving:
                _LOG.info("%s: health SERVING again", self.app.name)
            elif self.readiness.state == "serving":
                _LOG.warning("%s: health NOT_SERVING: %s", self.app.name, problem)

    def _watch_health(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            if self.readiness.state == "serving":
                try:
                    self.refresh_health()
                except Exception:  # noqa: BLE001 - the watcher must outlive one bad probe
                    _LOG.exception("%s: health check failed", self.app.name)

    def stop(self, grace: Optional[float] = None) -> None:
        """Drain: NOT_SERVING and refuse new calls, let in-flight calls finish for up
        to ``grace`` seconds (config.grace_seconds by default), then stop."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.grace_seconds if grace is None else grace
            deadline = time.monotonic() + grace
            with self._health_lock:
                self.readiness.set_state("draining")
                self.health.enter_graceful_shutdown()
            _LOG.info("%s: draining (grace %.1f s)", self.app.name, grace)
            if not self.readiness.wait_idle(grace):
                self.drained_cleanly = False
                _LOG.warning("%s: grace period over; cancelling the remaining calls", self.app.name)
            # Calls still running after the grace period are cancelled by gRPC; their
            # work stops at its next UNet evaluation.
            self._server.stop(max(0.0, deadline - time.monotonic())).wait()
            # Probes on the health port saw NOT_SERVING for the whole drain; it goes last.
            if self._health_server is not None:
                self._health_server[0].stop(0).wait()
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


def _bind(server: grpc.Server, bind: str, credentials: Optional[grpc.ServerCredentials] = None) -> int:
    try:
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    except RuntimeError as error:  # grpcio raises when the bind fails (e.g. port in use)
        raise OSError(f"cannot bind gRPC port {bind}: {error}") from None
    if port == 0:
        raise OSError(f"cannot bind gRPC port {bind}")
    return port


def _health_only_server(health_servicer: health.HealthServicer, config: ServerConfig) -> tuple[grpc.Server, int]:
    """A plaintext server on ``config.health_port`` with only grpc.health.v1, answered by the
    main server's HealthServicer (same statuses, same drain). No reflection, no auth: health
    carries no data, and the main port leaves it open to probes too. Not started."""
    options = [o for o in config.grpc_options() if o[0] != "grpc.max_receive_message_length"]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=_HEALTH_PORT_THREADS,
                                   thread_name_prefix=f"grpc-health-{config.service}"),
        options=[*options, ("grpc.max_receive_message_length", _HEALTH_PORT_MAX_MESSAGE_BYTES)],
        maximum_concurrent_rpcs=_HEALTH_PORT_MAX_CALLS,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, _bind(server, f"{config.host}:{config.health_port}")


def start(app: App, config: ServerConfig, metrics: Optional[Metrics] = None) -> RunningServer:
    """Start serving ``app`` (non-blocking). Models load in a background thread."""
    metrics = metrics if metrics is not None else default_metrics()
    threads = config.resolved_threads()
    apply_threads(threads)
    readiness = Readiness(app.service_names)
    # A sync gRPC handler holds its thread for the whole call, including the time
    # it waits for the executor: one thread per admissible call, plus spares.
    handler_threads = config.max_queue + 1 + _SPARE_THREADS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=handler_threads, thread_name_prefix=f"grpc-{app.name}"),
        # Admission is inside the error interceptor, which maps its refusals to statuses.
        interceptors=[MetricsInterceptor(metrics), *auth.server_interceptors(config.auth), ErrorInterceptor(readiness),
                      AdmissionInterceptor(_byte_budget(app, config, metrics), app.service_names)],
        options=config.grpc_options(),
        # Beyond this gRPC answers RESOURCE_EXHAUSTED itself instead of letting
        # requests (each up to max_message_bytes) pile up in memory.
        maximum_concurrent_rpcs=2 * handler_threads,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", *app.service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    app.add_to_server(server)
    # Reflection (v1 and v1alpha) from descriptors that carry the .proto comments (grpcurl
    # describe shows them).
    enable_reflection((*app.service_names, health.SERVICE_NAME), server)
    port = _bind(server, f"{config.host}:{config.port}", auth.server_credentials(config.auth))
    try:
        health_server = _health_only_server(health_servicer, config) if config.health_port else None
    except OSError:
        server.stop(0)  # releases the main port it bound
        raise
    servers = [server] + ([health_server[0]] if health_server else [])
    for started in servers:
        started.start()

    metrics_http = None
    if config.metrics_port >= 0:
        try:
            metrics_http = prometheus_client.start_http_server(
                config.metrics_port, addr=config.host, registry=metrics.registry
            )
        except OSError:
            for started in servers:
                started.stop(0)
            raise
    running = RunningServer(app, config, server, port, health_servicer, readiness, metrics, metrics_http,
                            health_server)
    _LOG.info("%s: listening on %s:%d%s, metrics on %s, %d compute threads; loading models", app.name,
              config.host, port, f", plaintext health on {health_server[1]}" if health_server else "",
              running.metrics_port if metrics_http else "(disabled)", threads)
    threading.Thread(target=running._load, name=f"load-{app.name}", daemon=True).start()
    threading.Thread(target=running._watch_health, args=(config.health_interval_seconds,),
                     name=f"health-{app.name}", daemon=True).start()
    return running


def serve(
    app: App,
    config: ServerConfig,
    metrics: Optional[Metrics] = None,
    on_started: Optional[Callable[[RunningServer], None]] = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain and stop. Returns the exit status:
    0 after a clean drain, 1 when the models failed to load, 2 when the grace period ran
    out and calls were cut off. ``on_started`` sees the RunningServer first."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_third_party_logs()
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
    if running.load_error is not None:
        return EXIT_LOAD_FAILED
    return EXIT_OK if running.drained_cleanly else EXIT_CALLS_CUT_OFF
