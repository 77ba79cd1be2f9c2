"""Segmentation service: proto <-> method translation only (no tensor math here)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from atelier.core.admission import charge_response
from atelier.core.catalog import ListModelsRpc
from atelier.core.control import CallControl
from atelier.core.errors import InvalidArgument
from atelier.core.executor import ComputeExecutor
from atelier.core.streaming import control_for_context
from atelier.sdk import codec
from atelier.segmentation.sam import MaskCandidates, Prompt
from atelier.segmentation.segmenter import SegmentOutput, Segmenter
from atelier.v1 import common_pb2, segmentation_pb2, segmentation_pb2_grpc

SERVICE_NAME = segmentation_pb2.DESCRIPTOR.services_by_name["Segmentation"].full_name
MAX_PROMPT_SETS = 256
MAX_POINTS = 64


class SegmentationServicer(ListModelsRpc, segmentation_pb2_grpc.SegmentationServicer):
    """``segmenter_for(model_name, remaining) -> (resolved name, Segmenter)`` (NotFound for unknown names);
    ``registry`` answers ListModels."""

    def __init__(self, segmenter_for: Callable[[str, Optional[float]], tuple[str, Segmenter]], executor: ComputeExecutor,
                 max_image_pixels: int, registry=None, default_model: str = ""):
        self._segmenter_for = segmenter_for
        self._executor = executor
        self._max_image_pixels = max_image_pixels
        self.model_registry, self.default_model_name = registry, default_model

    def Segment(self, request: segmentation_pb2.SegmentRequest, context) -> segmentation_pb2.SegmentResponse:
        name, segmenter = self._segmenter(request, context)
        image = codec.image_to_pil(request.image, "image", max_pixels=self._max_image_pixels)
        charge_response(answer_bytes(image, 1, request.options.multimask, segmenter.low_res_size), "image")
        # Violations name the SDK arguments: segment(points=, labels=, boxes=, mask_input=).
        prompt = prompt_from_proto(request.prompt, "")
        output = self._run(context, segmenter, image, [prompt], request.options, [""])
        return segmentation_pb2.SegmentResponse(
            model=common_pb2.ModelRef(name=name), width=output.width, height=output.height,
            result=result_to_proto(output.results[0]), usage=usage_to_proto(output))

    def SegmentBatch(self, request: segmentation_pb2.SegmentBatchRequest,
                     context) -> segmentation_pb2.SegmentBatchResponse:
        name, segmenter = self._segmenter(request, context)
        if len(request.prompt_sets) > MAX_PROMPT_SETS:
            raise InvalidArgument("prompt_sets", f"{len(request.prompt_sets)} prompt sets; the limit is {MAX_PROMPT_SETS}")
        image = codec.image_to_pil(request.image, "image", max_pixels=self._max_image_pixels)
        # Refused before any work when the masks could not be sent (or do not fit the budget now).
        charge_response(answer_bytes(image, len(request.prompt_sets), request.options.multimask,
                                     segmenter.low_res_size),
                        "prompt_sets", "fewer prompt sets per call, multimask off, or a smaller image")
        fields = [f"prompt_sets[{i}]" for i in range(len(request.prompt_sets))]
        prompts = [prompt_from_proto(p, field) for p, field in zip(request.prompt_sets, fields)]
        output = self._run(context, segmenter, image, prompts, request.options, fields)
        return segmentation_pb2.SegmentBatchResponse(
            model=common_pb2.ModelRef(name=name), width=output.width, height=output.height,
            results=[result_to_proto(r) for r in output.results], usage=usage_to_proto(output))

    def _segmenter(self, request, context) -> tuple[str, Segmenter]:
        """The request's model, waiting for a load no longer than the call's deadline allows."""
        return self._segmenter_for(request.model.name, context.time_remaining())

    def _run(self, context, segmenter: Segmenter, image, prompts, options, fields) -> SegmentOutput:
        threshold = options.mask_threshold if options.HasField("mask_threshold") else 0.0
        if not math.isfinite(threshold):
            raise InvalidArgument("mask_threshold", f"must be finite, got {threshold}")
        control: CallControl = control_for_context(context, self._executor)
        return segmenter.segment(image, prompts, multimask=options.multimask, mask_threshold=threshold,
                                 control=control, prompt_fields=fields)


def answer_bytes(image, prompt_sets: int, multimask: bool, low_res_size: int) -> int:
    """The response's size: per candidate a BOOL mask at the input size and FP32 low-res logits."""
    candidates = prompt_sets * (3 if multimask else 1)
    return candidates * (image.width * image.height + 4 * low_res_size * low_res_size + 128) + 1024


def prompt_from_proto(msg: segmentation_pb2.PromptSet, field: str) -> Prompt:
    """Decode one PromptSet; value checks against the image happen in the method.

    ``field`` names the SDK argument holding the set ("" when its parts are arguments)."""
    prefix = f"{field}." if field else ""
    if len(msg.points) > MAX_POINTS:
        raise InvalidArgument(f"{prefix}points", f"{len(msg.points)} points; the limit is {MAX_POINTS}")
    mask_input = None
    if msg.HasField("mask_input"):
        if msg.mask_input.datatype != "FP32":
            raise InvalidArgument(f"{prefix}mask_input",
                                  f"low-res mask logits must be FP32, got {msg.mask_input.datatype!r}")
        mask_input = codec.tensor_to_numpy(msg.mask_input, f"{prefix}mask_input")
    return Prompt.of(
        points=[(p.x, p.y) for p in msg.points],
        labels=[p.label for p in msg.points],
        boxes=[(b.x0, b.y0, b.x1, b.y1) for b in msg.boxes],
        mask_input=mask_input,
    )


def result_to_proto(result: MaskCandidates) -> segmentation_pb2.SegmentResult:
    return segmentation_pb2.SegmentResult(
        candidates=[
            segmentation_pb2.MaskCandidate(
                mask=codec.mask_from_numpy(np.ascontiguousarray(mask)),
                score=float(score),
                low_res_logits=codec.tensor_from_numpy(np.ascontiguousarray(logits, dtype=np.float32),
                                                       name="low_res_logits"),
            )
            for mask, score, logits in zip(result.masks, result.scores, result.low_res_logits)
        ],
        best_index=result.best_index,
    )


def usage_to_proto(output: SegmentOutput) -> segmentation_pb2.SegmentationUsage:
    return segmentation_pb2.SegmentationUsage(
        embedding_cached=output.embedding_cached,
        encoder_batch_size=output.encoder_batch_size,
        usage=common_pb2.Usage(wall_seconds=output.wall_seconds, queue_seconds=output.queue_seconds),
    )
