"""gRPC channel/server options that the SDK and the servers must agree on.

Kept in the SDK (pure data, no torch) so both ends import the same numbers.

Keepalive: the client pings every ``KEEPALIVE_TIME_MS`` even without active
calls (long streaming RPCs sit idle between progress events behind proxies
that drop quiet connections). The server must allow pings that often, or it
answers with GOAWAY "too_many_pings"; so the server's minimum ping interval is
kept strictly below the client's ping time.
"""
from __future__ import annotations

# Images and latent chains exceed gRPC's 4 MiB default.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# Client side: ping after 30 s without traffic, give up after 10 s without ack.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
KEEPALIVE_PERMIT_WITHOUT_CALLS = 1

# Server side: accept client pings as often as every 10 s (below KEEPALIVE_TIME_MS),
# and ping idle clients itself every 60 s.
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_MIN_PING_INTERVAL_MS = 10_000


def client_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for ``grpc.insecure_channel``/``grpc.secure_channel``."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", KEEPALIVE_PERMIT_WITHOUT_CALLS),
        # Unlimited pings without data: a long stream can be quiet for minutes.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_ms: int = SERVER_KEEPALIVE_TIME_MS,
    keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS,
    min_ping_interval_ms: int = SERVER_MIN_PING_INTERVAL_MS,
) -> list[tuple[str, int]]:
    """Options for ``grpc.server``."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", KEEPALIVE_PERMIT_WITHOUT_CALLS),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
        ("grpc.http2.max_pings_without_data", 0),
    ]
