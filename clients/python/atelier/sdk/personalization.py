"""Client of the Personalization service: concept-training jobs, concepts, generation.

    job = client.personalization.train_eqdiff(images, class_word="box", steps=600)
    concept = job.wait(progress=True)           # tqdm bar over steps, loss in the postfix
    images = client.personalization.generate(concept, f"a {concept.token} on a blue background", seed=0)

Jobs are durable on the server: ``wait`` resumes its watch after a dropped connection (or a
replica restart) from the last event it saw, so it misses no event and sees none twice.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image as PILImage

from atelier.sdk import codec
from atelier.sdk.common import ImageLike, Usage, set_present, to_image_proto
from atelier.sdk.errors import AtelierError, CancelledError, UnavailableError
from atelier.sdk.progress import CancelToken, Progress, ProgressArg, _ProgressSink, make_sink
from atelier.sdk.transport import _Transport
from atelier.v1 import common_pb2, personalization_pb2, personalization_pb2_grpc, segmentation_pb2, tensor_pb2

__all__ = ["PersonalizationClient", "Job", "JobEvent", "Concept", "GenerateConceptResult", "LayerEditResult",
           "JobFailedError", "JobCancelledError", "STATES", "create_job_request", "layer_edit_request",
           "list_jobs_request", "generate_concept_request"]

STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
_TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
_EQDIFF_FIELDS = frozenset(f.name for f in personalization_pb2.EqDiffOptions.DESCRIPTOR.fields)
_LAYER_EDIT_FIELDS = frozenset(f.name for f in personalization_pb2.LayerEditOptions.DESCRIPTOR.fields) - {
    "object_text", "background_text", "reference", "reference_mask", "reference_mask_prompt"}

MaskLike = Union[np.ndarray, PILImage.Image, tensor_pb2.Mask]


class JobFailedError(AtelierError):
    """The job ended FAILED; ``job`` is its final record, ``message`` the reason."""

    def __init__(self, job: "JobSnapshot"):
        self.job = job
        super().__init__(f"job {job.id} failed: {job.reason}")


class JobCancelledError(CancelledError):
    """The job ended CANCELLED."""

    def __init__(self, job: "JobSnapshot"):
        self.job = job
        super().__init__(f"job {job.id} was cancelled: {job.reason}")


@dataclass(frozen=True)
class Concept:
    """A trained (or imported) concept. Write ``token`` in Generate prompts."""

    id: str
    token: str
    class_word: str
    model: str
    method: str
    job_id: str
    content_hash: str
    size_bytes: int
    metadata: Mapping[str, str] = field(repr=False)

    @classmethod
    def from_proto(cls, msg: personalization_pb2.Concept) -> "Concept":
        return cls(msg.id, msg.placeholder_token, msg.class_word, msg.model.name, msg.method, msg.job_id,
                   msg.content_hash, msg.size_bytes, dict(msg.metadata))


@dataclass(frozen=True)
class JobEvent:
    index: int
    state: str
    step: int
    total_steps: int
    losses: Mapping[str, float]
    phase: str
    message: str
    time: float
    concept_id: str
    preview: Optional[PILImage.Image] = field(default=None, repr=False)  # e.g. a layer_edit result image

    @classmethod
    def from_proto(cls, msg: personalization_pb2.JobEvent) -> "JobEvent":
        preview = codec.image_to_pil(msg.preview, "preview") if msg.HasField("preview") and msg.preview.data \
            else None
        return cls(msg.index, personalization_pb2.JobState.Name(msg.state), msg.step, msg.total_steps,
                   dict(msg.losses), msg.phase, msg.message, msg.time, msg.concept_id, preview)


@dataclass(frozen=True, eq=False)
class LayerEditResult:
    """A finished layer_edit job: the edited images and the concept that draws more of them
    (``client.personalization.generate(result.concept, "", seed=s, guidance_scale=7.5)``: image k
    of the job is seed job_seed + k)."""

    images: list[PILImage.Image]
    concept: "Concept"

    @property
    def image(self) -> PILImage.Image:
        return self.images[0]


@dataclass(frozen=True, eq=False)
class GenerateConceptResult:
    images: list[PILImage.Image]
    concept_id: str
    model: str
    seed: int
    usage: Usage

    @property
    def image(self) -> PILImage.Image:
        return self.images[0]

    @classmethod
    def from_proto(cls, msg: personalization_pb2.GenerateConceptResult) -> "GenerateConceptResult":
        images = [codec.image_to_pil(image, f"result.images[{i}]") for i, image in enumerate(msg.images)]
        return cls(images, msg.concept_id, msg.model.name, msg.seed, Usage.from_proto(msg.usage))


class JobSnapshot:
    """A job's fields as last read from the server (shared by the sync and asyncio ``Job``)."""

    def _set(self, msg: personalization_pb2.Job) -> None:
        self.proto = msg
        self.id = msg.id
        self.state = personalization_pb2.JobState.Name(msg.state)
        self.reason = msg.reason
        self.step = msg.step
        self.total_steps = msg.total_steps
        self.concept_id = msg.concept_id
        self.attempts = msg.attempts
        self.checkpoint_step = msg.checkpoint_step
        self.placeholder_token = msg.placeholder_token
        self.cancel_requested = msg.cancel_requested

    @property
    def done(self) -> bool:
        return self.state in _TERMINAL

    def outcome_error(self) -> AtelierError:
        """What ``wait`` raises for a job that ended without a concept."""
        if self.state == "CANCELLED":
            return JobCancelledError(self)
        return JobFailedError(self)

    def __repr__(self) -> str:
        return f"Job({self.id!r}, state={self.state}, step={self.step}/{self.total_steps})"


