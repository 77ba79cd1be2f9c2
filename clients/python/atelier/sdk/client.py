"""``atelier.Client``: one object for all Atelier services.

Services sit behind one address (a proxy) or one address each. Channels are
created lazily, one per distinct address, and shared by the services behind it.
Each service's sub-client (``client.inversion``, ``client.segmentation``, ...)
is built on first use from its module ``atelier.sdk.<service>``; a service whose
module is not part of this SDK raises AttributeError.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Optional, Union

import grpc
from grpc_health.v1 import health_pb2

from atelier.sdk import channel_options
from atelier.sdk.transport import DEFAULT_TIMEOUT, RetryPolicy, _Transport
from atelier.v1 import common_pb2

if TYPE_CHECKING:
    from atelier.sdk.inversion import InversionClient
    from atelier.sdk.personalization import PersonalizationClient
    from atelier.sdk.segmentation import SegmentationClient
    from atelier.sdk.synthesis import SynthesisClient

__all__ = ["Client", "TLSConfig", "DEFAULT_TIMEOUT", "ModelInfo"]

SDK_VERSION = "0.1.0"

# service name -> (module, class, the proto service its health is checked under). A sub-client
# class is constructed as ``cls(transport)``; atelier.aio uses the same table with "Async" names.
SERVICES: dict[str, tuple[str, str, str]] = {
    "inversion": ("atelier.sdk.inversion", "InversionClient", "atelier.v1.Inversion"),
    "segmentation": ("atelier.sdk.segmentation", "SegmentationClient", "atelier.v1.Segmentation"),
    "personalization": ("atelier.sdk.personalization", "PersonalizationClient", "atelier.v1.Personalization"),
    "synthesis": ("atelier.sdk.synthesis", "SynthesisClient", "atelier.v1.Synthesis"),
}

PemSource = Union[bytes, str, "os.PathLike[str]", None]
Credentials = Union[None, bool, "TLSConfig", grpc.ChannelCredentials]


@dataclass(frozen=True)
class ModelInfo:
    """One model a service serves (``Client.models()``; the ListModels RPC)."""

    service: str
    name: str
    kind: str  # "stable-diffusion" or "sam"
    loaded: bool
    available: bool
    default_guidance_scale: float  # used when a call leaves guidance unset (SD models; 0 otherwise)
    dtype: str
    is_default: bool
    unavailable_reason: str = ""


def list_models_request() -> common_pb2.ListModelsRequest:
    return common_pb2.ListModelsRequest()


def list_models_method(channel: Any, proto_service: str) -> Any:
    """The ListModels method of ``proto_service`` on ``channel`` (sync or grpc.aio)."""
    return channel.unary_unary(f"/{proto_service}/ListModels",
                               request_serializer=common_pb2.ListModelsRequest.SerializeToString,
                               response_deserializer=common_pb2.ListModelsResponse.FromString)


def model_infos(service: str, response: common_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(service=service, name=m.name, kind=m.kind, loaded=m.loaded, available=m.available,
                      default_guidance_scale=m.default_guidance_scale, dtype=m.dtype, is_default=m.is_default,
                      unavailable_reason=m.unavailable_reason) for m in response.models]


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings. Each PEM field is the bytes themselves or a file path.

    ``root_certificates=None`` trusts the system roots; ``private_key`` +
    ``certificate_chain`` enable mutual TLS; ``server_name`` overrides the name the
    server certificate is checked against (e.g. when dialling an IP address).
    """

    root_certificates: PemSource = None
    private_key: PemSource = None
    certificate_chain: PemSource = None
    server_name: Optional[str] = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("TLSConfig: private_key and certificate_chain go together (mutual TLS)")
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.root_certificates),
            private_key=_read_pem(self.private_key),
            certificate_chain=_read_pem(self.certificate_chain),
        )


def _read_pem(source: PemSource) -> Optional[bytes]:
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as handle:
        return handle.read()


def available_services() -> list[str]:
    """The services this SDK has a sub-client for."""
    return [name for name, (module, _, _) in SERVICES.items() if importlib.util.find_spec(module) is not None]


