"""Client of the Segmentation service: SAM masks from point / box / mask prompts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from atelier.sdk import codec
from atelier.sdk.common import ImageLike, Usage, describe_array, to_image_proto
from atelier.sdk.progress import CancelToken
from atelier.sdk.transport import _Transport
from atelier.v1 import common_pb2, segmentation_pb2, segmentation_pb2_grpc

__all__ = ["SegmentationClient", "Segmentation", "PromptSet", "segment_request", "segment_many_request"]

Point = Sequence[float]  # (x, y) in input-image pixels
Box = Sequence[float]  # (x0, y0, x1, y1)


@dataclass(frozen=True, eq=False)
class Segmentation:
    """The masks for one prompt set.

    ``masks``: (K, H, W) bool at the input resolution (K = 3 with ``multimask``, else 1);
    ``scores``: (K,) predicted IoU; ``low_res_logits``: (K, h, w) float32, which can be fed
    back as ``mask_input`` to refine; ``best_index``: the candidate with the highest score.
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    best_index: int
    width: int
    height: int
    model: str
    embedding_cached: bool
    encoder_batch_size: int
    usage: Usage
    proto: segmentation_pb2.SegmentResult = field(repr=False)

    @property
    def mask(self) -> np.ndarray:
        """The best candidate's (H, W) bool mask."""
        return np.asarray(self.masks[self.best_index])

    @property
    def score(self) -> float:
        return float(self.scores[self.best_index])

    @property
    def logits(self) -> np.ndarray:
        """The best candidate's low-res logits (pass as ``mask_input`` to refine)."""
        return np.asarray(self.low_res_logits[self.best_index])

    def __repr__(self) -> str:
        return (f"Segmentation(model={self.model!r}, size={self.width}x{self.height}, "
                f"masks={describe_array(self.masks)}, scores={[round(float(v), 3) for v in self.scores]}, "
                f"best_index={self.best_index}, embedding_cached={self.embedding_cached}, usage={self.usage!r})")

    @classmethod
    def from_proto(cls, msg: segmentation_pb2.SegmentResult,
                   response: Union[segmentation_pb2.SegmentResponse, segmentation_pb2.SegmentBatchResponse],
                   index: int = 0) -> "Segmentation":
        field_name = "result" if isinstance(response, segmentation_pb2.SegmentResponse) else f"results[{index}]"
        candidates = msg.candidates
        if not candidates:
            raise codec.CodecError(f"{field_name}.candidates", "the server returned no mask")
        masks = np.stack([codec.mask_to_numpy(c.mask, f"{field_name}.candidates[{i}].mask")
                          for i, c in enumerate(candidates)])
        logits = np.stack([codec.tensor_to_numpy(c.low_res_logits, f"{field_name}.candidates[{i}].low_res_logits")
                           for i, c in enumerate(candidates)])
        usage = response.usage
        return cls(
            masks=masks,
            scores=np.array([c.score for c in candidates], dtype=np.float32),
            low_res_logits=logits,
            best_index=msg.best_index,
            width=response.width,
            height=response.height,
            model=response.model.name,
            embedding_cached=usage.embedding_cached,
            encoder_batch_size=usage.encoder_batch_size,
            usage=Usage.from_proto(usage.usage),
            proto=msg,
        )


@dataclass(frozen=True)
class PromptSet:
    """One object's prompts for ``segment_many``. ``labels`` default to 1 (positive) per point."""

    points: Sequence[Point] = ()
    labels: Optional[Sequence[int]] = None
    boxes: Union[Box, Sequence[Box], None] = None
    mask_input: Union[np.ndarray, Segmentation, None] = None


PromptSetLike = Union[PromptSet, Mapping[str, Any]]
MaskInput = Union[np.ndarray, Segmentation, None]


def _boxes(boxes: Union[Box, Sequence[Box], None]) -> list[tuple[float, ...]]:
    if boxes is None:
        return []
    array = np.asarray(boxes, dtype=np.float64)
    if array.shape == (4,):
        return [tuple(float(v) for v in array)]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes: expected (x0, y0, x1, y1) or a list of them, got shape {array.shape}")
    return [tuple(float(v) for v in b) for b in array]