class WatchFollower:
    """The rules of following a job's events across reconnects (sync and asyncio ``events``):
    resume from the event after the last one seen; back off on UNAVAILABLE up to
    ``max_reconnects`` times in a row, within the deadline."""

    def __init__(self, from_index: int, timeout: Optional[float], max_reconnects: int):
        self.next_index = from_index
        self._failures = 0
        self._max_reconnects = max_reconnects
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> Optional[float]:
        return None if self._deadline is None else max(0.001, self._deadline - time.monotonic())

    def take(self, msg: personalization_pb2.JobEvent) -> JobEvent:
        event = JobEvent.from_proto(msg)
        self.next_index = event.index + 1
        self._failures = 0
        return event

    def finished(self, job: JobSnapshot) -> bool:
        """After the stream ended: the job ended and every event of it was seen."""
        return job.done and self.next_index >= job.proto.next_event_index

    def reconnect_delay(self) -> Optional[float]:
        """The wait before watching again after UNAVAILABLE; None: give up (re-raise)."""
        self._failures += 1
        if self._failures > self._max_reconnects:
            return None
        delay = min(5.0, 0.2 * 2 ** (self._failures - 1)) * (0.5 + 0.5 * random.random())
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            return None
        return delay


class WaitCollector:
    """What ``wait`` (sync and asyncio) makes of a job's events: progress for the sink, and a
    layer_edit job's result images (the "sample" phase's previews)."""

    def __init__(self, sink: _ProgressSink):
        self._sink = sink
        self._results: dict[int, PILImage.Image] = {}

    def take(self, event: JobEvent) -> None:
        if event.phase == "sample" and event.preview is not None:
            self._results[event.step] = event.preview
        if event.phase != "state" and event.total_steps:
            message = " ".join(f"{k}={v:.4g}" for k, v in sorted(event.losses.items()))
            self._sink(Progress(event.phase or "train", event.step, event.total_steps, message))

    def result(self, job: JobSnapshot, concept: Concept) -> Union[Concept, LayerEditResult]:
        """A succeeded job's result: its concept, or for a layer_edit job the images plus the concept."""
        if job.proto.method == "layer_edit":
            return LayerEditResult([self._results[step] for step in sorted(self._results)], concept)
        return concept


class Job(JobSnapshot):
    """A training job (a snapshot plus methods that ask the server). ``refresh()`` updates it."""

    def __init__(self, client: "PersonalizationClient", msg: personalization_pb2.Job):
        self._client = client
        self._set(msg)

    def refresh(self) -> "Job":
        self._set(self._client._get_job(self.id))
        return self

    def cancel(self, reason: str = "") -> "Job":
        """Ask the server to cancel; a running job stops within one step (``wait`` then raises
        ``JobCancelledError``)."""
        self._set(self._client._unary("CancelJob", cancel_job_request(self.id, reason)))
        return self

    def events(self, from_index: int = 0, timeout: Optional[float] = None,
               cancel: Optional[CancelToken] = None) -> Iterator[JobEvent]:
        """The job's events from ``from_index`` until it ends, reconnecting on UNAVAILABLE."""
        follower = WatchFollower(from_index, timeout, self._client.max_watch_reconnects)
        while True:
            try:
                for msg in self._client._watch(self.id, follower.next_index, follower.remaining(), cancel):
                    event = follower.take(msg)
                    yield event
                    if event.state in _TERMINAL:
                        return
                if follower.finished(self.refresh()):
                    return
            except UnavailableError:
                delay = follower.reconnect_delay()
                if delay is None:
                    raise
                if cancel is not None:
                    if cancel._sleep(delay):
                        raise CancelledError("the call was cancelled by the caller") from None
                else:
                    time.sleep(delay)

    def wait(self, progress: ProgressArg = None, timeout: Optional[float] = None,
             cancel: Optional[CancelToken] = None) -> Union[Concept, LayerEditResult]:
        """Follow the job to its end; returns its Concept (a layer_edit job: a LayerEditResult,
        the edited images plus the concept). ``progress=True``: a tqdm bar over the
        steps (one per phase, e.g. "class_images" then "train") with the losses in the postfix;
        a callable receives ``atelier.Progress`` events. Raises JobFailedError / JobCancelledError."""
        sink = make_sink(progress)
        collector = WaitCollector(sink)
        try:
            for event in self.events(0, timeout=timeout, cancel=cancel):
                collector.take(event)
        finally:
            sink.close()
        self.refresh()
        if self.state == "SUCCEEDED":
            return collector.result(self, self._client.concept(self.concept_id))
        raise self.outcome_error()


