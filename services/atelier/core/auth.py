"""Authentication and transport security, both directions.

Incoming (the server):
- bearer tokens, checked by ``TokenAuthInterceptor`` (the one place they are
  checked): ``authorization: Bearer <token>`` must match one of the accepted
  tokens, else UNAUTHENTICATED. Tokens come from files (one per line) or
  folders of files (a mounted Kubernetes Secret: every key is a token, so a new
  key can be added before the old one is removed - rotation). The files are
  re-read when they change, so a rotated Secret needs no restart. Services in
  ``open_services`` (health and reflection by default: probes carry no token)
  pass without one.
- TLS when a certificate and key are configured (``server_credentials``), mutual
  TLS when a client CA is configured too (clients without a certificate signed
  by it are refused during the handshake).

Outgoing (service-to-service calls, e.g. synthesis -> inversion):
``PeerCredentials`` says how this service authenticates to the others (its own
token, the CA that signs their certificates, its own client certificate) and
``dial(address, peer)`` builds the channel with it. gRPC refuses call
credentials on a plaintext channel, so without TLS the token travels as
metadata added by a client interceptor (inside a cluster network, as the SDK does).

Flags (env in brackets): --auth-token-file [ATELIER_AUTH_TOKEN_FILE],
--auth-open-services [ATELIER_AUTH_OPEN_SERVICES], --tls-cert/--tls-key
[ATELIER_TLS_CERT/_KEY], --tls-client-ca [ATELIER_TLS_CLIENT_CA], and for peers
--peer-token-file, --peer-tls-ca, --peer-tls-cert, --peer-tls-key,
--peer-tls-server-name [ATELIER_PEER_...].
"""
from __future__ import annotations

import argparse
import hmac
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import grpc

from atelier.sdk import channel_options

__all__ = [
    "AuthConfig", "PeerCredentials", "TokenAuthInterceptor", "server_credentials", "dial",
    "add_arguments", "from_args", "DEFAULT_OPEN_SERVICES", "read_tokens",
]

DEFAULT_OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


@dataclass(frozen=True)
class PeerCredentials:
    """How this service calls the other services. All fields optional."""

    token_file: Optional[str] = None
    tls_ca: Optional[str] = None  # enables TLS to peers
    tls_cert: Optional[str] = None  # with tls_key: mutual TLS
    tls_key: Optional[str] = None
    tls_server_name: Optional[str] = None

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None


@dataclass(frozen=True)
class AuthConfig:
    """Incoming auth/TLS settings plus the outgoing ``peer`` credentials."""

    token_files: tuple[str, ...] = ()
    open_services: tuple[str, ...] = DEFAULT_OPEN_SERVICES
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    peer: PeerCredentials = field(default_factory=PeerCredentials)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if (self.peer.tls_cert is None) != (self.peer.tls_key is None):
            raise ValueError("--peer-tls-cert and --peer-tls-key go together")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def tokens_required(self) -> bool:
        return bool(self.token_files)


