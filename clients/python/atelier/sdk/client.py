"""``atelier.Client``: one object for all Atelier services.

Services sit behind one address (a proxy) or one address each. Channels are
created lazily, one per distinct address, and shared by the services behind it.
Each service's sub-client (``client.inversion``, ``client.segmentation``, ...)
is built on first use from its module ``atelier.sdk.<service>``; a service whose
module is not part of this SDK raises AttributeError.
"""
from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Optional, Union

import grpc

from atelier.sdk import channel_options
from atelier.sdk.transport import RetryPolicy, _Transport

__all__ = ["Client", "TLSConfig"]

SDK_VERSION = "0.1.0"

# service name -> (module, class). A sub-client class is constructed as ``cls(transport)``.
SERVICES: dict[str, tuple[str, str]] = {
    "inversion": ("atelier.sdk.inversion", "InversionClient"),
    "segmentation": ("atelier.sdk.segmentation", "SegmentationClient"),
    "personalization": ("atelier.sdk.personalization", "PersonalizationClient"),
    "synthesis": ("atelier.sdk.synthesis", "SynthesisClient"),
}

PemSource = Union[bytes, str, os.PathLike, None]


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


class Client:
    """A client for the Atelier services.

    ``address`` serves every service unless a per-service address (``inversion=``,
    ``segmentation=``, ...) overrides it. ``token`` is sent as ``authorization:
    Bearer <token>`` on every call. ``tls`` is ``True`` (system roots), a ``TLSConfig``
    or ``grpc.ChannelCredentials``; ``None`` means plaintext. ``timeout`` is the
    default per-call deadline in seconds (each call can override it). ``retries`` is
    a ``RetryPolicy`` or the number of retries on UNAVAILABLE.

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
        tls: Union[None, bool, TLSConfig, grpc.ChannelCredentials] = None,
        timeout: Optional[float] = None,
        retries: Union[int, RetryPolicy] = RetryPolicy(),
        max_message_bytes: int = channel_options.DEFAULT_MAX_MESSAGE_BYTES,
        load_balancing: Optional[str] = None,
    ):
        per_service = {
            "inversion": inversion,
            "segmentation": segmentation,
            "personalization": personalization,
            "synthesis": synthesis,
        }
        self._addresses = {name: per_service[name] or address for name in SERVICES}
        if not any(self._addresses.values()):
            raise ValueError("give an address: Client('host:port') or one per service (inversion='host:port', ...)")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        self.timeout = timeout
        self.retry_policy = RetryPolicy.coerce(retries)
        self._max_message_bytes = max_message_bytes
        self._load_balancing = load_balancing
        self._credentials, self._server_name = self._channel_credentials(tls, token)
        # Without TLS gRPC refuses call credentials, so the token travels as plain metadata.
        self._metadata: tuple[tuple[str, str], ...] = ()
        if token is not None and self._credentials is None:
            self._metadata = (("authorization", f"Bearer {token}"),)
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._services: dict[str, object] = {}
        self._closed = False

    # ------------------------------------------------------------------ services

    @property
    def inversion(self):
        """The Inversion service: ``invert`` and ``edit`` (see ``InversionClient``)."""
        return self.service("inversion")

    @property
    def segmentation(self):
        return self.service("segmentation")

    @property
    def personalization(self):
        return self.service("personalization")

    @property
    def synthesis(self):
        return self.service("synthesis")

    def service(self, name: str):
        """The sub-client for a service, created on first use."""
        with self._lock:
            existing = self._services.get(name)
        if existing is not None:
            return existing
        if name not in SERVICES:
            raise AttributeError(f"unknown Atelier service {name!r}; known: {sorted(SERVICES)}")
        module_name, class_name = SERVICES[name]
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
        address = self._addresses.get(name)
        if not address:
            raise ValueError(f"no address for the {name} service: pass address= or {name}= to Client")
        return _Transport(
            lambda: self._channel(address),
            metadata=self._metadata,
            default_timeout=self.timeout,
            retry_policy=self.retry_policy,
        )

    # ------------------------------------------------------------------ channels

    @staticmethod
    def _channel_credentials(tls, token):
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

    def _channel_options(self, address: str = "") -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = list(channel_options.client_options(self._max_message_bytes))
        policy = self._load_balancing or ("round_robin" if address.startswith("dns:") else None)
        if policy:
            options.append(("grpc.lb_policy_name", policy))
        options.append(("grpc.primary_user_agent", f"atelier-python/{SDK_VERSION}"))
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        return options

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise RuntimeError("this atelier.Client is closed")
            channel = self._channels.get(address)
            if channel is None:
                if self._credentials is None:
                    channel = grpc.insecure_channel(address, options=self._channel_options(address))
                else:
                    channel = grpc.secure_channel(address, self._credentials, options=self._channel_options(address))
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

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        addresses = ", ".join(f"{name}={address!r}" for name, address in self._addresses.items() if address)
        return f"atelier.Client({addresses})"
