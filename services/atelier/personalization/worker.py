"""The per-replica worker: claims jobs, runs them step by step on the compute executor,
renews its lease, checkpoints, and writes the finished concept.

One job at a time per replica. Each optimisation step is its own executor call, so an
inference call (Generate) that is waiting runs between two steps instead of after the job.
A heartbeat thread renews the lease every third of its length; a job whose replica died is
claimed again by any replica once the lease expired and resumes from its last checkpoint.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Mapping, Optional

from atelier.core.control import CallControl
from atelier.core.errors import AtelierError, Cancelled, FailedPrecondition, ResourceExhausted
from atelier.core.executor import ComputeExecutor
from atelier.core.models import ModelRegistry
from atelier.personalization import concepts as concept_files
from atelier.personalization.artifacts import ArtifactStore
from atelier.personalization.checkpoints import read_checkpoint, write_checkpoint
from atelier.personalization.database import ConceptRow, JobRow, new_id
from atelier.personalization.inputs import decode_inputs
from atelier.personalization.methods import TrainingMethod
from atelier.personalization.metrics import JobMetrics
from atelier.personalization.store import JobStore
from atelier.personalization.training import TrainingRun
from atelier.v1 import personalization_pb2

__all__ = ["JobWorker", "WorkerSettings"]

_LOG = logging.getLogger(__name__)


class WorkerSettings:
    def __init__(self, lease_seconds: float = 30.0, checkpoint_every: int = 50, poll_seconds: float = 1.0,
                 retention_seconds: float = 7 * 24 * 3600, max_pending: int = 64, owner: Optional[str] = None,
                 max_attempts: int = 5):
        if lease_seconds <= 0 or checkpoint_every < 1 or poll_seconds <= 0 or max_pending < 1 or max_attempts < 1:
            raise ValueError("lease_seconds, poll_seconds > 0; checkpoint_every, max_pending, max_attempts >= 1")
        self.lease_seconds = lease_seconds
        self.checkpoint_every = checkpoint_every
        self.poll_seconds = poll_seconds
        self.retention_seconds = retention_seconds  # 0: keep finished jobs forever
        self.max_pending = max_pending
        self.max_attempts = max_attempts  # claims of one job before it is failed (a job that kills its pod)
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _LeaseLost(Exception):
    pass


class _Stopping(Exception):
    pass


class JobWorker:
    def __init__(self, store: JobStore, artifacts: ArtifactStore, registry: ModelRegistry,
                 executor: ComputeExecutor, methods: Mapping[str, TrainingMethod], metrics: JobMetrics,
                 settings: WorkerSettings, max_image_pixels: int):
        self.store = store
        self.artifacts = artifacts
        self.registry = registry
        self.executor = executor
        self.methods = methods
        self.metrics = metrics
        self.settings = settings
        self.max_image_pixels = max_image_pixels
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._local_cancels: set[str] = set()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._last_purge = 0.0
        self.current_job: Optional[str] = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="personalization-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; the running job's lease is released so another
        replica (or this one restarted) resumes it from its last checkpoint at once."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """A job was queued on this replica: look now instead of at the next poll."""
        self._wake.set()

    def cancel_locally(self, job_id: str) -> None:
        """CancelJob reached the replica running the job: stop within the current UNet call."""
        with self._lock:
            self._local_cancels.add(job_id)

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._purge_if_due()
                claimed = self.store.claim(self.settings.owner, self.settings.lease_seconds)
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the worker
                _LOG.exception("personalization worker: claim failed; retrying")
                claimed = None
            if claimed is None:
                self._wake.wait(self.settings.poll_seconds)
                self._wake.clear()
                continue
            job, took_over = claimed
            if job.attempts > self.settings.max_attempts:
                # Every earlier claim ended with its replica gone: this job likely kills pods.
                if self.store.end(job.id, self.settings.owner, "FAILED",
                                  f"gave up after {job.attempts - 1} attempts whose replicas died mid-job"):
                    self._observe_end(job.id, "FAILED")
                    self._drop_checkpoint(job.id)
                continue
            if took_over:
                self.metrics.lease_takeovers.inc()
                _LOG.info("job %s: lease expired; resuming it from step %d", job.id, job.checkpoint_step)
            self.current_job = job.id
            try:
                self._run_job(job)
            except Exception:  # noqa: BLE001 - logged; the job is failed below when we still hold it
                _LOG.exception("job %s: worker error", job.id)
            finally:
                self.current_job = None

    def _purge_if_due(self) -> None:
        retention = self.settings.retention_seconds
        now = time.time()
        if retention <= 0 or now - self._last_purge < 60:
            return
        self._last_purge = now
        for digest in self.store.purge_finished(now - retention):
            self.artifacts.delete(digest)

    # ------------------------------------------------------------------ one job

    def _run_job(self, job: JobRow) -> None:
        lost = threading.Event()
        cancel_requested = threading.Event()
        if job.cancel_requested:
            cancel_requested.set()
        heartbeat = threading.Thread(target=self._heartbeat, args=(job.id, lost, cancel_requested),
                                     name=f"lease-{job.id}", daemon=True)

        def is_cancelled() -> bool:
            with self._lock:
                if job.id in self._local_cancels:
                    cancel_requested.set()
            return cancel_requested.is_set() or lost.is_set() or self._stop.is_set()

        control = CallControl(is_cancelled=is_cancelled, metrics=self.executor.metrics)
        heartbeat.start()
        try:
            self._train(job, control, lost, cancel_requested)
        except Exception as error:  # noqa: BLE001 - every ending goes through _conclude, which decides
            self._conclude(job, error, lost, cancel_requested)
        finally:
            lost.set()  # ends the heartbeat
            heartbeat.join()
            self.metrics.steps_per_second.labels(method=job.method).set(0)
            with self._lock:
                self._local_cancels.discard(job.id)

    def _conclude(self, job: JobRow, error: BaseException, lost: threading.Event,
                  cancel_requested: threading.Event) -> None:
        owner = self.settings.owner
        if isinstance(error, _LeaseLost) or (lost.is_set() and not self._stop.is_set()):
            _LOG.warning("job %s: lease lost to another replica; abandoning it here", job.id)
            return
        if self._stop.is_set() and not cancel_requested.is_set():
            # Shutting down: hand the job back (lease expired now) instead of failing it.
            self.store.renew(job.id, owner, -1.0)
            _LOG.info("job %s: released for another replica (this one is stopping)", job.id)
            return
        if cancel_requested.is_set():
            current = self.store.get_job(job.id)
            reason = (current.reason if current and current.reason else "cancelled by the client")
            ended = self.store.end(job.id, owner, "CANCELLED", reason)
            state = "CANCELLED"
        else:
            if isinstance(error, AtelierError):
                reason = f"{error.code.name}: {error.message}"
            else:
                _LOG.error("job %s failed", job.id, exc_info=error)
                reason = f"internal error: {type(error).__name__}: {error}"
            ended = self.store.end(job.id, owner, "FAILED", reason)
            state = "FAILED"
        if ended:
            self._observe_end(job.id, state)
            self._drop_checkpoint(job.id)

    def _heartbeat(self, job_id: str, lost: threading.Event, cancel_requested: threading.Event) -> None:
        interval = self.settings.lease_seconds / 3
        while not lost.wait(interval):
            try:
                cancel = self.store.renew(job_id, self.settings.owner, self.settings.lease_seconds)
            except Exception:  # noqa: BLE001 - retried at the next beat; the lease has slack
                _LOG.warning("job %s: lease renewal failed", job_id, exc_info=True)
                continue
            if cancel is None:
                lost.set()
            elif cancel:
                cancel_requested.set()

    def _on_executor(self, fn: Callable[[], object], control: CallControl):
        """Run ``fn`` on the compute executor (queued FIFO behind waiting inference calls)."""
        while True:
            try:
                future = self.executor.submit(fn, control)
                break
            except ResourceExhausted:
                if self._stop.is_set():
                    raise _Stopping() from None
                time.sleep(0.05)
        return future.result()

    def _train(self, job: JobRow, control: CallControl, lost: threading.Event,
               cancel_requested: threading.Event) -> None:
        owner = self.settings.owner
        method = self.methods.get(job.method)
        if method is None:
            raise FailedPrecondition(f"this server has no training method {job.method!r}")
        request = personalization_pb2.CreateJobRequest.FromString(self.artifacts.get(job.inputs_hash))
        params = method.parse(getattr(request, job.method), job.class_word, job.placeholder_token,
                              request.initializer_token)

        model = self.registry.load_sd(job.base_model)  # on this thread, not the compute worker

        def build() -> TrainingRun:
            inputs = decode_inputs(request, self.max_image_pixels)
            return method.create_run(model, inputs, params, control)

        run: TrainingRun = self._on_executor(build, control)
        if job.checkpoint_hash:
            # read with weights_only: a checkpoint is data from the store (shared by replicas),
            # never code; every run's state_dict is tensors, numbers, strings and optimiser dicts.
            run.load_state_dict(read_checkpoint(self.artifacts, job.checkpoint_hash))
            _LOG.info("job %s: resumed from its checkpoint at step %d", job.id, run.step_index)
        if run.total_steps != job.total_steps:
            self.store.set_total_steps(job.id, owner, run.total_steps)
        rate_window = (time.monotonic(), run.step_index)
        # Step events are written by a one-thread recorder so the database round trip (an fsync
        # on SQLite) overlaps the next step instead of adding to it. One write is outstanding at
        # most; its answer (lease lost, cancel requested) is read before the next is queued.
        # Leaving the block waits for the last write, so the terminal event comes after it.
        def record(*args) -> Optional[bool]:
            answer = self.store.record_step(*args)
            if answer is None:
                lost.set()  # the step in progress stops at its next UNet call
            elif answer:
                cancel_requested.set()
            return answer

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"events-{job.id}") as recorder:
            pending: Optional[Future] = None
            while run.step_index < run.total_steps:
                report = self._on_executor(lambda: run.step(control), control)
                preview = None
                if report.preview is not None:
                    from atelier.core.codecs import image_from_torch

                    preview = image_from_torch(report.preview).data
                if pending is not None:
                    self._recorded(pending.result(), cancel_requested)
                pending = recorder.submit(record, job.id, owner, report.step, run.total_steps,
                                          report.phase, report.losses, preview)
                started, first_step = rate_window
                elapsed = time.monotonic() - started
                if elapsed >= 1.0:
                    self.metrics.steps_per_second.labels(method=job.method).set(
                        (run.step_index - first_step) / elapsed)
                    rate_window = (time.monotonic(), run.step_index)
                if run.step_index % self.settings.checkpoint_every == 0 and run.step_index < run.total_steps:
                    self._recorded(pending.result(), cancel_requested)
                    pending = None
                    self._checkpoint(job.id, run)
                if self._stop.is_set():
                    raise _Stopping()
            if pending is not None:
                self._recorded(pending.result(), cancel_requested)
        concept = self._on_executor(run.finish, control)
        self._publish(job, method, params, concept)

    @staticmethod
    def _recorded(cancel: Optional[bool], cancel_requested: threading.Event) -> None:
        """Act on what ``record_step`` answered: None = lease lost, True = cancel requested."""
        if cancel is None:
            raise _LeaseLost()
        if cancel:
            cancel_requested.set()
            raise Cancelled("cancel requested")

    def _checkpoint(self, job_id: str, run: TrainingRun) -> None:
        started = time.perf_counter()
        digest, parts = write_checkpoint(self.artifacts, job_id, run)
        released = self.store.set_checkpoint(job_id, self.settings.owner, digest, run.step_index, parts=parts)
        self.metrics.checkpoint_write_seconds.observe(time.perf_counter() - started)
        if released is None:
            raise _LeaseLost()
        for unreferenced in released:  # the previous checkpoint, and parts it alone used
            self.artifacts.delete(unreferenced)

    def _publish(self, job: JobRow, method: TrainingMethod, params, concept) -> None:
        data, metadata = concept_files.serialize(concept, base_model=job.base_model, method=job.method,
                                                 placeholder_token=method.placeholder_token(params),
                                                 class_word=job.class_word, params_json=method.params_json(params),
                                                 job_id=job.id)
        digest = self.artifacts.put(data)  # durable before the row that makes it visible
        row = ConceptRow(id=new_id("concept"), job_id=job.id, placeholder_token=metadata["placeholder_token"],
                         class_word=job.class_word, base_model=job.base_model, method=job.method,
                         content_hash=digest, size_bytes=len(data), create_time=time.time(),
                         metadata=concept_files.metadata_json(metadata))
        if not self.store.succeed(job.id, self.settings.owner, row):
            raise _LeaseLost()
        self._observe_end(job.id, "SUCCEEDED")
        self._drop_checkpoint(job.id)

    def _observe_end(self, job_id: str, state: str) -> None:
        job = self.store.get_job(job_id)
        if job is not None and job.start_time and job.end_time:
            self.metrics.duration.labels(state=state).observe(job.end_time - job.start_time)

    def _drop_checkpoint(self, job_id: str) -> None:
        for digest in self.store.clear_checkpoint(job_id):
            self.artifacts.delete(digest)
