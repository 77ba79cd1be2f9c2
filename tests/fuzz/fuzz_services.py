"""The services the fuzz test runs: ONE list, ``TARGETS``.

A new service joins by adding one ``FuzzTarget`` here: its name, its App class (anything
with the ``atelier.core.server.App`` shape whose class attribute ``service_names`` lists its
proto services) and how to build it from a ServerConfig and Metrics. Every RPC of every
listed service is then fuzzed with the shared per-message strategies of fuzz_strategies.py,
and sent garbled bytes; nothing else needs writing.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from google.protobuf import descriptor_pool

from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics


@dataclass(frozen=True)
class FuzzTarget:
    name: str
    app_class: type
    build: Callable[[ServerConfig, Metrics], Any]
    config: dict = field(default_factory=dict)  # ServerConfig overrides (limits kept small)
    # Brings the app back to idle before the invariants are checked (a job service cancels the
    # jobs the fuzz created) and asserts what "idle" means for it; takes (running, channel).
    settle: Optional[Callable[[Any, Any], None]] = None
    # Well-formed requests per RPC name, made once against the running server (a job service's
    # RPCs need ids of things that exist); the fuzz mutates them beside the generic requests.
    # Takes (running, channel), returns {method name: [request, ...]}.
    seeds: Optional[Callable[[Any, Any], dict]] = None

    def methods(self):
        """(service descriptor, method descriptor) for every RPC of the app's services."""
        pool = descriptor_pool.Default()
        for service_name in self.app_class.service_names:
            service = pool.FindServiceByName(service_name)
            for method in service.methods:
                yield service, method


def _inversion() -> FuzzTarget:
    from atelier.inversion.app import InversionApp

    return FuzzTarget("inversion", InversionApp, lambda config, metrics: InversionApp(config, metrics=metrics))


def _segmentation() -> FuzzTarget:
    from atelier.segmentation.app import SegmentationApp

    return FuzzTarget("segmentation", SegmentationApp, lambda config, metrics: SegmentationApp(config, metrics=metrics))


def _synthesis() -> FuzzTarget:
    from atelier.synthesis.app import SynthesisApp

    return FuzzTarget("synthesis", SynthesisApp, lambda config, metrics: SynthesisApp(config, metrics=metrics))


ACTIVE_JOB_STATES = ("PENDING", "RUNNING")


def _settle_personalization(running, channel) -> None:
    """Cancel every job the fuzz created (through CancelJob, as a client would) and wait until
    none is PENDING or RUNNING; no job may have failed with an internal error (the worker's
    counterpart of an INTERNAL status: a fuzzed CreateJob the servicer accepted but the method
    could not run)."""
    from atelier.v1 import personalization_pb2, personalization_pb2_grpc

    store = running.app.store
    stub = personalization_pb2_grpc.PersonalizationStub(channel)
    deadline = time.monotonic() + 20
    while True:
        active = store.list_jobs(states=ACTIVE_JOB_STATES, limit=1000)
        if not active or time.monotonic() > deadline:
            break
        for job in active:
            if not job.cancel_requested:
                stub.CancelJob(personalization_pb2.CancelJobRequest(job_id=job.id, reason="fuzz: end"), timeout=5)
        time.sleep(0.05)
    assert not active, f"jobs still active after cancelling: {[(j.id, j.state) for j in active]}"
    failed = [(job.id, job.reason) for job in store.list_jobs(states=("FAILED",), limit=1000)
              if job.reason.startswith("internal error")]
    assert not failed, f"jobs failed internally: {failed}"