def _mask_proto(mask: MaskLike, argument: str) -> tensor_pb2.Mask:
    if isinstance(mask, tensor_pb2.Mask):
        return mask
    if isinstance(mask, PILImage.Image):
        mask = np.asarray(mask.convert("L")) > 0
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{argument}: a mask is (H, W), got shape {array.shape}")
    return codec.mask_from_numpy(array.astype(bool))


def _image_arg(image: Union[ImageLike, str, "os.PathLike[str]", bytes], argument: str) -> tensor_pb2.Image:
    if isinstance(image, (str, os.PathLike)):
        with PILImage.open(image) as opened:
            image = opened.convert("RGB")
    elif isinstance(image, bytes):
        return tensor_pb2.Image(data=image)
    return to_image_proto(image, argument)


def _mask_prompt(prompt: Optional[Mapping[str, Any]], argument: str) -> personalization_pb2.MaskPrompt:
    """None, or a dict with ``points`` [(x, y), ...] (positive) and/or ``box`` (x0, y0, x1, y1)."""
    msg = personalization_pb2.MaskPrompt()
    if prompt is None:
        return msg
    unknown = set(prompt) - {"points", "labels", "box"}
    if unknown:
        raise ValueError(f"{argument}: unknown keys {sorted(unknown)}; use points, labels, box")
    points = list(prompt.get("points") or [])
    labels = list(prompt.get("labels") or [1] * len(points))
    for (x, y), label in zip(points, labels):
        msg.points.append(segmentation_pb2.Point(x=float(x), y=float(y), label=int(label)))
    if prompt.get("box") is not None:
        x0, y0, x1, y1 = (float(v) for v in prompt["box"])
        msg.box.CopyFrom(segmentation_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    return msg


def create_job_request(
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
    options: Optional[Mapping[str, Any]] = None,
) -> personalization_pb2.CreateJobRequest:
    """The CreateJobRequest for ``train_eqdiff``'s arguments (shared by the sync and asyncio clients)."""
    options = dict(options or {})
    unknown = set(options) - _EQDIFF_FIELDS
    if unknown:
        raise TypeError(f"train_eqdiff: unknown EqDiff options {sorted(unknown)}; known: {sorted(_EQDIFF_FIELDS)}")
    eqdiff = personalization_pb2.EqDiffOptions(steps=int(steps))
    set_present(eqdiff, options)
    request = personalization_pb2.CreateJobRequest(
        model=common_pb2.ModelRef(name=model or ""),
        images=[_image_arg(image, f"images[{i}]") for i, image in enumerate(images)],
        masks=[_mask_proto(mask, f"masks[{i}]") for i, mask in enumerate(masks or [])],
        mask_prompts=[_mask_prompt(p, f"mask_prompts[{i}]") for i, p in enumerate(mask_prompts or [])],
        class_word=class_word, initializer_token=initializer_token or "",
        placeholder_token=placeholder_token or "",
        class_images=[_image_arg(image, f"class_images[{i}]") for i, image in enumerate(class_images or [])],
        idempotency_key=idempotency_key or "", eqdiff=eqdiff)
    if seed is not None:
        request.seed = int(seed)
    return request


def layer_edit_request(
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
    options: Optional[Mapping[str, Any]] = None,
) -> personalization_pb2.CreateJobRequest:
    """The CreateJobRequest for ``layer_edit``'s arguments (shared by the sync and asyncio clients)."""
    options = dict(options or {})
    unknown = set(options) - _LAYER_EDIT_FIELDS
    if unknown:
        raise TypeError(f"layer_edit: unknown options {sorted(unknown)}; known: {sorted(_LAYER_EDIT_FIELDS)}")
    body = personalization_pb2.LayerEditOptions(
        object_text=object_text, background_text=background_text, embedding_steps=int(embedding_steps),
        finetune_steps=int(finetune_steps), num_inference_steps=int(num_inference_steps))
    set_present(body, options)
    if reference is not None:
        body.reference.CopyFrom(_image_arg(reference, "reference"))
    if reference_mask is not None:
        body.reference_mask.CopyFrom(_mask_proto(reference_mask, "reference_mask"))
    if reference_mask_prompt is not None:
        body.reference_mask_prompt.CopyFrom(_mask_prompt(reference_mask_prompt, "reference_mask_prompt"))
    request = personalization_pb2.CreateJobRequest(
        model=common_pb2.ModelRef(name=model or ""), images=[_image_arg(image, "image")],
        masks=[_mask_proto(mask, "mask")] if mask is not None else [],
        mask_prompts=[_mask_prompt(mask_prompt, "mask_prompt")] if mask_prompt is not None else [],
        idempotency_key=idempotency_key or "", layer_edit=body)
    if seed is not None:
        request.seed = int(seed)
    return request


def watch_job_request(job_id: str, from_index: int) -> personalization_pb2.WatchJobRequest:
    return personalization_pb2.WatchJobRequest(job_id=job_id, from_index=from_index)


def cancel_job_request(job_id: str, reason: str = "") -> personalization_pb2.CancelJobRequest:
    return personalization_pb2.CancelJobRequest(job_id=job_id, reason=reason)


def list_jobs_request(states: Optional[Sequence[str]], page_size: int,
                      page_token: str) -> personalization_pb2.ListJobsRequest:
    """One page of ``jobs(states)``; an unknown state raises ValueError before anything is sent."""
    wanted: list[str] = []  # enum value names; protobuf accepts them for enum fields
    for state in states or ():
        if state.upper() not in STATES:
            raise ValueError(f"states: unknown state {state!r}; expected one of {STATES}")
        wanted.append(state.upper())
    return personalization_pb2.ListJobsRequest(page_size=page_size, page_token=page_token,
                                               states=wanted)


def concept_id_of(concept: Union[Concept, str]) -> str:
    return concept.id if isinstance(concept, Concept) else concept


def read_concept_file(data: Union[bytes, str, "os.PathLike[str]"]) -> bytes:
    """``import_``'s argument: exported bytes, or the path of a file holding them."""
    if isinstance(data, bytes):
        return data
    with open(data, "rb") as handle:
        return handle.read()


def save_export(data: bytes, path: Union[str, "os.PathLike[str]", None]) -> bytes:
    if path is not None:
        with open(path, "wb") as handle:
            handle.write(data)
    return data


def generate_concept_request(
    concept: Union[Concept, str],
    prompt: str,
    negative_prompt: str = "",
    num_inference_steps: int = 50,
    guidance_scale: Optional[float] = None,
    seed: int = 0,
    num_images: int = 1,
    model: Optional[str] = None,
) -> personalization_pb2.GenerateConceptRequest:
    """The GenerateConceptRequest for ``generate``'s arguments (shared by the sync and asyncio clients)."""
    request = personalization_pb2.GenerateConceptRequest(
        concept_id=concept_id_of(concept), model=common_pb2.ModelRef(name=model or ""), prompt=prompt,
        negative_prompt=negative_prompt, num_inference_steps=int(num_inference_steps),
        seed=int(seed), num_images=int(num_images))
    if guidance_scale is not None:
        request.guidance_scale = float(guidance_scale)
    return request


class PersonalizationClient:
    """``client.personalization``: training jobs, concepts and generation."""

    max_watch_reconnects = 20

    def __init__(self, transport: _Transport):
        self._transport = transport
        self._stub = personalization_pb2_grpc.PersonalizationStub(transport.channel)

    # ------------------------------------------------------------------ plumbing

    def _unary(self, name: str, request: Any, timeout: Optional[float] = None, retry: bool = True) -> Any:
        return self._transport.unary(getattr(self._stub, name), request, timeout, retry=retry)

    def _get_job(self, job_id: str) -> personalization_pb2.Job:
        return self._unary("GetJob", personalization_pb2.GetJobRequest(job_id=job_id))

    def _watch(self, job_id: str, from_index: int, timeout: Optional[float],
               cancel: Optional[CancelToken]) -> Iterator[personalization_pb2.JobEvent]:
        return self._transport.iterate(self._stub.WatchJob, watch_job_request(job_id, from_index), timeout,
                                       cancel=cancel)

    # ------------------------------------------------------------------ jobs

    def train_eqdiff(
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
    ) -> Job:
        """Queue EqDiff training of the subject in ``images`` (PIL, arrays, paths or bytes).
        ``masks``: one (H, W) bool mask per image, or None (the server segments each image,
        with ``mask_prompts`` [{"points": [(x, y)], "box": (x0, y0, x1, y1)}, ...] if given).
        ``options``: any other EqDiff parameter by name (learning_rate, rra=False, ...).
        ``idempotency_key``: a retry with the same key returns the same job."""
        request = create_job_request(
            images, class_word, masks, steps, mask_prompts=mask_prompts, placeholder_token=placeholder_token,
            initializer_token=initializer_token, seed=seed, class_images=class_images, model=model,
            idempotency_key=idempotency_key, options=options)
        # Retrying CreateJob is safe only with a key (the same key returns the same job).
        return Job(self, self._unary("CreateJob", request, timeout, retry=bool(idempotency_key)))

    def layer_edit(
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
    ) -> Job:
        """Queue a LayerDiffusion edit of ``image``: its object takes ``object_text`` (T_a, e.g.
        "a red circle"), the scene ``background_text`` (T_b, e.g. "on a striped blue background").
        ``reference``: a background image O_r of the same size (None: the base model draws one
        from the text). ``mask`` / ``reference_mask``: (H, W) bool object masks (None: the server
        segments, with ``mask_prompt`` / ``reference_mask_prompt`` {"points": [...], "box": ...}).
        ``options``: any other LayerDiffusion parameter by name (alpha=0.7, num_images=4,
        guidance_scale=7.5, finetune_mode="lora", iterative_guidance=False, ...).
        ``job.wait()`` returns a LayerEditResult (images + concept)."""
        request = layer_edit_request(
            image, object_text, background_text, reference, embedding_steps, finetune_steps, num_inference_steps,
            mask=mask, mask_prompt=mask_prompt, reference_mask=reference_mask,
            reference_mask_prompt=reference_mask_prompt, seed=seed, model=model, idempotency_key=idempotency_key,
            options=options)
        return Job(self, self._unary("CreateJob", request, timeout, retry=bool(idempotency_key)))

    def job(self, job_id: str) -> Job:
        return Job(self, self._get_job(job_id))

    def jobs(self, states: Optional[Sequence[str]] = None, page_size: int = 50) -> Iterator[Job]:
        """All jobs, newest first (paged transparently), optionally only those in ``states``."""
        token = ""
        while True:
            response = self._unary("ListJobs", list_jobs_request(states, page_size, token))
            for msg in response.jobs:
                yield Job(self, msg)
            token = response.next_page_token
            if not token:
                return

    # ------------------------------------------------------------------ concepts

    def concept(self, concept_id: str) -> Concept:
        return Concept.from_proto(self._unary("GetConcept", personalization_pb2.GetConceptRequest(
            concept_id=concept_id)))

    def concepts(self, page_size: int = 50) -> list[Concept]:
        found: list[Concept] = []
        token = ""
        while True:
            response = self._unary("ListConcepts", personalization_pb2.ListConceptsRequest(
                page_size=page_size, page_token=token))
            found.extend(Concept.from_proto(msg) for msg in response.concepts)
            token = response.next_page_token
            if not token:
                return found

    def delete_concept(self, concept: Union[Concept, str]) -> None:
        self._unary("DeleteConcept", personalization_pb2.DeleteConceptRequest(concept_id=concept_id_of(concept)))

    def export(self, concept: Union[Concept, str], path: Union[str, "os.PathLike[str]", None] = None) -> bytes:
        """The concept as safetensors bytes (tensors + metadata); also written to ``path`` if given."""
        response = self._unary("ExportConcept", personalization_pb2.ExportConceptRequest(
            concept_id=concept_id_of(concept)))
        return save_export(response.safetensors, path)

    def import_(self, data: Union[bytes, str, "os.PathLike[str]"]) -> Concept:
        """Import an exported concept (bytes or a file path)."""
        return Concept.from_proto(self._unary("ImportConcept", personalization_pb2.ImportConceptRequest(
            safetensors=read_concept_file(data))))

    # ------------------------------------------------------------------ generation

    def generate(
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
        """Images of ``concept``: ``prompt`` must contain ``concept.token``. ``guidance_scale``
        None: the base model's default (``client.models()``)."""
        request = generate_concept_request(concept, prompt, negative_prompt, num_inference_steps, guidance_scale,
                                           seed, num_images, model)
        return GenerateConceptResult.from_proto(
            self._transport.stream(self._stub.Generate, request, timeout, progress, cancel=cancel))
