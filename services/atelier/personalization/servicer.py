"""Personalization service: proto <-> job store / methods translation (no tensor math here)."""
from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Mapping, Optional

import grpc

from atelier.core import codecs
from atelier.core.errors import (AtelierError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
                                 Unavailable)
from atelier.core.catalog import ListModelsRpc
from atelier.core.dependencies import request_id_of
from atelier.core.executor import ComputeExecutor
from atelier.core.models import SD, ModelRegistry
from atelier.core.streaming import stream_call
from atelier.personalization import concepts as concept_files
from atelier.personalization.artifacts import ArtifactStore
from atelier.personalization.database import STATES, TERMINAL, ConceptRow, JobRow, new_id
from atelier.personalization.inputs import check_images, check_masks
from atelier.personalization.masks import SegmentationMasks
from atelier.personalization.methods import GenerateOptions, TrainingMethod
from atelier.personalization.store import IdempotencyConflict, JobStore, QueueFull
from atelier.personalization.worker import JobWorker
from atelier.v1 import common_pb2, personalization_pb2, personalization_pb2_grpc

SERVICE_NAME = personalization_pb2.DESCRIPTOR.services_by_name["Personalization"].full_name
DEFAULT_METHOD = "eqdiff"
WATCH_POLL_SECONDS = 0.1
MAX_PAGE_SIZE = 1000
MAX_GENERATE_IMAGES = 8
MAX_INFERENCE_STEPS = 1000
MAX_PROMPT_CHARS = 2000
# Longer than core's 10 s (core.models.MODEL_LOAD_WAIT_SECONDS): the job worker loads base models
# on its own thread through the registry's one-at-a-time load lock, so a call's load can queue
# behind a training job's.
MODEL_LOAD_WAIT_SECONDS = 30.0

_STATE_ENUM = {name: personalization_pb2.JobState.Value(name) for name in STATES}
_STATE_NAME = {value: name for name, value in _STATE_ENUM.items()}