def _png(pixels) -> bytes:
    import io

    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _personalization_seeds(running, channel) -> dict:
    """Real concepts (a 1-step EqDiff job and a short LayerDiffusion edit on the toy model) and
    requests that name them."""
    import numpy as np

    from atelier.v1 import personalization_pb2, personalization_pb2_grpc, tensor_pb2

    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:] = (40, 70, 200)
    pixels[16:48, 16:48] = (210, 40, 40)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    image = tensor_pb2.Image(encoding=tensor_pb2.Image.PNG, data=_png(pixels), width=64, height=64)
    create = personalization_pb2.CreateJobRequest(
        images=[image], masks=[tensor_pb2.Mask(png=_png(mask))], class_word="box", seed=1,
        eqdiff=personalization_pb2.EqDiffOptions(steps=1, prior_preservation=False, batch_size=1))
    background = pixels.copy()
    background[:, :, 1] = 160
    layer_edit = personalization_pb2.CreateJobRequest(
        images=[image], masks=[tensor_pb2.Mask(png=_png(mask))], seed=1,
        layer_edit=personalization_pb2.LayerEditOptions(
            object_text="a red square", background_text="on a green background",
            reference=tensor_pb2.Image(encoding=tensor_pb2.Image.PNG, data=_png(background), width=64, height=64),
            reference_mask=tensor_pb2.Mask(png=_png(mask)), embedding_steps=1, finetune_steps=1,
            reference_steps=2, num_images=1, num_inference_steps=2))
    stub = personalization_pb2_grpc.PersonalizationStub(channel)

    def trained(request):  # one at a time: the fuzz server holds one pending job at most
        job = stub.CreateJob(request, timeout=30)
        deadline = time.monotonic() + 90
        while job.state != personalization_pb2.SUCCEEDED and time.monotonic() < deadline:
            time.sleep(0.1)
            job = stub.GetJob(personalization_pb2.GetJobRequest(job_id=job.id), timeout=5)
        assert job.state == personalization_pb2.SUCCEEDED, job
        return job, stub.GetConcept(personalization_pb2.GetConceptRequest(concept_id=job.concept_id), timeout=5)

    job, concept = trained(create)
    edit_job, edit_concept = trained(layer_edit)
    exported = stub.ExportConcept(personalization_pb2.ExportConceptRequest(concept_id=concept.id),
                                  timeout=30).safetensors
    # the same file with its header edited as a hand-made or foreign file might be
    from safetensors.torch import load as load_tensors, save as save_tensors

    from atelier.personalization.concepts import read_metadata
    metadata = read_metadata(exported)
    edited = [save_tensors(load_tensors(exported), metadata=changed) for changed in (
        {k: v for k, v in metadata.items() if k != "params"}, {**metadata, "method": "layer_edit"},
        {**metadata, "params": "[]"}, {**metadata, "width": "-1"})]
    prompt = f"a photo of {concept.placeholder_token}"
    return {
        "CreateJob": [create, layer_edit],
        "WatchJob": [personalization_pb2.WatchJobRequest(job_id=j.id) for j in (job, edit_job)],
        "GetJob": [personalization_pb2.GetJobRequest(job_id=j.id) for j in (job, edit_job)],
        "CancelJob": [personalization_pb2.CancelJobRequest(job_id=j.id) for j in (job, edit_job)],
        "GetConcept": [personalization_pb2.GetConceptRequest(concept_id=c.id) for c in (concept, edit_concept)],
        "ExportConcept": [personalization_pb2.ExportConceptRequest(concept_id=c.id) for c in (concept, edit_concept)],
        "ImportConcept": [personalization_pb2.ImportConceptRequest(safetensors=data) for data in [exported, *edited]],
        "Generate": [personalization_pb2.GenerateConceptRequest(concept_id=concept.id, prompt=prompt,
                                                                num_inference_steps=2),
                     personalization_pb2.GenerateConceptRequest(concept_id=edit_concept.id, num_inference_steps=2)],
        # DeleteConcept is left generic: deleting the seed concept would void the others' seeds
    }


def _personalization() -> FuzzTarget:
    """Jobs: SQLite in a fresh folder, ONE pending job at most (further CreateJobs answer
    RESOURCE_EXHAUSTED), so the fuzz trains at most one job at a time; all are cancelled at the
    end (``settle``). Generate runs real sampling, cut short by the fuzz's 1 s deadline."""
    from atelier.personalization.app import PersonalizationApp

    def build(config: ServerConfig, metrics: Metrics) -> Any:
        # Its own job store and artifacts (SQLite under a temporary folder, removed with the app);
        # no segmentation service, so requests without masks are refused at CreateJob.
        data_dir = tempfile.mkdtemp(prefix="atelier-fuzz-personalization-")
        app = PersonalizationApp(dataclasses.replace(config, extras={**config.extras, "data_dir": data_dir}),
                                 metrics=metrics)
        weakref.finalize(app, shutil.rmtree, data_dir, True)
        return app

    extras = dict(max_pending_jobs=1, job_poll_seconds=0.2, checkpoint_every=1000, job_retention_hours=0.0)
    return FuzzTarget("personalization", PersonalizationApp, build, config=dict(extras=extras),
                      settle=_settle_personalization, seeds=_personalization_seeds)


TARGETS: list[FuzzTarget] = [_inversion(), _segmentation(), _synthesis(), _personalization()]
