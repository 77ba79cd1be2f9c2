"""Subject masks from the segmentation service, asked in CreateJob before a job is queued.

Why in CreateJob and not in the job: the caller's deadline and request id exist only there,
and a segmentation outage then answers the caller UNAVAILABLE (retryable, naming the service)
instead of queuing a job that is bound to fail. A resumed job never calls segmentation: the
masks are part of the job's stored inputs.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import grpc

from atelier.core import auth
from atelier.core.dependencies import REQUEST_ID_KEY
from atelier.core.errors import InvalidArgument, Unavailable
from atelier.v1 import personalization_pb2, segmentation_pb2, segmentation_pb2_grpc, tensor_pb2

__all__ = ["SegmentationMasks"]


class SegmentationMasks:
    """A client of the segmentation service (one channel, created on first use)."""

    def __init__(self, address: Optional[str], peer: auth.PeerCredentials = auth.PeerCredentials(),
                 timeout_seconds: float = 30.0):
        self.address = address
        self.peer = peer
        self.timeout_seconds = timeout_seconds
        self._channel: Optional[grpc.Channel] = None

    def _stub(self) -> segmentation_pb2_grpc.SegmentationStub:
        if self._channel is None:
            self._channel = auth.dial(self.address, self.peer)
        return segmentation_pb2_grpc.SegmentationStub(self._channel)

    def masks(self, images: Sequence[tensor_pb2.Image], prompts: Sequence[personalization_pb2.MaskPrompt],
              size: tuple[int, int], deadline: Optional[float], request_id: str) -> list[tensor_pb2.Mask]:
        """One mask per image. ``deadline``: time.monotonic() instant of the caller's deadline."""
        if not self.address:
            raise InvalidArgument("masks", "this server has no segmentation service (--segmentation-address): "
                                           "give one mask per image")
        height, width = size
        stub = self._stub()
        masks = []
        for i, image in enumerate(images):
            prompt = prompts[i] if prompts else personalization_pb2.MaskPrompt()
            if prompt.points or prompt.HasField("box"):
                prompt_set = segmentation_pb2.PromptSet(points=prompt.points,
                                                        boxes=[prompt.box] if prompt.HasField("box") else [])
                multimask = False
            else:
                # The most central object: a positive point at the centre, best of SAM's 3 candidates.
                prompt_set = segmentation_pb2.PromptSet(
                    points=[segmentation_pb2.Point(x=width / 2, y=height / 2, label=1)])
                multimask = True
            request = segmentation_pb2.SegmentRequest(
                image=image, prompt=prompt_set, options=segmentation_pb2.SegmentOptions(multimask=multimask))
            timeout = self.timeout_seconds
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise Unavailable("segmentation: the deadline expired before the masks were computed")
            try:
                response = stub.Segment(request, timeout=timeout, metadata=((REQUEST_ID_KEY, request_id),))
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(f"mask_prompts[{i}]", f"segmentation refused it: {error.details()}") \
                        from None
                raise Unavailable(f"the segmentation service at {self.address} failed for images[{i}] "
                                  f"({code.name}: {error.details()}); give masks or retry") from None
            result = response.result
            masks.append(result.candidates[result.best_index].mask)
        return masks

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