class _Settings:
    """What the sync and asyncio clients share: addresses, credentials, metadata, options."""

    def __init__(
        self,
        address: Optional[str],
        per_service: dict[str, Optional[str]],
        token: Optional[str],
        tls: Credentials,
        timeout: Optional[float],
        retries: Union[int, RetryPolicy],
        max_message_bytes: int,
        load_balancing: Optional[str] = None,
    ):
        self.addresses = {name: per_service.get(name) or address for name in SERVICES}
        if not any(self.addresses.values()):
            raise ValueError("give an address: Client('host:port') or one per service (inversion='host:port', ...)")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        self.timeout = timeout
        self.retry_policy = RetryPolicy.coerce(retries)
        self.max_message_bytes = max_message_bytes
        self.load_balancing = load_balancing
        self.credentials, self.server_name = _channel_credentials(tls, token)
        # Without TLS gRPC refuses call credentials, so the token travels as plain metadata.
        self.metadata: tuple[tuple[str, str], ...] = ()
        if token is not None and self.credentials is None:
            self.metadata = (("authorization", f"Bearer {token}"),)

    def address_of(self, name: str) -> str:
        address = self.addresses.get(name)
        if not address:
            raise ValueError(f"no address for the {name} service: pass address= or {name}= to Client")
        return address

    def health_targets(self) -> dict[str, tuple[str, str]]:
        """service -> (address, proto service name) for every configured service this SDK knows."""
        return {name: (self.addresses[name] or "", SERVICES[name][2])
                for name in available_services() if self.addresses.get(name)}

    def channel_options(self, address: str = "") -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = list(channel_options.client_options(self.max_message_bytes))
        policy = self.load_balancing or ("round_robin" if address.startswith("dns:") else None)
        if policy:
            options.append(("grpc.lb_policy_name", policy))
        options.append(("grpc.primary_user_agent", f"atelier-python/{SDK_VERSION}"))
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options


def _channel_credentials(tls: Credentials, token: Optional[str]) -> tuple[Optional[grpc.ChannelCredentials],
                                                                          Optional[str]]:
    if tls is None or tls is False:
        return None, None
    server_name = None
    if tls is True:
        credentials = grpc.ssl_channel_credentials()
    elif isinstance(tls, TLSConfig):
        credentials, server_name = tls.credentials(), tls.server_name
    elif isinstance(tls, grpc.ChannelCredentials):
        credentials = tls
    else:
        raise TypeError(f"tls must be None, True, a TLSConfig or grpc.ChannelCredentials, got {type(tls).__name__}")
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return credentials, server_name


HEALTH_STATUS_NAMES = {
    health_pb2.HealthCheckResponse.SERVING: "SERVING",
    health_pb2.HealthCheckResponse.NOT_SERVING: "NOT_SERVING",
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
    health_pb2.HealthCheckResponse.UNKNOWN: "UNKNOWN",
}


# grpc.health.v1 Health/Check (called through the channel: the health stubs' types lack it).
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_CHECK_CODECS: dict[str, Any] = {
    "request_serializer": health_pb2.HealthCheckRequest.SerializeToString,
    "response_deserializer": health_pb2.HealthCheckResponse.FromString,
}


def health_of_error(exc: grpc.RpcError) -> str:
    """A failed Health/Check: the service is unknown there, or the server is not reachable."""
    return "SERVICE_UNKNOWN" if exc.code() == grpc.StatusCode.NOT_FOUND else f"UNREACHABLE ({exc.code().name})"


