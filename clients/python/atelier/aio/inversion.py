"""``atelier.aio`` Inversion client: the same calls as ``atelier.sdk.inversion``, awaited."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from atelier.aio.transport import AsyncTransport
from atelier.sdk.common import ImageLike
from atelier.sdk.inversion import (EDIT_DOC, INVERT_DOC, EditResult, EditSource, Inversion, edit_request,
                                   invert_request, with_concept)
from atelier.sdk.progress import CancelToken, ProgressArg
from atelier.v1 import inversion_pb2_grpc

__all__ = ["AsyncInversionClient"]


class AsyncInversionClient:
    """``client.inversion`` of ``atelier.aio.Client``: the arguments of
    ``atelier.sdk.inversion.InversionClient``, awaited. Cancel a call with ``cancel=`` or by
    cancelling its task."""

    def __init__(self, transport: AsyncTransport):
        self._transport = transport

    def _stub(self) -> inversion_pb2_grpc.InversionStub:
        return inversion_pb2_grpc.InversionStub(self._transport.channel)

    async def invert(
        self,
        image: ImageLike,
        prompt: str,
        method: str = "spdinv",
        num_inference_steps: int = 50,
        return_chain: bool = False,
        max_rounds: Optional[int] = None,
        learning_rate: Optional[float] = None,
        loss_threshold: Optional[float] = None,
        weight_decay: Optional[float] = None,
        model: Optional[str] = None,
        progress: ProgressArg = None,
        timeout: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
        *,
        check_first: Optional[bool] = None,
        anderson_memory: Optional[int] = None,
        null_text_guidance_scale: Optional[float] = None,
    ) -> Inversion:
        request = invert_request(image, prompt, method, num_inference_steps, return_chain, max_rounds,
                                 learning_rate, loss_threshold, weight_decay, model, check_first=check_first,
                                 anderson_memory=anderson_memory, null_text_guidance_scale=null_text_guidance_scale)
        return Inversion.from_proto(await self._transport.stream(self._stub().Invert, request, timeout, progress,
                                                                cancel=cancel))

    invert.__doc__ = INVERT_DOC

    async def edit(
        self,
        source: EditSource,
        target_prompt: str,
        engine: str = "p2p",
        guidance_scale: Optional[float] = None,
        *,
        return_source: bool = False,
        source_prompt: Optional[str] = None,
        method: Optional[str] = None,
        num_inference_steps: Optional[int] = None,
        max_rounds: Optional[int] = None,
        learning_rate: Optional[float] = None,
        loss_threshold: Optional[float] = None,
        weight_decay: Optional[float] = None,
        check_first: Optional[bool] = None,
        anderson_memory: Optional[int] = None,
        null_text_guidance_scale: Optional[float] = None,
        preset: Optional[str] = None,
        proximal_guidance: Optional[bool] = None,
        quantile: Optional[float] = None,
        inversion_guidance: Optional[bool] = None,
        inversion_guidance_timestep: Optional[int] = None,
        mode: Optional[str] = None,
        cross_replace_fraction: Optional[float] = None,
        self_replace_fraction: Optional[float] = None,
        reweight: Optional[dict[str, float]] = None,
        blend_words: Optional[Sequence[str]] = None,
        blend_threshold: Optional[float] = None,
        start_step: Optional[int] = None,
        start_layer: Optional[int] = None,
        end_step: Optional[int] = None,
        mask_source_words: Optional[Sequence[str]] = None,
        mask_target_words: Optional[Sequence[str]] = None,
        mask_threshold: Optional[float] = None,
        model: Optional[str] = None,
        progress: ProgressArg = None,
        timeout: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
        concept: Any = None,
    ) -> EditResult:
        request = edit_request(
            source, target_prompt, engine, guidance_scale, return_source=return_source, source_prompt=source_prompt,
            method=method, num_inference_steps=num_inference_steps, max_rounds=max_rounds,
            learning_rate=learning_rate, loss_threshold=loss_threshold, weight_decay=weight_decay,
            check_first=check_first, anderson_memory=anderson_memory,
            null_text_guidance_scale=null_text_guidance_scale, preset=preset, proximal_guidance=proximal_guidance,
            quantile=quantile, inversion_guidance=inversion_guidance,
            inversion_guidance_timestep=inversion_guidance_timestep, mode=mode,
            cross_replace_fraction=cross_replace_fraction, self_replace_fraction=self_replace_fraction,
            reweight=reweight, blend_words=blend_words, blend_threshold=blend_threshold, start_step=start_step,
            start_layer=start_layer, end_step=end_step, mask_source_words=mask_source_words,
            mask_target_words=mask_target_words, mask_threshold=mask_threshold, model=model,
        )
        with_concept(request, concept)
        return EditResult.from_proto(await self._transport.stream(self._stub().Edit, request, timeout, progress,
                                                                cancel=cancel))

    edit.__doc__ = EDIT_DOC
