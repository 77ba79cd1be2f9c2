"""``atelier.aio`` Segmentation client: the same calls as ``atelier.sdk.segmentation``, awaited."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

from atelier.aio.transport import AsyncTransport
from atelier.sdk.common import ImageLike
from atelier.sdk.progress import CancelToken
from atelier.sdk.segmentation import (
    Box,
    MaskInput,
    Point,
    PromptSetLike,
    Segmentation,
    segment_many_request,
    segment_request,
    segmentation_of,
    segmentations_of,
)
from atelier.v1 import segmentation_pb2_grpc

__all__ = ["AsyncSegmentationClient"]


class AsyncSegmentationClient:
    """``client.segmentation`` of ``atelier.aio.Client``; see
    ``atelier.sdk.segmentation.SegmentationClient`` for the arguments."""

    def __init__(self, transport: AsyncTransport):
        self._transport = transport

    def _stub(self) -> segmentation_pb2_grpc.SegmentationStub:
        return segmentation_pb2_grpc.SegmentationStub(self._transport.channel)

    async def segment(
        self,
        image: ImageLike,
        points: Optional[Sequence[Point]] = None,
        labels: Optional[Sequence[int]] = None,
        boxes: Union[Box, Sequence[Box], None] = None,
        mask_input: MaskInput = None,
        multimask: bool = False,
        mask_threshold: Optional[float] = None,
        model: Optional[str] = None,
        timeout: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
    ) -> Segmentation:
        request = segment_request(image, points, labels, boxes, mask_input, multimask, mask_threshold, model)
        return segmentation_of(await self._transport.unary(self._stub().Segment, request, timeout, cancel=cancel))

    async def segment_many(
        self,
        image: ImageLike,
        prompt_sets: Iterable[PromptSetLike],
        multimask: bool = False,
        mask_threshold: Optional[float] = None,
        model: Optional[str] = None,
        timeout: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
    ) -> list[Segmentation]:
        request = segment_many_request(image, prompt_sets, multimask, mask_threshold, model)
        return segmentations_of(await self._transport.unary(self._stub().SegmentBatch, request, timeout,
                                                                 cancel=cancel))
