"""``atelier.aio.Client``: the asyncio twin of ``atelier.Client`` on grpc.aio.

Same constructor, same sub-clients and arguments (each call awaited), same errors,
retries, deadlines and result types; the settings, request building and result
parsing are the sync SDK's own. Cancel a call with ``cancel=atelier.CancelToken()`` (from
any thread) or by cancelling its task. Create and use it inside a running event loop.
"""
from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Optional, Union

import grpc
from grpc_health.v1 import health_pb2

from atelier.aio.inversion import AsyncInversionClient
from atelier.aio.personalization import AsyncPersonalizationClient
from atelier.aio.segmentation import AsyncSegmentationClient
from atelier.aio.synthesis import AsyncSynthesisClient
from atelier.aio.transport import AsyncTransport
from atelier.sdk import channel_options
from atelier.sdk.client import (
    HEALTH_CHECK,
    HEALTH_CHECK_CODECS,
    HEALTH_STATUS_NAMES,
    Credentials,
    ModelInfo,
    _Settings,
    health_of_error,
    list_models_method,
    list_models_request,
    model_infos,
)
from atelier.sdk.transport import DEFAULT_TIMEOUT, RetryPolicy

__all__ = ["Client"]

# service -> the asyncio sub-client class (the sync client's SERVICES, awaited).
ASYNC_SERVICES: dict[str, type] = {"inversion": AsyncInversionClient, "segmentation": AsyncSegmentationClient,
                                   "personalization": AsyncPersonalizationClient,
                                   "synthesis": AsyncSynthesisClient}


class Client:
    """An asyncio client for the Atelier services; arguments as ``atelier.Client``.

    Use as ``async with atelier.aio.Client(...) as client:`` or ``await client.close()``.
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
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._services: dict[str, Any] = {}
        self._closed = False

    @property
    def timeout(self) -> Optional[float]:
        return self._settings.timeout

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._settings.retry_policy

    @property
    def inversion(self) -> AsyncInversionClient:
        sub_client: AsyncInversionClient = self.service("inversion")
        return sub_client

    @property
    def segmentation(self) -> AsyncSegmentationClient:
        sub_client: AsyncSegmentationClient = self.service("segmentation")
        return sub_client

    @property
    def personalization(self) -> AsyncPersonalizationClient:
        sub_client: AsyncPersonalizationClient = self.service("personalization")
        return sub_client

    @property
    def synthesis(self) -> AsyncSynthesisClient:
        sub_client: AsyncSynthesisClient = self.service("synthesis")
        return sub_client

    def service(self, name: str) -> Any:
        """The asyncio sub-client for a service, created on first use."""
        existing = self._services.get(name)
        if existing is not None:
            return existing
        if name not in ASYNC_SERVICES:
            raise AttributeError(f"this SDK version has no asyncio client for the {name!r} service")
        return self._services.setdefault(name, ASYNC_SERVICES[name](self.transport(name)))

    def transport(self, name: str) -> AsyncTransport:
        address = self._settings.address_of(name)
        return AsyncTransport(lambda: self._channel(address), metadata=self._settings.metadata,
                              default_timeout=self._settings.timeout, retry_policy=self._settings.retry_policy)

    async def health(self, timeout: float = 5.0) -> dict[str, str]:
        """As ``atelier.Client.health``; the services are checked concurrently."""
        targets = self._settings.health_targets()

        async def check(address: str, proto_service: str) -> str:
            check = self._channel(address).unary_unary(HEALTH_CHECK, **HEALTH_CHECK_CODECS)
            try:
                reply = await check(health_pb2.HealthCheckRequest(service=proto_service), timeout=timeout,
                                         metadata=self._settings.metadata)
            except grpc.RpcError as exc:
                return health_of_error(exc)
            return HEALTH_STATUS_NAMES.get(reply.status, "UNKNOWN")

        statuses = await asyncio.gather(*(check(address, service) for address, service in targets.values()))
        return dict(zip(targets, statuses))

    async def edit_with_concept(self, image: Any, source_prompt: str, target_prompt: str, concept: Any,
                                inversion: str = "spdinv", **options: Any) -> Any:
        """As ``atelier.Client.edit_with_concept``."""
        return await self.inversion.edit(image, target_prompt, source_prompt=source_prompt, method=inversion,
                                         concept=concept, **options)

    async def models(self, timeout: Optional[float] = None) -> list[ModelInfo]:
        """As ``atelier.Client.models``; the services are asked concurrently."""
        from atelier.sdk.errors import UnimplementedError

        async def ask(name: str, proto_service: str) -> list[ModelInfo]:
            transport = self.transport(name)
            try:
                response = await transport.unary(list_models_method(transport.channel, proto_service),
                                                 list_models_request(), timeout)
            except UnimplementedError:
                return []
            return model_infos(name, response)

        targets = self._settings.health_targets()
        answers = await asyncio.gather(*(ask(name, service) for name, (_, service) in targets.items()))
        return [info for answer in answers for info in answer]

    async def ready(self, timeout: float = 5.0) -> bool:
        """True when every configured service reports SERVING."""
        statuses = await self.health(timeout)
        return bool(statuses) and all(status == "SERVING" for status in statuses.values())

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._closed:
            raise RuntimeError("this atelier.aio.Client is closed")
        channel = self._channels.get(address)
        if channel is None:
            options = self._settings.channel_options(address)
            if self._settings.credentials is None:
                channel = grpc.aio.insecure_channel(address, options=options)
            else:
                channel = grpc.aio.secure_channel(address, self._settings.credentials, options=options)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        """Close every channel; in-flight calls are cancelled. Idempotent."""
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                        traceback: Optional[TracebackType]) -> None:
        await self.close()

    def __repr__(self) -> str:
        addresses = ", ".join(f"{name}={address!r}" for name, address in self._settings.addresses.items() if address)
        return f"atelier.aio.Client({addresses})"