class AlreadyExists(AtelierError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PersonalizationServicer(ListModelsRpc, personalization_pb2_grpc.PersonalizationServicer):
    def __init__(self, store: JobStore, artifacts: ArtifactStore, registry: ModelRegistry,
                 executor: ComputeExecutor, methods: Mapping[str, TrainingMethod], worker: JobWorker,
                 segmentation: SegmentationMasks, default_model: str, max_image_pixels: int, max_pending: int):
        self._store = store
        self._artifacts = artifacts
        self._registry = registry
        self._executor = executor
        self._methods = methods
        self._worker = worker
        self._segmentation = segmentation
        self._default_model = default_model
        self.model_registry, self.default_model_name = registry, default_model  # ListModels
        self._max_pixels = max_image_pixels
        self._max_pending = max_pending
        # Set by the app once the server runs (attach): watches end when the server drains.
        self.draining = lambda: False

    # ------------------------------------------------------------------ jobs

    def CreateJob(self, request: personalization_pb2.CreateJobRequest, context) -> personalization_pb2.Job:
        method_name = request.WhichOneof("method") or DEFAULT_METHOD
        method = self._methods.get(method_name)
        if method is None:
            raise FailedPrecondition(f"this server offers no {method_name!r} training; "
                                     f"it offers {sorted(self._methods) or 'none'}")
        key = request.idempotency_key
        if len(key) > 256:
            raise InvalidArgument("idempotency_key", "at most 256 characters")
        body = personalization_pb2.CreateJobRequest()
        body.CopyFrom(request)
        body.idempotency_key = ""
        body_hash = hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()
        if key:  # a retry of a create that already succeeded: no segmentation, no validation
            existing = self._store.job_by_key(key)
            if existing is not None:
                return self._job_proto(self._check_body(existing, body_hash))

        model_name = request.model.name or self._default_model
        self._registry.check(model_name, kind=SD)  # NotFound unknown, FailedPrecondition another kind
        images = check_images(request, self._max_pixels)
        size = tuple(images[0].shape[2:])
        masks = check_masks(request, size, self._max_pixels)
        if request.mask_prompts and len(request.mask_prompts) != len(request.images):
            raise InvalidArgument("mask_prompts", f"give one prompt set per image ({len(request.images)}) or none")
        if masks and request.mask_prompts:
            raise InvalidArgument("mask_prompts", "give masks or mask_prompts, not both")
        check_request = getattr(method, "check_request", None)  # the method's own request fields
        if check_request is not None:
            check_request(request, size)
        class_word = " ".join(request.class_word.split())
        tokenizer = self._model(model_name, context).tokenizer
        if getattr(method, "needs_class_word", True):
            self._check_words(tokenizer, class_word, "class_word")
            if request.initializer_token:
                self._check_words(tokenizer, request.initializer_token, "initializer_token")
        params = method.parse(getattr(request, method_name), class_word, request.placeholder_token,
                              request.initializer_token)
        placeholder = method.placeholder_token(params)
        vocab = tokenizer.get_vocab()
        if placeholder and (placeholder in vocab or placeholder.lower() + "</w>" in vocab):
            raise InvalidArgument("placeholder_token", f"{placeholder!r} is already a word of the tokenizer; "
                                                       f"pick a new string such as '<my-{class_word}>'")

        inputs = personalization_pb2.CreateJobRequest()
        inputs.CopyFrom(request)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e8 else None
        if not masks:
            inputs.masks.extend(self._segmentation.masks(request.images, request.mask_prompts, size, deadline,
                                                         request_id_of(context)))
            check_masks(inputs, size, self._max_pixels, field="segmentation masks")
        complete_request = getattr(method, "complete_request", None)  # e.g. segment the method's other images
        if complete_request is not None:
            complete_request(inputs, size, deadline, request_id_of(context))
        inputs_hash = self._artifacts.put(inputs.SerializeToString(deterministic=True))
        try:
            job, _ = self._store.create_job(
                idempotency_key=key or None, body_hash=body_hash, inputs_hash=inputs_hash, method=method_name,
                base_model=model_name, placeholder_token=placeholder, class_word=class_word,
                total_steps=method.total_steps(params, bool(request.class_images)), max_pending=self._max_pending)
        except QueueFull:
            if self._store.unreferenced(inputs_hash):
                self._artifacts.delete(inputs_hash)
            raise ResourceExhausted(f"the training queue is full ({self._max_pending} jobs pending); "
                                    f"retry later") from None
        except IdempotencyConflict as conflict:
            raise AlreadyExists(f"idempotency_key {key!r} was used for job {conflict.args[0]} with a different "
                                f"request") from None
        self._worker.wake()
        return self._job_proto(job)

    @staticmethod
    def _check_body(job: JobRow, body_hash: str) -> JobRow:
        if job.body_hash != body_hash:
            raise AlreadyExists(f"idempotency_key {job.idempotency_key!r} was used for job {job.id} with a "
                                f"different request")
        return job

    def _model(self, name: str, context):
        """The loaded model, loaded off the compute worker (UNAVAILABLE while still loading)."""
        return self._registry.get(name, kind=SD, remaining=context.time_remaining(),
                                  wait_seconds=MODEL_LOAD_WAIT_SECONDS)

    @staticmethod
    def _check_words(tokenizer, text: str, field: str) -> None:
        if not text:
            raise InvalidArgument(field, "is required (the subject's class noun, e.g. 'box')")
        vocab = tokenizer.get_vocab()
        for word in text.split():
            if word.lower() + "</w>" not in vocab:
                raise InvalidArgument(field, f"{word!r} is not a word of the model's tokenizer (it would split into "
                                             f"{tokenizer.tokenize(word)})")

    def WatchJob(self, request: personalization_pb2.WatchJobRequest, context):
        job = self._job(request.job_id)
        if request.from_index < 0:
            raise InvalidArgument("from_index", f"must be >= 0, got {request.from_index}")
        next_index = request.from_index
        if job.state in TERMINAL and next_index >= job.next_event:
            return
        while context.is_active():
            if self.draining():
                # A watch follows a job for minutes: end it now with a retryable status instead
                # of holding the drain for its whole grace period (the SDK resumes elsewhere).
                raise Unavailable(f"this replica is shutting down; resume watching job {job.id} from "
                                  f"index {next_index}")
            progressed = False
            for row in self._store.events(job.id, next_index):
                if row.idx != next_index:
                    break
                yield _event_proto(row)
                next_index += 1
                progressed = True
                if row.state in TERMINAL:
                    return
            if not progressed:
                time.sleep(WATCH_POLL_SECONDS)

    def GetJob(self, request, context):
        return self._job_proto(self._job(request.job_id))

    def ListJobs(self, request: personalization_pb2.ListJobsRequest, context):
        limit = _page_size(request.page_size)
        states = []
        for i, value in enumerate(request.states):
            if value not in _STATE_NAME:
                raise InvalidArgument(f"states[{i}]", f"unknown job state {value}")
            states.append(_STATE_NAME[value])
        rows = self._store.list_jobs(states, limit + 1, _parse_token(request.page_token))
        response = personalization_pb2.ListJobsResponse(jobs=[self._job_proto(r) for r in rows[:limit]])
        if len(rows) > limit:
            response.next_page_token = _token(rows[limit - 1].create_time, rows[limit - 1].id)
        return response

    def CancelJob(self, request: personalization_pb2.CancelJobRequest, context):
        reason = request.reason or "cancelled by the client"
        job = self._store.request_cancel(request.job_id, reason[:1000])
        if job is None:
            raise NotFound(f"no job {request.job_id!r}")
        if job.state == "RUNNING" and self._worker.current_job == job.id:
            self._worker.cancel_locally(job.id)
        return self._job_proto(job)

    def _job(self, job_id: str) -> JobRow:
        job = self._store.get_job(job_id) if job_id else None
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    @staticmethod
    def _job_proto(job: JobRow) -> personalization_pb2.Job:
        return personalization_pb2.Job(
            id=job.id, state=_STATE_ENUM[job.state], reason=job.reason, method=job.method,
            model=common_pb2.ModelRef(name=job.base_model), step=job.step, total_steps=job.total_steps,
            concept_id=job.concept_id or "", create_time=job.create_time, start_time=job.start_time or 0.0,
            end_time=job.end_time or 0.0, attempts=job.attempts, cancel_requested=job.cancel_requested,
            idempotency_key=job.idempotency_key or "", checkpoint_step=job.checkpoint_step,
            placeholder_token=job.placeholder_token, next_event_index=job.next_event)

    # ------------------------------------------------------------------ concepts

    def _concept(self, concept_id: str) -> ConceptRow:
        row = self._store.get_concept(concept_id) if concept_id else None
        if row is None:
            raise NotFound(f"no concept {concept_id!r}")
        return row

    def GetConcept(self, request, context):
        return _concept_proto(self._concept(request.concept_id))

    def ListConcepts(self, request, context):
        limit = _page_size(request.page_size)
        rows = self._store.list_concepts(limit + 1, _parse_token(request.page_token))
        response = personalization_pb2.ListConceptsResponse(concepts=[_concept_proto(r) for r in rows[:limit]])
        if len(rows) > limit:
            response.next_page_token = _token(rows[limit - 1].create_time, rows[limit - 1].id)
        return response

    def DeleteConcept(self, request, context):
        deleted = self._store.delete_concept(request.concept_id) if request.concept_id else None
        if deleted is None:
            raise NotFound(f"no concept {request.concept_id!r}")
        digest, unreferenced = deleted
        if unreferenced:
            self._artifacts.delete(digest)
        return personalization_pb2.DeleteConceptResponse()

    def ExportConcept(self, request, context):
        row = self._concept(request.concept_id)
        return personalization_pb2.ExportConceptResponse(concept=_concept_proto(row),
                                                         safetensors=self._concept_bytes(row))

    def _concept_bytes(self, row: ConceptRow) -> bytes:
        try:
            return self._artifacts.get(row.content_hash)
        except FileNotFoundError:  # deleted meanwhile (DeleteConcept removes the row first)
            raise NotFound(f"concept {row.id} was deleted") from None

    def ImportConcept(self, request, context):
        data = request.safetensors
        concept = concept_files.deserialize(data)  # InvalidArgument("safetensors") when malformed
        metadata = concept.metadata
        missing = [k for k in concept_files.REQUIRED_KEYS if not metadata.get(k)]
        if missing:
            raise InvalidArgument("safetensors", f"metadata lacks {', '.join(missing)}: not an Atelier concept")
        if metadata["base_model"] not in self._registry.names():
            raise FailedPrecondition(f"the concept was trained on base model {metadata['base_model']!r}, which "
                                     f"this server does not serve ({', '.join(self._registry.names())})")
        self._registry.check(metadata["base_model"], kind=SD)
        if metadata["method"] not in self._methods:
            raise FailedPrecondition(f"the concept was made by {metadata['method']!r}, which this server does not "
                                     f"offer ({', '.join(sorted(self._methods)) or 'none'})")
        check_concept = getattr(self._methods[metadata["method"]], "check_concept", None)
        if check_concept is not None:  # Generate reads it: refuse a file it could not use
            try:
                check_concept(concept)
            except FailedPrecondition as error:
                raise InvalidArgument("safetensors", error.message) from None
        digest = self._artifacts.put(data)
        row = ConceptRow(id=new_id("concept"), job_id="", placeholder_token=metadata["placeholder_token"],
                         class_word=metadata.get("class_word", ""), base_model=metadata["base_model"],
                         method=metadata["method"], content_hash=digest, size_bytes=len(data),
                         create_time=time.time(), metadata=concept_files.metadata_json(metadata))
        self._store.add_concept(row)
        return _concept_proto(row)

    # ------------------------------------------------------------------ generation

    def Generate(self, request: personalization_pb2.GenerateConceptRequest, context):
        row = self._concept(request.concept_id)
        model_name = request.model.name or row.base_model
        if model_name != row.base_model:
            self._registry.check(model_name, kind=SD)
            raise FailedPrecondition(f"concept {row.id} was trained on base model {row.base_model!r}, not "
                                     f"{model_name!r}")
        method = self._methods.get(row.method)
        if method is None:
            raise FailedPrecondition(f"concept {row.id} was made by {row.method!r}, which this server does not offer")
        self._registry.check(model_name, kind=SD)
        options = self._generate_options(request, row, self._registry.info(model_name).default_guidance_scale)
        model = self._model(model_name, context)

        def work(control):
            concept = concept_files.deserialize(self._concept_bytes(row))
            return method.generate(model, concept, options, control)

        def result(images, control):
            return personalization_pb2.GenerateConceptEvent(result=personalization_pb2.GenerateConceptResult(
                images=[codecs.image_from_torch(image) for image in images], concept_id=row.id,
                model=common_pb2.ModelRef(name=model_name), seed=options.seed, usage=codecs.usage_to_proto(control)))

        yield from stream_call(
            context, self._executor, work,
            lambda event: personalization_pb2.GenerateConceptEvent(progress=common_pb2.Progress(
                stage=event.stage, step=event.step, total=event.total, message=event.message,
                elapsed_seconds=event.elapsed_seconds)),
            result)

    @staticmethod
    def _generate_options(request: personalization_pb2.GenerateConceptRequest, row: ConceptRow,
                          default_guidance: float) -> GenerateOptions:
        violations = []
        if row.placeholder_token not in request.prompt.split() and row.placeholder_token not in request.prompt:
            violations.append(("prompt", f"must contain the concept's placeholder token {row.placeholder_token!r}"))
        for field, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
            if len(text) > MAX_PROMPT_CHARS:
                violations.append((field, f"longer than {MAX_PROMPT_CHARS} characters"))
        steps = request.num_inference_steps if request.HasField("num_inference_steps") else 50
        if not 1 <= steps <= MAX_INFERENCE_STEPS:
            violations.append(("num_inference_steps", f"must be in [1, {MAX_INFERENCE_STEPS}], got {steps}"))
        guidance = request.guidance_scale if request.HasField("guidance_scale") else default_guidance
        if not math.isfinite(guidance) or not 0 <= guidance <= 100:
            violations.append(("guidance_scale", f"must be in [0, 100], got {guidance}"))
        count = request.num_images if request.HasField("num_images") else 1
        if not 1 <= count <= MAX_GENERATE_IMAGES:
            violations.append(("num_images", f"must be in [1, {MAX_GENERATE_IMAGES}], got {count}"))
        if violations:
            raise InvalidArgument.many(violations)
        return GenerateOptions(prompt=request.prompt, negative_prompt=request.negative_prompt,
                               num_inference_steps=steps, guidance_scale=guidance,
                               seed=request.seed if request.HasField("seed") else 0, num_images=count)


def _page_size(size: int) -> int:
    if size < 0 or size > MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"must be in [0, {MAX_PAGE_SIZE}] (0: 50), got {size}")
    return size or 50


def _token(create_time: float, row_id: str) -> str:
    return json.dumps([create_time, row_id])


def _parse_token(token: str) -> Optional[tuple[float, str]]:
    if not token:
        return None
    try:
        create_time, row_id = json.loads(token)
        return float(create_time), str(row_id)
    except (ValueError, TypeError):
        raise InvalidArgument("page_token", "not a token from a previous response") from None


def _event_proto(row) -> personalization_pb2.JobEvent:
    event = personalization_pb2.JobEvent(
        index=row.idx, state=_STATE_ENUM[row.state], step=row.step, total_steps=row.total_steps,
        losses=json.loads(row.losses), phase=row.phase, message=row.message, time=row.time,
        concept_id=row.concept_id)
    if row.preview:
        event.preview.data = row.preview
        event.preview.encoding = event.preview.PNG
    return event


def _concept_proto(row: ConceptRow) -> personalization_pb2.Concept:
    return personalization_pb2.Concept(
        id=row.id, placeholder_token=row.placeholder_token, class_word=row.class_word,
        model=common_pb2.ModelRef(name=row.base_model), method=row.method, job_id=row.job_id,
        content_hash=row.content_hash, size_bytes=row.size_bytes, create_time=row.create_time,
        metadata=json.loads(row.metadata))
