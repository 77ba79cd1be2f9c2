"""``atelier.aio`` Personalization client: the same calls as ``atelier.sdk.personalization``,
awaited; ``AsyncJob`` follows a job with ``await job.wait()`` / ``async for event in job.events()``."""
from __future__ import annotations

import contextlib
import os
from typing import Any, AsyncGenerator, AsyncIterator, Mapping, Optional, Sequence, Union

from atelier.aio.transport import AsyncTransport
from atelier.sdk.common import ImageLike
from atelier.sdk.errors import CancelledError, UnavailableError
from atelier.sdk.personalization import (
    _TERMINAL,
    Concept,
    GenerateConceptResult,
    JobEvent,
    JobSnapshot,
    LayerEditResult,
    MaskLike,
    PersonalizationClient,
    WaitCollector,
    WatchFollower,
    cancel_job_request,
    concept_id_of,
    create_job_request,
    generate_concept_request,
    layer_edit_request,
    list_jobs_request,
    read_concept_file,
    save_export,
    watch_job_request,
)
from atelier.sdk.progress import CancelToken, ProgressArg, make_sink
from atelier.v1 import personalization_pb2, personalization_pb2_grpc

__all__ = ["AsyncPersonalizationClient", "AsyncJob"]


class AsyncJob(JobSnapshot):
    """A training job of ``atelier.aio``; see ``atelier.sdk.personalization.Job``."""

    def __init__(self, client: "AsyncPersonalizationClient", msg: personalization_pb2.Job):
        self._client = client
        self._set(msg)

    async def refresh(self) -> "AsyncJob":
        self._set(await self._client._get_job(self.id))
        return self

    async def cancel(self, reason: str = "") -> "AsyncJob":
        self._set(await self._client._unary("CancelJob", cancel_job_request(self.id, reason)))
        return self

    async def events(self, from_index: int = 0, timeout: Optional[float] = None,
                     cancel: Optional[CancelToken] = None) -> AsyncGenerator[JobEvent, None]:
        """The job's events from ``from_index`` until it ends, reconnecting on UNAVAILABLE."""
        follower = WatchFollower(from_index, timeout, self._client.max_watch_reconnects)
        while True:
            try:
                # aclosing: leaving early (a terminal event, the caller stopping) ends the RPC now.
                async with contextlib.aclosing(self._client._watch(self.id, follower.next_index,
                                                                   follower.remaining(), cancel)) as stream:
                    async for msg in stream:
                        event = follower.take(msg)
                        yield event
                        if event.state in _TERMINAL:
                            return
                if follower.finished(await self.refresh()):
                    return
            except UnavailableError:
                delay = follower.reconnect_delay()
                if delay is None:
                    raise
                if await self._client._transport._sleep(delay, cancel):
                    raise CancelledError("the call was cancelled by the caller") from None

    async def wait(self, progress: ProgressArg = None, timeout: Optional[float] = None,
                   cancel: Optional[CancelToken] = None) -> Union[Concept, LayerEditResult]:
        """Follow the job to its end; returns its Concept, or a layer_edit job's LayerEditResult
        (as ``Job.wait``)."""
        sink = make_sink(progress)
        collector = WaitCollector(sink)
        try:
            async with contextlib.aclosing(self.events(0, timeout=timeout, cancel=cancel)) as events:
                async for event in events:
                    collector.take(event)
        finally:
            sink.close()
        await self.refresh()
        if self.state == "SUCCEEDED":
            return collector.result(self, await self._client.concept(self.concept_id))
        raise self.outcome_error()