def _prompt_proto(points: Optional[Sequence[Point]], labels: Optional[Sequence[int]],
                  boxes: Union[Box, Sequence[Box], None], mask_input: MaskInput,
                  argument: str) -> segmentation_pb2.PromptSet:
    xys = [] if points is None else [tuple(p) for p in points]
    if any(len(p) != 2 for p in xys):
        raise ValueError(f"{argument}points: each point is (x, y)")
    label_values = [1] * len(xys) if labels is None else [int(v) for v in labels]
    if len(label_values) != len(xys):
        raise ValueError(f"{argument}labels: {len(label_values)} labels for {len(xys)} points")
    msg = segmentation_pb2.PromptSet(
        points=[segmentation_pb2.Point(x=float(x), y=float(y), label=label)
                for (x, y), label in zip(xys, label_values)],
        boxes=[segmentation_pb2.Box(x0=b[0], y0=b[1], x1=b[2], y1=b[3]) for b in _boxes(boxes)],
    )
    if isinstance(mask_input, Segmentation):
        mask_input = mask_input.logits
    if mask_input is not None:
        msg.mask_input.CopyFrom(codec.tensor_from_numpy(np.asarray(mask_input, dtype=np.float32),
                                                         f"{argument}mask_input"))
    return msg


def _options(multimask: bool, mask_threshold: Optional[float]) -> segmentation_pb2.SegmentOptions:
    options = segmentation_pb2.SegmentOptions(multimask=bool(multimask))
    if mask_threshold is not None:
        options.mask_threshold = float(mask_threshold)
    return options


def segment_request(
    image: ImageLike,
    points: Optional[Sequence[Point]] = None,
    labels: Optional[Sequence[int]] = None,
    boxes: Union[Box, Sequence[Box], None] = None,
    mask_input: MaskInput = None,
    multimask: bool = False,
    mask_threshold: Optional[float] = None,
    model: Optional[str] = None,
) -> segmentation_pb2.SegmentRequest:
    """The SegmentRequest for ``segment``'s arguments (shared by the sync and asyncio clients)."""
    return segmentation_pb2.SegmentRequest(
        model=common_pb2.ModelRef(name=model or ""),
        image=to_image_proto(image),
        prompt=_prompt_proto(points, labels, boxes, mask_input, ""),
        options=_options(multimask, mask_threshold),
    )


def segment_many_request(
    image: ImageLike,
    prompt_sets: Iterable[PromptSetLike],
    multimask: bool = False,
    mask_threshold: Optional[float] = None,
    model: Optional[str] = None,
) -> segmentation_pb2.SegmentBatchRequest:
    """The SegmentBatchRequest for ``segment_many``'s arguments."""
    prompts = []
    for i, item in enumerate(prompt_sets):
        prompt_set = item if isinstance(item, PromptSet) else PromptSet(**dict(item))
        prompts.append(_prompt_proto(prompt_set.points, prompt_set.labels, prompt_set.boxes, prompt_set.mask_input,
                                     f"prompt_sets[{i}]."))
    if not prompts:
        raise ValueError("prompt_sets: give at least one prompt set")
    return segmentation_pb2.SegmentBatchRequest(
        model=common_pb2.ModelRef(name=model or ""),
        image=to_image_proto(image),
        prompt_sets=prompts,
        options=_options(multimask, mask_threshold),
    )


def segmentation_of(response: segmentation_pb2.SegmentResponse) -> Segmentation:
    return Segmentation.from_proto(response.result, response)


def segmentations_of(response: segmentation_pb2.SegmentBatchResponse) -> list[Segmentation]:
    return [Segmentation.from_proto(result, response, i) for i, result in enumerate(response.results)]


class SegmentationClient:
    """``client.segmentation``: SAM masks. Calls are idempotent and retried on UNAVAILABLE
    (and on RESOURCE_EXHAUSTED with RetryInfo).

    Coordinates are input-image pixels (x right, y down). Every call takes ``timeout``
    (seconds; default: the client's) and ``cancel`` (an ``atelier.CancelToken``).
    """

    def __init__(self, transport: _Transport):
        self._transport = transport
        self._stub = segmentation_pb2_grpc.SegmentationStub(transport.channel)

    def segment(
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
        """Masks for one object: ``points`` with ``labels`` (1 inside, 0 outside; default all
        1), at most one box, optionally ``mask_input`` (a previous result or its low-res
        logits). ``multimask=True`` returns 3 candidates; ``.mask`` is the best one."""
        request = segment_request(image, points, labels, boxes, mask_input, multimask, mask_threshold, model)
        return segmentation_of(self._transport.unary(self._stub.Segment, request, timeout, cancel=cancel))

    def segment_many(
        self,
        image: ImageLike,
        prompt_sets: Iterable[PromptSetLike],
        multimask: bool = False,
        mask_threshold: Optional[float] = None,
        model: Optional[str] = None,
        timeout: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
    ) -> list[Segmentation]:
        """Masks for several objects in one image with one encoder pass. Each prompt set is
        a ``PromptSet`` or a dict with the same keys (points, labels, boxes, mask_input)."""
        request = segment_many_request(image, prompt_sets, multimask, mask_threshold, model)
        return segmentations_of(self._transport.unary(self._stub.SegmentBatch, request, timeout, cancel=cancel))