class Client:
    """A client for the Atelier services.

    ``address`` serves every service unless a per-service address (``inversion=``,
    ``segmentation=``, ...) overrides it. ``token`` is sent as ``authorization:
    Bearer <token>`` on every call. ``tls`` is ``True`` (system roots), a ``TLSConfig``
    or ``grpc.ChannelCredentials``; ``None`` means plaintext. ``timeout`` is the
    default per-call deadline in seconds (``DEFAULT_TIMEOUT``, 600 s; each call can
    override it; ``None``: no deadline). ``retries`` is a ``RetryPolicy`` or the number
    of retries (on UNAVAILABLE, and on RESOURCE_EXHAUSTED with RetryInfo).

    Load balancing: ``load_balancing="round_robin"`` spreads calls over every address
    the target resolves to; with ``dns:///atelier-inversion.ns.svc:50051`` (a headless
    Service) that is every ready pod, re-resolved as pods come and go. It is the default
    for ``dns:///`` targets; other targets use gRPC's ``pick_first`` unless given.

    Use as a context manager or call ``close()``.
    """

    def __init__(
        self,
        address: Optional[str] = None,
        *,
        inversion: Optional[str] = None,
        segmentation: Optional[str] = None,
        personalization: Optional[str] = None,
        synthesis: Optional[str] = None,
        token: Optional[str] = None,
        tls: Credentials = None,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        retries: Union[int, RetryPolicy] = RetryPolicy(),
        max_message_bytes: int = channel_options.DEFAULT_MAX_MESSAGE_BYTES,
        load_balancing: Optional[str] = None,
    ):
        per_service = {"inversion": inversion, "segmentation": segmentation,
                       "personalization": personalization, "synthesis": synthesis}
        self._settings = _Settings(address, per_service, token, tls, timeout, retries, max_message_bytes,
                                   load_balancing)
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._services: dict[str, Any] = {}
        self._closed = False

    @property
    def timeout(self) -> Optional[float]:
        """The default per-call deadline in seconds (None: no deadline)."""
        return self._settings.timeout

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._settings.retry_policy

    # ------------------------------------------------------------------ services

    @property
    def inversion(self) -> "InversionClient":
        """The Inversion service: ``invert`` and ``edit`` (see ``InversionClient``)."""
        sub_client: InversionClient = self.service("inversion")
        return sub_client

    @property
    def segmentation(self) -> "SegmentationClient":
        """The Segmentation service: ``segment`` and ``segment_many`` (see ``SegmentationClient``)."""
        sub_client: SegmentationClient = self.service("segmentation")
        return sub_client

    @property
    def personalization(self) -> "PersonalizationClient":
        """The Personalization service: ``train_eqdiff``, jobs, concepts, ``generate``."""
        sub_client: PersonalizationClient = self.service("personalization")
        return sub_client

    @property
    def synthesis(self) -> "SynthesisClient":
        """The Synthesis service: ``gradop``, ``sdedit``, ``variations`` (see ``SynthesisClient``)."""
        sub_client: SynthesisClient = self.service("synthesis")
        return sub_client

    def health(self, timeout: float = 5.0) -> dict[str, str]:
        """grpc.health.v1 status of every configured service this SDK knows: ``{"inversion":
        "SERVING", "segmentation": "NOT_SERVING", ...}``; a server that cannot be reached within
        ``timeout`` seconds reads ``"UNREACHABLE (<code>)"``, one without the service
        ``"SERVICE_UNKNOWN"``."""
        statuses = {}
        for name, (address, proto_service) in self._settings.health_targets().items():
            check = self._channel(address).unary_unary(HEALTH_CHECK, **HEALTH_CHECK_CODECS)
            try:
                reply = check(health_pb2.HealthCheckRequest(service=proto_service), timeout=timeout,
                                   metadata=self._settings.metadata)
                statuses[name] = HEALTH_STATUS_NAMES.get(reply.status, "UNKNOWN")
            except grpc.RpcError as exc:
                statuses[name] = health_of_error(exc)
        return statuses

    def ready(self, timeout: float = 5.0) -> bool:
        """True when every configured service reports SERVING (see ``health``)."""
        statuses = self.health(timeout)
        return bool(statuses) and all(status == "SERVING" for status in statuses.values())

    def service(self, name: str) -> Any:
        """The sub-client for a service, created on first use."""
        with self._lock:
            existing = self._services.get(name)
        if existing is not None:
            return existing
        if name not in SERVICES:
            raise AttributeError(f"unknown Atelier service {name!r}; known: {sorted(SERVICES)}")
        module_name, class_name, _ = SERVICES[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise  # the module exists but one of its own imports is missing
            raise AttributeError(f"this SDK version has no client for the {name} service") from None
        transport = self.transport(name)
        sub_client = getattr(module, class_name)(transport)
        with self._lock:
            return self._services.setdefault(name, sub_client)

    def transport(self, name: str) -> _Transport:
        """The call helper bound to a service's address (used by sub-clients)."""
        address = self._settings.address_of(name)
        return _Transport(
            lambda: self._channel(address),
            metadata=self._settings.metadata,
            default_timeout=self._settings.timeout,
            retry_policy=self._settings.retry_policy,
        )

    def models(self, timeout: Optional[float] = None) -> list[ModelInfo]:
        """The models of every configured service (the ListModels RPC; a service that does not
        answer it, e.g. not deployed behind a shared address, is skipped)."""
        from atelier.sdk.errors import UnimplementedError

        found: list[ModelInfo] = []
        for name, (_, proto_service) in self._settings.health_targets().items():
            transport = self.transport(name)
            try:
                response = transport.unary(list_models_method(transport.channel, proto_service),
                                           list_models_request(), timeout)
            except UnimplementedError:
                continue
            found += model_infos(name, response)
        return found

    def edit_with_concept(self, image: Any, source_prompt: str, target_prompt: str, concept: Any,
                          inversion: str = "spdinv", **options: Any) -> Any:
        """Invert ``image`` (with ``inversion``) and edit it towards ``target_prompt`` with a
        personalization ``concept`` (a ``Concept`` or its id; ``target_prompt`` contains its
        token), in one Edit call. ``options``: those of ``client.inversion.edit``."""
        return self.inversion.edit(image, target_prompt, source_prompt=source_prompt, method=inversion,
                                   concept=concept, **options)

    # ------------------------------------------------------------------ channels

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise RuntimeError("this atelier.Client is closed")
            channel = self._channels.get(address)
            if channel is None:
                options = self._settings.channel_options(address)
                if self._settings.credentials is None:
                    channel = grpc.insecure_channel(address, options=options)
                else:
                    channel = grpc.secure_channel(address, self._settings.credentials, options=options)
                self._channels[address] = channel
            return channel

    def close(self) -> None:
        """Close every channel; in-flight calls are cancelled. Idempotent."""
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self.close()

    def __repr__(self) -> str:
        addresses = ", ".join(f"{name}={address!r}" for name, address in self._settings.addresses.items() if address)
        return f"atelier.Client({addresses})"