def _read(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    return Path(path).read_bytes()


def read_tokens(paths: Sequence[str]) -> frozenset[str]:
    """Tokens in ``paths``: files hold one per line ('#' comments allowed); a folder
    contributes each of its visible files (a mounted Secret's keys)."""
    tokens: set[str] = set()
    for path in map(Path, paths):
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if path.is_dir() else [path]
        for file in files:
            for line in file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    tokens.add(line)
    return frozenset(tokens)


class _TokenStore:
    """Accepted tokens, re-read when a file's modification time changes."""

    def __init__(self, paths: Sequence[str]):
        self._paths = tuple(paths)
        self._lock = threading.Lock()
        self._stamp: Optional[tuple] = None
        self._tokens: frozenset[str] = frozenset()
        self.tokens()  # fail at start-up, not on the first call, when a file is missing
        if not self._tokens:
            raise ValueError(f"no tokens in {', '.join(self._paths)}")

    def _current_stamp(self) -> tuple:
        stamp = []
        for path in map(Path, self._paths):
            stamp.append(path.stat().st_mtime_ns)
            if path.is_dir():  # Secret updates swap the ..data symlink: the folder's entries change
                stamp.extend(p.stat().st_mtime_ns for p in sorted(path.iterdir()))
        return tuple(stamp)

    def tokens(self) -> frozenset[str]:
        with self._lock:
            try:
                stamp = self._current_stamp()
                if stamp != self._stamp:
                    self._tokens, self._stamp = read_tokens(self._paths), stamp
            except OSError:
                if self._stamp is None:
                    raise
                # Mid-rotation (files being swapped): keep the last good set.
            return self._tokens

    def accepts(self, presented: str) -> bool:
        # Compare against every token (no early exit) in constant time per token.
        matched = False
        for token in self.tokens():
            matched |= hmac.compare_digest(presented.encode(), token.encode())
        return matched


def _deny_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def deny(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def deny_stream(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    args = (handler.request_deserializer, handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, *args)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, *args)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, *args)
    return grpc.unary_unary_rpc_method_handler(deny, *args)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED unless the call carries an accepted bearer token (or its
    service is open). Placed after the metrics interceptor, so refusals are counted."""

    def __init__(self, token_files: Sequence[str], open_services: Sequence[str] = DEFAULT_OPEN_SERVICES):
        self._store = _TokenStore(token_files)
        self._open = frozenset(open_services)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if service in self._open:
            return handler
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            return _deny_handler(handler, "missing 'authorization: Bearer <token>' metadata")
        if scheme.lower() != "bearer" or not self._store.accepts(token.strip()):
            return _deny_handler(handler, "invalid bearer token")
        return handler


def server_interceptors(config: AuthConfig) -> list[grpc.ServerInterceptor]:
    """The auth interceptor when tokens are configured, else nothing."""
    if not config.tokens_required:
        return []
    return [TokenAuthInterceptor(config.token_files, config.open_services)]


def server_credentials(config: AuthConfig) -> Optional[grpc.ServerCredentials]:
    """TLS (mutual when a client CA is configured) credentials, or None for plaintext."""
    if not config.tls:
        return None
    client_ca = _read(config.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key), _read(config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


_peer_tokens: dict[str, tuple[tuple[int, int], str]] = {}


def _peer_token(token_file: str) -> str:
    """This service's own token: the first token in a file, re-read when the file's
    modification time changes (rotation) - one stat per call, not a read."""
    status = Path(token_file).stat()
    stamp = (status.st_mtime_ns, status.st_size)
    cached = _peer_tokens.get(token_file)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    tokens = [line.strip() for line in Path(token_file).read_text().splitlines()
              if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise ValueError(f"no token in {token_file}")
    _peer_tokens[token_file] = (stamp, tokens[0])
    return tokens[0]


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization`` to every call on a plaintext channel (re-read on change: rotation)."""

    def __init__(self, token_file: str):
        self._token_file = token_file

    def _details(self, details):
        token = _peer_token(self._token_file)
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        metadata.append(("authorization", f"Bearer {token}"))
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _FileTokenAuth(grpc.AuthMetadataPlugin):
    def __init__(self, token_file: str):
        self._token_file = token_file

    def __call__(self, context, callback):
        try:
            token = _peer_token(self._token_file)
        except (OSError, ValueError) as error:
            callback((), error)
            return
        callback((("authorization", f"Bearer {token}"),), None)


def dial(address: str, peer: PeerCredentials = PeerCredentials(),
         max_message_bytes: int = channel_options.DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A channel to another Atelier service carrying this service's credentials.

    ``dns:///name:port`` addresses balance calls round-robin over every address
    the name resolves to (a headless Service's pods)."""
    if peer.token_file:
        _peer_token(peer.token_file)  # fail at start-up, not on the first call
    options: list = list(channel_options.client_options(max_message_bytes))
    if address.startswith("dns:"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    if peer.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(peer.tls_ca), private_key=_read(peer.tls_key),
            certificate_chain=_read(peer.tls_cert))
        if peer.token_file:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.metadata_call_credentials(_FileTokenAuth(peer.token_file)))
        if peer.tls_server_name:
            options.append(("grpc.ssl_target_name_override", peer.tls_server_name))
        return grpc.secure_channel(address, credentials, options=options)
    channel = grpc.insecure_channel(address, options=options)
    if peer.token_file:
        channel = grpc.intercept_channel(channel, _TokenMetadata(peer.token_file))
    return channel


# ----------------------------------------------------------------- flags

_FLAGS = {
    # dest: (flag, env, help)
    "auth_token_file": ("--auth-token-file", "ATELIER_AUTH_TOKEN_FILE",
                        "accepted bearer tokens: a file (one per line) or a folder (a mounted Secret), repeatable; "
                        "unset: no token needed"),
    "auth_open_services": ("--auth-open-services", "ATELIER_AUTH_OPEN_SERVICES",
                           "comma-separated services callable without a token"),
    "tls_cert": ("--tls-cert", "ATELIER_TLS_CERT", "server certificate chain (PEM); enables TLS"),
    "tls_key": ("--tls-key", "ATELIER_TLS_KEY", "server private key (PEM)"),
    "tls_client_ca": ("--tls-client-ca", "ATELIER_TLS_CLIENT_CA",
                      "CA of client certificates (PEM); enables mutual TLS"),
    "peer_token_file": ("--peer-token-file", "ATELIER_PEER_TOKEN_FILE",
                        "this service's token for calls to other services (a file; its first token)"),
    "peer_tls_ca": ("--peer-tls-ca", "ATELIER_PEER_TLS_CA", "CA of the other services' certificates; enables TLS"),
    "peer_tls_cert": ("--peer-tls-cert", "ATELIER_PEER_TLS_CERT", "client certificate for mutual TLS to peers"),
    "peer_tls_key": ("--peer-tls-key", "ATELIER_PEER_TLS_KEY", "client key for mutual TLS to peers"),
    "peer_tls_server_name": ("--peer-tls-server-name", "ATELIER_PEER_TLS_SERVER_NAME",
                             "name the peers' certificates are checked against"),
}
AUTH_DESTS = frozenset(_FLAGS)


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    group = parser.add_argument_group("authentication and TLS")
    for dest, (flag, env, help_text) in _FLAGS.items():
        default = environ.get(env) or None
        if dest == "auth_token_file":
            group.add_argument(flag, dest=dest, action="append", default=None, help=f"{help_text} [{env}]")
        elif dest == "auth_open_services":
            group.add_argument(flag, dest=dest, default=default or ",".join(DEFAULT_OPEN_SERVICES),
                               help=f"{help_text} [{env}]")
        else:
            group.add_argument(flag, dest=dest, default=default, help=f"{help_text} [{env}]")


def from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> AuthConfig:
    token_files = args.auth_token_file
    if token_files is None:
        token_files = [p for p in (environ.get("ATELIER_AUTH_TOKEN_FILE") or "").split(os.pathsep) if p]
    return AuthConfig(
        token_files=tuple(token_files),
        open_services=tuple(s.strip() for s in args.auth_open_services.split(",") if s.strip()),
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        peer=PeerCredentials(token_file=args.peer_token_file, tls_ca=args.peer_tls_ca, tls_cert=args.peer_tls_cert,
                             tls_key=args.peer_tls_key, tls_server_name=args.peer_tls_server_name),
    )
