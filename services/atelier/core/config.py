"""Server configuration: command-line flags with ATELIER_* environment fallbacks.

Precedence: flag > environment > default. ``models``/``models_file`` stay plain
data here; ``atelier.core.models.ModelRegistry`` interprets them.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from atelier.core import auth
from atelier.sdk import channel_options

__all__ = ["ServerConfig", "DEFAULT_PORTS", "parse_model_entries", "cpu_limit"]

# service -> (gRPC port, metrics port); see docs/INTERNALS.md.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "inversion": (50051, 9451),
    "segmentation": (50052, 9452),
    "personalization": (50053, 9453),
    "synthesis": (50054, 9454),
}


def parse_model_entries(entries: Sequence[str], origin: str) -> dict[str, str]:
    """["name=source", ...] -> {name: source}; ``origin`` names the flag/env for errors."""
    models: dict[str, str] = {}
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        name, sep, source = entry.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ValueError(f"{origin}: expected NAME=SOURCE, got {entry!r}")
        models[name.strip()] = source.strip()
    return models


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def cpu_limit(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: the container's CFS quota (cgroup v2 ``cpu.max``, else v1
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), rounded up, capped by the CPUs the process
    may run on; without a quota, the latter (``os.sched_getaffinity``, else ``os.cpu_count``).

    os.cpu_count() alone sees the host's CPUs: a pod limited to 2 CPUs on a 64-core node
    would start 64 OpenMP threads that the quota then throttles."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    quota = period = None
    v2 = _read(os.path.join(cgroup_root, "cpu.max"))
    if v2:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            quota, period = parts
    else:
        quota = _read(os.path.join(cgroup_root, "cpu", "cpu.cfs_quota_us")) or _read(
            os.path.join(cgroup_root, "cpu.cfs_quota_us"))
        period = _read(os.path.join(cgroup_root, "cpu", "cpu.cfs_period_us")) or _read(
            os.path.join(cgroup_root, "cpu.cfs_period_us"))
    try:
        quota_us, period_us = int(quota), int(period)
    except (TypeError, ValueError):
        return max(1, available)
    if quota_us <= 0 or period_us <= 0:  # v1 reports -1 for "no limit"
        return max(1, available)
    return max(1, min(available, -(-quota_us // period_us)))
def _boolean(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_boolean.__name__ = "boolean (1/0, true/false)"


@dataclass
class ServerConfig:
    service: str
    host: str = "0.0.0.0"
    port: int = 0
    # Prometheus HTTP port; 0 picks a free one, a negative value disables it.
    metrics_port: int = -1
    # A second, plaintext gRPC port serving only grpc.health.v1 (kubelet's gRPC probes speak
    # plaintext, so with TLS on ``port`` they need it); 0: none.
    health_port: int = 0
    max_message_bytes: int = channel_options.DEFAULT_MAX_MESSAGE_BYTES
    # Calls that may wait for the compute executor while one runs.
    max_queue: int = 8
    grace_seconds: float = 30.0
    max_image_pixels: int = 1024 * 1024
    keepalive_time_ms: int = channel_options.SERVER_KEEPALIVE_TIME_MS
    keepalive_timeout_ms: int = channel_options.KEEPALIVE_TIMEOUT_MS
    min_ping_interval_ms: int = channel_options.SERVER_MIN_PING_INTERVAL_MS
    models: dict[str, str] = field(default_factory=dict)
    models_file: Optional[str] = None
    device: Optional[str] = None  # None: auto (CUDA fp16 when present, else CPU fp32)
    # torch intra-op / OpenMP threads; None: the container's CPU limit (see cpu_limit).
    threads: Optional[int] = None
    # Health turns NOT_SERVING when a call runs this long past its deadline (the compute
    # worker is wedged: nothing else can run) or the worker thread died.
    wedged_after_seconds: float = 60.0
    # How often health re-checks the compute worker and the app's backend (Triton).
    health_interval_seconds: float = 1.0
    # Model registry (atelier.core.models): weights variant and dtype for entries that name none,
    # the memory budget of loaded models (0: auto, 80% of the GPU; no bound on CPU), preloading
    # every configured model at start, and whether a bad entry fails the start.
    dtype: Optional[str] = None
    model_variant: Optional[str] = None
    model_memory_bytes: int = 0
    preload_models: bool = True
    strict_models: bool = False
    # Admission control: request + estimated response bytes of the calls in flight.
    max_inflight_bytes: int = 1 << 30
    # Service-specific settings parsed by the ``add_arguments`` hook of from_args.
    extras: dict = field(default_factory=dict)
    # Bearer tokens, TLS, and this service's credentials for calls to others (core/auth.py).
    auth: auth.AuthConfig = field(default_factory=auth.AuthConfig)

    def grpc_options(self) -> list[tuple[str, int]]:
        return channel_options.server_options(
            max_message_bytes=self.max_message_bytes,
            keepalive_time_ms=self.keepalive_time_ms,
            keepalive_timeout_ms=self.keepalive_timeout_ms,
            min_ping_interval_ms=self.min_ping_interval_ms,
        ) + [
            # gRPC sets SO_REUSEPORT by default: a second server on the same port would then
            # start and silently take half the connections. Refuse to bind instead.
            ("grpc.so_reuseport", 0),
        ]

    def resolved_threads(self, cgroup_root: str = "/sys/fs/cgroup", environ: Optional[Mapping[str, str]] = None) -> int:
        """``threads`` (--threads / ATELIER_THREADS); else an OMP_NUM_THREADS the operator set
        (OpenMP's own knob); else the container's CPU limit."""
        if self.threads is not None:
            return self.threads
        env = os.environ if environ is None else environ
        try:
            omp = int(env.get("OMP_NUM_THREADS", ""))
        except ValueError:
            omp = 0
        return omp if omp > 0 else cpu_limit(cgroup_root)

    @classmethod
    def from_args(
        cls,
        argv: Optional[Sequence[str]],
        service: str,
        default_port: Optional[int] = None,
        default_metrics_port: Optional[int] = None,
        add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> "ServerConfig":
        """Parse ``argv`` (None: sys.argv[1:]). ``add_arguments`` may add service
        flags; their parsed values land in ``extras`` (by argparse dest)."""
        env = os.environ if environ is None else environ
        ports = DEFAULT_PORTS.get(service, (0, -1))
        default_port = ports[0] if default_port is None else default_port
        default_metrics_port = ports[1] if default_metrics_port is None else default_metrics_port

        parser = argparse.ArgumentParser(prog=f"python -m atelier.{service}", description=f"Atelier {service} server")

        def env_default(name: str, fallback, convert=str):
            raw = env.get(name)
            if raw is None or raw == "":
                return fallback
            try:
                return convert(raw)
            except ValueError:
                parser.error(f"environment variable {name}={raw!r} is not a valid {convert.__name__}")

        parser.add_argument("--host", default=env_default("ATELIER_HOST", cls.host), help="bind address [ATELIER_HOST]")
        parser.add_argument("--port", type=int, default=env_default("ATELIER_PORT", default_port, int),
                            help="gRPC port, 0 picks a free one [ATELIER_PORT]")
        parser.add_argument("--metrics-port", type=int,
                            default=env_default("ATELIER_METRICS_PORT", default_metrics_port, int),
                            help="Prometheus port, 0 picks a free one, negative disables [ATELIER_METRICS_PORT]")
        parser.add_argument("--health-port", type=int,
                            default=env_default("ATELIER_HEALTH_PORT", cls.health_port, int),
                            help="plaintext port serving only grpc.health.v1, for probes when --port speaks TLS; "
                                 "0: none [ATELIER_HEALTH_PORT]")
        parser.add_argument("--max-message-bytes", type=int,
                            default=env_default("ATELIER_MAX_MESSAGE_BYTES", cls.max_message_bytes, int),
                            help="gRPC max send/receive message size [ATELIER_MAX_MESSAGE_BYTES]")
        parser.add_argument("--max-queue", type=int, default=env_default("ATELIER_MAX_QUEUE", cls.max_queue, int),
                            help="calls that may wait for the compute executor [ATELIER_MAX_QUEUE]")
        parser.add_argument("--grace-seconds", type=float,
                            default=env_default("ATELIER_GRACE_SECONDS", cls.grace_seconds, float),
                            help="drain time for in-flight calls on SIGTERM [ATELIER_GRACE_SECONDS]")
        parser.add_argument("--max-image-pixels", type=int,
                            default=env_default("ATELIER_MAX_IMAGE_PIXELS", cls.max_image_pixels, int),
                            help="largest accepted image, width*height [ATELIER_MAX_IMAGE_PIXELS]")
        parser.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                            help="model folder or hub id, repeatable [ATELIER_MODELS='a=/p;b=/q']")
        parser.add_argument("--models-file", default=env_default("ATELIER_MODELS_FILE", None),
                            help="JSON object {name: source} [ATELIER_MODELS_FILE]")
        parser.add_argument("--device", default=env_default("ATELIER_DEVICE", None),
                            help="torch device, e.g. cuda:0 or cpu; default auto [ATELIER_DEVICE]")
        parser.add_argument("--threads", type=int, default=env_default("ATELIER_THREADS", None, int),
                            help="torch/OpenMP threads; default OMP_NUM_THREADS if set, else the container's CPU limit "
                                 "[ATELIER_THREADS]")
        parser.add_argument("--wedged-after-seconds", type=float,
                            default=env_default("ATELIER_WEDGED_AFTER_SECONDS", cls.wedged_after_seconds, float),
                            help="report NOT_SERVING when a call runs this long past its deadline "
                                 "[ATELIER_WEDGED_AFTER_SECONDS]")
        parser.add_argument("--dtype", default=env_default("ATELIER_DTYPE", None),
                            help="model dtype (fp32, fp16, bf16); default fp16 on CUDA, fp32 on CPU [ATELIER_DTYPE]")
        parser.add_argument("--model-variant", default=env_default("ATELIER_MODEL_VARIANT", None),
                            help="weights variant for models that name none, e.g. fp16 for *.fp16.safetensors "
                                 "[ATELIER_MODEL_VARIANT]")
        parser.add_argument("--model-memory-bytes", type=int,
                            default=env_default("ATELIER_MODEL_MEMORY_BYTES", cls.model_memory_bytes, int),
                            help="bytes of loaded models before the least recently used is unloaded; 0: 80%% of "
                                 "the GPU, no bound on CPU [ATELIER_MODEL_MEMORY_BYTES]")
        parser.add_argument("--preload-models", action=argparse.BooleanOptionalAction,
                            default=env_default("ATELIER_PRELOAD_MODELS", True, _boolean),
                            help="load every configured model of this service at start [ATELIER_PRELOAD_MODELS]")
        parser.add_argument("--strict-models", action=argparse.BooleanOptionalAction,
                            default=env_default("ATELIER_STRICT_MODELS", False, _boolean),
                            help="a bad model entry fails the start (default: it is served as unavailable, "
                                 "FAILED_PRECONDITION) [ATELIER_STRICT_MODELS]")
        parser.add_argument("--max-inflight-bytes", type=int,
                            default=env_default("ATELIER_MAX_INFLIGHT_BYTES", cls.max_inflight_bytes, int),
                            help="request + estimated response bytes of the calls in flight; beyond it calls get "
                                 "RESOURCE_EXHAUSTED with RetryInfo [ATELIER_MAX_INFLIGHT_BYTES]")
        auth.add_arguments(parser, env)
        if add_arguments is not None:
            add_arguments(parser)
        args = parser.parse_args(argv)
        try:
            auth_config = auth.from_args(args, env)
        except ValueError as error:
            parser.error(str(error))

        try:
            models = parse_model_entries(env.get("ATELIER_MODELS", "").split(";"), "ATELIER_MODELS")
            models.update(parse_model_entries(args.model, "--model"))
        except ValueError as error:
            parser.error(str(error))
        checks = [
            (args.max_message_bytes > 0, "--max-message-bytes must be positive"),
            (args.max_queue >= 0, "--max-queue must be >= 0"),
            (args.grace_seconds >= 0, "--grace-seconds must be >= 0"),
            (args.max_image_pixels > 0, "--max-image-pixels must be positive"),
            (0 <= args.port < 65536, "--port must be in 0..65535"),
            (0 <= args.health_port < 65536, "--health-port must be in 0..65535"),
            (args.health_port == 0 or args.health_port not in (args.port, args.metrics_port),
             "--health-port must differ from --port and --metrics-port"),
            (args.model_memory_bytes >= 0, "--model-memory-bytes must be >= 0"),
            (args.max_inflight_bytes > 0, "--max-inflight-bytes must be positive"),
            (args.metrics_port < 65536, "--metrics-port must be below 65536"),
            (args.threads is None or args.threads > 0, "--threads must be positive"),
            (args.wedged_after_seconds > 0, "--wedged-after-seconds must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                parser.error(message)

        core = {"host", "port", "metrics_port", "health_port", "max_message_bytes", "max_queue", "grace_seconds",
                "max_image_pixels", "model", "models_file", "device", "threads", "wedged_after_seconds",
                "dtype", "model_variant", "model_memory_bytes", "preload_models", "strict_models",
                "max_inflight_bytes", *auth.AUTH_DESTS}
        extras = {dest: value for dest, value in vars(args).items() if dest not in core}
        return cls(
            service=service,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            max_message_bytes=args.max_message_bytes,
            max_queue=args.max_queue,
            grace_seconds=args.grace_seconds,
            max_image_pixels=args.max_image_pixels,
            models=models,
            models_file=args.models_file,
            device=args.device,
            threads=args.threads,
            wedged_after_seconds=args.wedged_after_seconds,
            dtype=args.dtype,
            model_variant=args.model_variant,
            model_memory_bytes=args.model_memory_bytes,
            preload_models=args.preload_models,
            strict_models=args.strict_models,
            max_inflight_bytes=args.max_inflight_bytes,
            extras=extras,
            auth=auth_config,
        )