class AsyncPersonalizationClient:
    """``client.personalization`` of ``atelier.aio.Client``; see
    ``atelier.sdk.personalization.PersonalizationClient`` for the arguments."""

    max_watch_reconnects = PersonalizationClient.max_watch_reconnects

    def __init__(self, transport: AsyncTransport):
        self._transport = transport

    def _stub(self) -> personalization_pb2_grpc.PersonalizationStub:
        return personalization_pb2_grpc.PersonalizationStub(self._transport.channel)

    async def _unary(self, name: str, request: Any, timeout: Optional[float] = None, retry: bool = True) -> Any:
        return await self._transport.unary(getattr(self._stub(), name), request, timeout, retry=retry)

    async def _get_job(self, job_id: str) -> personalization_pb2.Job:
        job: personalization_pb2.Job = await self._unary("GetJob", personalization_pb2.GetJobRequest(job_id=job_id))
        return job

    def _watch(self, job_id: str, from_index: int, timeout: Optional[float],
               cancel: Optional[CancelToken]) -> AsyncGenerator[personalization_pb2.JobEvent, None]:
        return self._transport.iterate(self._stub().WatchJob, watch_job_request(job_id, from_index), timeout,
                                       cancel=cancel)

    async def train_eqdiff(
        self,
        images: Sequence[Union[ImageLike, str, bytes]],
        class_word: str,
        masks: Optional[Sequence[MaskLike]] = None,
        steps: int = 600,
        *,
        mask_prompts: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
        placeholder_token: Optional[str] = None,
        initializer_token: Optional[str] = None,
        seed: Optional[int] = None,
        class_images: Optional[Sequence[Union[ImageLike, str, bytes]]] = None,
        model: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        timeout: Optional[float] = None,
        **options: Any,
    ) -> AsyncJob:
        request = create_job_request(
            images, class_word, masks, steps, mask_prompts=mask_prompts, placeholder_token=placeholder_token,
            initializer_token=initializer_token, seed=seed, class_images=class_images, model=model,
            idempotency_key=idempotency_key, options=options)
        # Retrying CreateJob is safe only with a key (the same key returns the same job).
        return AsyncJob(self, await self._unary("CreateJob", request, timeout, retry=bool(idempotency_key)))

    async def layer_edit(
        self,
        image: Union[ImageLike, str, bytes],
        object_text: str,
        background_text: str,
        reference: Optional[Union[ImageLike, str, bytes]] = None,
        embedding_steps: int = 500,
        finetune_steps: int = 250,
        num_inference_steps: int = 50,
        *,
        mask: Optional[MaskLike] = None,
        mask_prompt: Optional[Mapping[str, Any]] = None,
        reference_mask: Optional[MaskLike] = None,
        reference_mask_prompt: Optional[Mapping[str, Any]] = None,
        seed: Optional[int] = None,
        model: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        timeout: Optional[float] = None,
        **options: Any,
    ) -> AsyncJob:
        request = layer_edit_request(
            image, object_text, background_text, reference, embedding_steps, finetune_steps, num_inference_steps,
            mask=mask, mask_prompt=mask_prompt, reference_mask=reference_mask,
            reference_mask_prompt=reference_mask_prompt, seed=seed, model=model, idempotency_key=idempotency_key,
            options=options)
        return AsyncJob(self, await self._unary("CreateJob", request, timeout, retry=bool(idempotency_key)))

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._get_job(job_id))

    async def jobs(self, states: Optional[Sequence[str]] = None, page_size: int = 50) -> AsyncIterator[AsyncJob]:
        """All jobs, newest first (paged transparently): ``async for job in client.personalization.jobs()``."""
        token = ""
        while True:
            response = await self._unary("ListJobs", list_jobs_request(states, page_size, token))
            for msg in response.jobs:
                yield AsyncJob(self, msg)
            token = response.next_page_token
            if not token:
                return

    async def concept(self, concept_id: str) -> Concept:
        return Concept.from_proto(await self._unary("GetConcept", personalization_pb2.GetConceptRequest(
            concept_id=concept_id)))

    async def concepts(self, page_size: int = 50) -> list[Concept]:
        found: list[Concept] = []
        token = ""
        while True:
            response = await self._unary("ListConcepts", personalization_pb2.ListConceptsRequest(
                page_size=page_size, page_token=token))
            found.extend(Concept.from_proto(msg) for msg in response.concepts)
            token = response.next_page_token
            if not token:
                return found

    async def delete_concept(self, concept: Union[Concept, str]) -> None:
        await self._unary("DeleteConcept", personalization_pb2.DeleteConceptRequest(concept_id=concept_id_of(concept)))

    async def export(self, concept: Union[Concept, str], path: Union[str, "os.PathLike[str]", None] = None) -> bytes:
        response = await self._unary("ExportConcept", personalization_pb2.ExportConceptRequest(
            concept_id=concept_id_of(concept)))
        return save_export(response.safetensors, path)

    async def import_(self, data: Union[bytes, str, "os.PathLike[str]"]) -> Concept:
        return Concept.from_proto(await self._unary("ImportConcept", personalization_pb2.ImportConceptRequest(
            safetensors=read_concept_file(data))))

    async def generate(
        self,
        concept: Union[Concept, str],
        prompt: str,
        negative_prompt: str = "",
        num_inference_steps: int = 50,
        guidance_scale: Optional[float] = None,
        seed: int = 0,
        num_images: int = 1,
        model: Optional[str] = None,
        progress: ProgressArg = None,
        timeout: Optional[float] = None,
        cancel: Optional[CancelToken] = None,
    ) -> GenerateConceptResult:
        request = generate_concept_request(concept, prompt, negative_prompt, num_inference_steps, guidance_scale,
                                           seed, num_images, model)
        return GenerateConceptResult.from_proto(
            await self._transport.stream(self._stub().Generate, request, timeout, progress, cancel=cancel))
