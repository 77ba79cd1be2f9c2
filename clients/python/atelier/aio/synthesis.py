"""``atelier.aio`` Synthesis client: the same calls as ``atelier.sdk.synthesis``, awaited."""
from __future__ import annotations

from typing import Any

from PIL import Image as PILImage

from atelier.aio.transport import AsyncTransport
from atelier.sdk.common import ImageLike
from atelier.sdk.synthesis import (
    GRADOP_PLUS,
    SDEDIT,
    CallOptions,
    SynthesisResult,
    VariationsResult,
    generate_request,
    variations_request,
)
from atelier.v1 import synthesis_pb2_grpc

__all__ = ["AsyncSynthesisClient"]


class AsyncSynthesisClient:
    """``client.synthesis`` of ``atelier.aio.Client``; see ``atelier.sdk.synthesis.SynthesisClient``
    for the arguments. Cancel a call with ``cancel=`` or by cancelling its task."""

    def __init__(self, transport: AsyncTransport):
        self._transport = transport

    def _stub(self) -> synthesis_pb2_grpc.SynthesisStub:
        return synthesis_pb2_grpc.SynthesisStub(self._transport.channel)

    async def gradop(self, scribble: ImageLike, prompt: str, strength: float = 0.8, **options: Any) -> PILImage.Image:
        return (await self.gradop_result(scribble, prompt, strength, **options)).image

    async def gradop_result(self, scribble: ImageLike, prompt: str, strength: float = 0.8,
                            **options: Any) -> SynthesisResult:
        request, call = generate_request(GRADOP_PLUS, scribble, prompt, strength, options)
        return SynthesisResult.from_proto(await self._call(self._stub().Generate, request, call))

    async def sdedit(self, scribble: ImageLike, prompt: str, strength: float = 0.8, **options: Any) -> PILImage.Image:
        return (await self.sdedit_result(scribble, prompt, strength, **options)).image

    async def sdedit_result(self, scribble: ImageLike, prompt: str, strength: float = 0.8,
                            **options: Any) -> SynthesisResult:
        request, call = generate_request(SDEDIT, scribble, prompt, strength, options)
        return SynthesisResult.from_proto(await self._call(self._stub().Generate, request, call))

    async def variations(self, image: ImageLike, prompt: str, n: int = 4, lam: float = 0.7, inversion: str = "ddim",
                         **options: Any) -> list[PILImage.Image]:
        return (await self.variations_result(image, prompt, n, lam, inversion, **options)).images

    async def variations_result(self, image: ImageLike, prompt: str, n: int = 4, lam: float = 0.7,
                                inversion: str = "ddim", **options: Any) -> VariationsResult:
        request, call = variations_request(image, prompt, n, lam, inversion, options)
        return VariationsResult.from_proto(await self._call(self._stub().Variations, request, call))

    async def _call(self, method: Any, request: Any, call: CallOptions) -> Any:
        return await self._transport.stream(method, request, call.timeout, call.progress, cancel=call.cancel,
                                            retry=call.retry, handlers=call.stream_handlers())
