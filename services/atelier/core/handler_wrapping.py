"""Plumbing the server interceptors share: replacing an RPC handler's behaviour and request
deserializer, and carrying a deserializer's error to the behaviour as a value."""
from __future__ import annotations

from typing import Callable, Optional

import grpc

__all__ = ["CarriedError", "wrap_behavior"]


class CarriedError:
    """What a wrapped deserializer returns instead of raising.

    grpcio answers a deserializer that raises with INTERNAL ("Exception deserializing
    request"); an interceptor that must refuse a request while deserializing it returns this
    instead, and its behaviour wrapper raises or aborts with ``error``. Each interceptor
    subclasses it, so that one's carried errors never look like another's."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def wrap_behavior(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable, bool], Callable],
                  wrap_deserializer: Optional[Callable[[Optional[Callable]], Optional[Callable]]] = None):
    """Return ``handler`` with its behaviour replaced by ``wrap(behavior, streaming_response)``
    (and its request deserializer by ``wrap_deserializer(deserializer)`` when given; it also
    receives a handler's ``None`` deserializer)."""
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    deserializer = handler.request_deserializer
    if wrap_deserializer is not None:
        deserializer = wrap_deserializer(deserializer)
    if getattr(behavior, "experimental_non_blocking", False):
        # Callback-style handlers (health Watch) take a third argument and hold no
        # thread; wrapping would turn them into thread-holding generators.
        if deserializer is handler.request_deserializer:
            return handler
        return handler._replace(request_deserializer=deserializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False), deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True), deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, False), deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, True), deserializer, handler.response_serializer
    )
