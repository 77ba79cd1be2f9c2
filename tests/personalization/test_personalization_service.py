"""The personalization service on loopback through the SDK (SQLite store, the textual-inversion
test method standing in for EqDiff): jobs, watch, cancel, idempotency, concepts, bad input."""
from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest

import atelier
from atelier.sdk.personalization import JobCancelledError
from atelier.sdk.common import to_image_proto
from atelier.v1 import personalization_pb2
from pers_helpers import concept_image, in_process_server, square_mask, wait_for

pytestmark = pytest.mark.timeout(300)


SEEN_BY_SEGMENTATION: list[tuple[str, float]] = []  # (x-request-id, seconds left of the deadline)


@pytest.fixture(scope="module")
def segmentation():
    """The real segmentation service; its servicer notes the request id and deadline it was called with."""
    from prometheus_client import CollectorRegistry

    from atelier.core.config import ServerConfig
    from atelier.core.metrics import Metrics
    from atelier.core.server import start
    from atelier.segmentation.app import SegmentationApp
    from atelier.segmentation.servicer import SegmentationServicer
    from atelier.v1 import segmentation_pb2_grpc

    class NotingServicer(SegmentationServicer):
        def Segment(self, request, context):
            metadata = dict(context.invocation_metadata())
            SEEN_BY_SEGMENTATION.append((metadata.get("x-request-id", ""), context.time_remaining()))
            return super().Segment(request, context)

    class NotingApp(SegmentationApp):
        def add_to_server(self, server) -> None:
            servicer = NotingServicer(self.segmenter_for, self.executor, self.config.max_image_pixels)
            segmentation_pb2_grpc.add_SegmentationServicer_to_server(servicer, server)

    config = ServerConfig(service="segmentation", host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1)
    metrics = Metrics(CollectorRegistry())
    running = start(NotingApp(config, metrics=metrics), config, metrics)
    assert running.wait_loaded(120) and running.load_error is None
    yield running
    running.stop(1)


@pytest.fixture(scope="module")
def service(tmp_path_factory, segmentation):
    with in_process_server(tmp_path_factory.mktemp("pers"), segmentation_address=segmentation.address,
                           checkpoint_every=5) as running:
        client = atelier.Client(personalization=running.address, timeout=120)
        yield running, client
        client.close()


IMAGES = [concept_image(0), concept_image(1)]
MASKS = [square_mask(), square_mask()]


@pytest.fixture(scope="module")
def trained(service):
    """A concept trained for a few steps (tests that need one do not depend on test order)."""
    _, client = service
    return client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=3).wait()


def test_train_with_segmented_masks_then_generate(service):
    running, client = service
    seen = []
    SEEN_BY_SEGMENTATION.clear()
    request = personalization_pb2.CreateJobRequest(
        images=[to_image_proto(image) for image in IMAGES], class_word="box",
        eqdiff=personalization_pb2.EqDiffOptions(steps=12, learning_rate=5e-3))
    created = client.personalization._stub.CreateJob(request, timeout=50, metadata=(("x-request-id", "req-42"),))
    # The caller's request id and deadline reached the segmentation service, once per image.
    assert [rid for rid, _ in SEEN_BY_SEGMENTATION] == ["req-42", "req-42"]
    assert all(0 < left <= 50 for _, left in SEEN_BY_SEGMENTATION)
    job = client.personalization.job(created.id)
    assert created.state == personalization_pb2.PENDING and created.total_steps == 12
    concept = job.wait(progress=seen.append)
    assert [p.step for p in seen] == list(range(1, 13))
    assert all("loss=" in p.message for p in seen)
    assert concept.token == "<concept>" and concept.model == "toy" and concept.method == "eqdiff"
    # The masks came from the segmentation service (none were sent) and were stored with the job.
    stored = running.app.store.get_job(job.id)
    request = personalization_pb2.CreateJobRequest.FromString(running.app.artifacts.get(stored.inputs_hash))
    assert len(request.masks) == 2
    result = client.personalization.generate(concept, f"a {concept.token} on a blue background", seed=0,
                                             num_inference_steps=4)
    assert result.image.size == (64, 64) and result.seed == 0
    again = client.personalization.generate(concept, f"a {concept.token} on a blue background", seed=0,
                                            num_inference_steps=4)
    assert np.array_equal(np.asarray(result.image), np.asarray(again.image))
    assert concept.id in [c.id for c in client.personalization.concepts()]


def test_idempotent_create(service):
    _, client = service
    first = client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=3,
                                                idempotency_key="same-key")
    second = client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=3,
                                                 idempotency_key="same-key")
    assert first.id == second.id
    with pytest.raises(atelier.AlreadyExistsError):
        client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=4,
                                            idempotency_key="same-key")
    first.wait(progress=True)  # a tqdm bar
    assert len([j for j in client.personalization.jobs() if j.id == first.id]) == 1


def test_resumed_watch_sees_every_event_once(service):
    _, client = service
    job = client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=15)
    received = []
    events = job.events()
    for event in events:  # a client that drops its stream after a few events ...
        received.append(event)
        if len(received) == 4:
            break
    events.close()
    for event in job.events(from_index=received[-1].index + 1):  # ... and resumes from the next index
        received.append(event)
    assert [e.index for e in received] == list(range(len(received)))
    assert received[-1].state == "SUCCEEDED"
    steps = [e.step for e in received if e.phase == "train"]
    assert steps == list(range(1, 16))
    full = list(job.events())
    assert [(e.index, e.state, e.step) for e in full] == [(e.index, e.state, e.step) for e in received]


def test_cancel_running_job_stops_within_a_step(service):
    _, client = service
    job = client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=20000)
    wait_for(lambda: job.refresh().step >= 2, 120, "the job to run")
    job.cancel("enough")
    with pytest.raises(JobCancelledError):
        job.wait(timeout=60)
    assert job.state == "CANCELLED" and job.reason == "enough"
    final_step = job.step
    time.sleep(0.5)
    assert job.refresh().step == final_step < 20000


def test_cancel_pending_job_and_bounded_queue(tmp_path):
    with in_process_server(tmp_path, max_pending_jobs=1) as running:
        with atelier.Client(personalization=running.address, timeout=60) as client:
            pers = client.personalization
            long_job = pers.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=20000)
            wait_for(lambda: long_job.refresh().state == "RUNNING", 60, "the first job to start")
            queued = pers.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=5)
            with pytest.raises(atelier.ResourceExhaustedError):
                pers.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=5)
            assert queued.cancel().state == "CANCELLED"
            assert [j.id for j in pers.jobs(states=["CANCELLED"])] == [queued.id]
            long_job.cancel()
            with pytest.raises(JobCancelledError):
                long_job.wait(timeout=60)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode()
            assert 'atelier_jobs{state="CANCELLED"} 2.0' in metrics
            assert "atelier_job_duration_seconds_count" in metrics


def test_generate_runs_between_training_steps(service, trained):
    running, client = service
    job = client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=20000)
    wait_for(lambda: job.refresh().state == "RUNNING" and job.step > 0, 120, "the job to run")
    before = job.refresh().step
    client.personalization.generate(trained, f"a {trained.token}", num_inference_steps=3)
    assert job.refresh().state == "RUNNING"  # the training went on around the Generate call
    job.cancel()
    with pytest.raises(JobCancelledError):
        job.wait(timeout=60)
    assert job.step > before


def test_list_models(service):
    _, client = service
    models = [m for m in client.models() if m.service == "personalization"]
    assert [(m.name, m.kind, m.is_default) for m in models] == [("toy", "stable-diffusion", True)]


def test_export_import_delete(service, trained):
    _, client = service
    pers = client.personalization
    concept = trained
    data = pers.export(concept)
    imported = pers.import_(data)
    assert imported.id != concept.id and imported.content_hash == concept.content_hash
    assert imported.token == concept.token and imported.job_id == ""
    assert imported.metadata["base_model"] == "toy" and "params" in imported.metadata
    pers.delete_concept(imported)
    with pytest.raises(atelier.NotFoundError):
        pers.concept(imported.id)
    assert pers.export(concept) == data  # the shared file survived the other row's deletion


def _violations(error) -> list[str]:
    return [field for field, _ in error.value.field_violations]


def test_bad_inputs_name_their_fields(service, trained):
    _, client = service
    pers = client.personalization
    cases = [
        (dict(images=[], class_word="box"), "images"),
        (dict(images=[concept_image(0)] * 33, class_word="box"), "images"),
        (dict(images=[concept_image(0), concept_image(1, size=72)], class_word="box"), "images[1]"),
        (dict(images=IMAGES, class_word="box", masks=[square_mask(), square_mask(32)]), "masks[1]"),
        (dict(images=IMAGES, class_word="box", masks=[square_mask(), np.zeros((64, 64), bool)]), "masks[1]"),
        (dict(images=IMAGES, class_word="box", masks=[square_mask()]), "masks"),
        (dict(images=IMAGES, class_word="qqxyzzy", masks=MASKS), "class_word"),
        (dict(images=IMAGES, class_word="box", masks=MASKS, steps=0), "steps"),
        (dict(images=IMAGES, class_word="box", masks=MASKS, steps=10**6), "steps"),
    ]
    for kwargs, field in cases:
        with pytest.raises(atelier.InvalidArgumentError) as error:
            pers.train_eqdiff(**kwargs)
        assert field in _violations(error), (field, error.value)
    with pytest.raises(atelier.NotFoundError):
        pers.job("job-unknown")
    with pytest.raises(atelier.NotFoundError):
        pers._unary("CancelJob", personalization_pb2.CancelJobRequest(job_id="job-unknown"))
    with pytest.raises(atelier.NotFoundError):
        list(pers._watch("job-unknown", 0, 10, None))
    with pytest.raises(atelier.NotFoundError):
        pers.concept("concept-unknown")
    with pytest.raises(atelier.NotFoundError):
        pers.generate("concept-unknown", "a <concept>")
    with pytest.raises(atelier.NotFoundError):
        pers.train_eqdiff(IMAGES, class_word="box", masks=MASKS, model="no-such-model")
    with pytest.raises(atelier.FailedPreconditionError):  # a SAM is not a base model
        pers.train_eqdiff(IMAGES, class_word="box", masks=MASKS, model="toy-sam")
    concept = trained
    with pytest.raises(atelier.InvalidArgumentError) as error:
        pers.generate(concept, "a box without the token")
    assert _violations(error) == ["prompt"]
    with pytest.raises(atelier.InvalidArgumentError) as error:
        pers.generate(concept, f"a {concept.token}", num_inference_steps=0)
    assert _violations(error) == ["num_inference_steps"]
    with pytest.raises(atelier.InvalidArgumentError) as error:
        pers.import_(b"not a safetensors file")
    assert _violations(error) == ["safetensors"]


def test_concept_of_another_base_model_is_refused(service, trained):
    running, client = service
    pers = client.personalization
    concept = trained
    running.app.registry.entries["toy-copy"] = running.app.registry.entries["toy"]
    try:
        with pytest.raises(atelier.FailedPreconditionError):
            pers.generate(concept, f"a {concept.token}", model="toy-copy")
    finally:
        del running.app.registry.entries["toy-copy"]
    from safetensors.torch import load, save

    data = pers.export(concept)
    metadata = dict(concept.metadata, base_model="sd15-not-served")
    with pytest.raises(atelier.FailedPreconditionError):
        pers.import_(save(load(data), metadata=metadata))


def test_segmentation_unreachable_refuses_create(tmp_path):
    from pers_helpers import free_port

    with in_process_server(tmp_path, segmentation_address=f"127.0.0.1:{free_port()}") as running:
        with atelier.Client(personalization=running.address, timeout=30) as client:
            started = time.monotonic()
            with pytest.raises(atelier.UnavailableError) as error:
                client.personalization.train_eqdiff(IMAGES, class_word="box")
            assert "segmentation" in error.value.message
            assert time.monotonic() - started < 30
            assert list(client.personalization.jobs()) == []


def test_list_jobs_pages_and_filters(service, trained):
    _, client = service
    pers = client.personalization
    client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=1).wait()
    client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=1).wait()
    everything = [j.id for j in pers.jobs(page_size=1000)]
    paged = [j.id for j in pers.jobs(page_size=1)]
    assert paged == everything and len(set(paged)) == len(paged) >= 3
    succeeded = [j for j in pers.jobs(states=["succeeded"], page_size=2)]
    assert succeeded and all(j.state == "SUCCEEDED" for j in succeeded)
    with pytest.raises(atelier.InvalidArgumentError) as error:
        pers._unary("ListJobs", personalization_pb2.ListJobsRequest(page_token="garbage"))
    assert _violations(error) == ["page_token"]


def test_drain_ends_watches_and_hands_the_job_back(tmp_path):
    with in_process_server(tmp_path, checkpoint_every=3) as first:
        client = atelier.Client(personalization=first.address, timeout=60, retries=0)
        job = client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=20000)
        wait_for(lambda: job.refresh().checkpoint_step >= 3, 120, "a checkpoint")
        errors = []

        def watch():
            try:
                for _ in client.personalization._watch(job.id, 0, 60, None):
                    pass
            except atelier.AtelierError as error:
                errors.append(error)

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.5)
        started = time.monotonic()
        first.stop(30)
        assert time.monotonic() - started < 20  # not the whole grace period
        watcher.join(10)
        assert isinstance(errors[0], atelier.UnavailableError) and "resume" in errors[0].message
        client.close()
    # The worker handed the job back: its lease is already expired, so the next replica on this
    # data folder claims it at once and goes on from the checkpoint.
    with in_process_server(tmp_path, checkpoint_every=3) as second:
        with atelier.Client(personalization=second.address, timeout=60) as client:
            wait_for(lambda: client.personalization.job(job.id).attempts == 2, 60, "the takeover")
            resumed_seen = False
            for event in client.personalization.job(job.id).events():  # until a step after the resume
                resumed_seen = resumed_seen or "resumed" in event.message
                if resumed_seen and event.phase == "train":
                    break
            events = list(client.personalization.job(job.id).cancel().events())
            resumed = next(i for i, e in enumerate(events) if "resumed" in e.message)
            after = [e.step for e in events[resumed:] if e.phase == "train"]
            assert after and after[0] > 1 and (after[0] - 1) % 3 == 0


def test_a_job_whose_replicas_keep_dying_is_failed(tmp_path):
    from atelier.personalization.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job, _ = store.create_job(idempotency_key=None, body_hash="b", inputs_hash="0" * 64, method="eqdiff",
                              base_model="toy", placeholder_token="<c>", class_word="box", total_steps=5,
                              max_pending=10)
    for replica in ("dead-1", "dead-2"):  # two replicas claimed it and died without renewing
        assert store.claim(replica, lease_seconds=0.01) is not None
        time.sleep(0.02)
    store.close()
    with in_process_server(tmp_path, job_max_attempts=2) as running:
        with atelier.Client(personalization=running.address, timeout=30) as client:
            failed = wait_for(lambda: (j := client.personalization.job(job.id)).state == "FAILED" and j, 30,
                              "the job to be failed")
            assert failed.attempts == 3 and "gave up after 2 attempts" in failed.reason


def test_cancel_through_another_replica_stops_the_job(tmp_path):
    """Two replicas on one database: a CancelJob sent to the replica that is not running the job
    reaches the runner through the database and stops it within a step or so."""
    with in_process_server(tmp_path, replica_id="A") as a, in_process_server(tmp_path, replica_id="B") as b:
        with atelier.Client(personalization=a.address, timeout=60) as client_a, \
                atelier.Client(personalization=b.address, timeout=60) as client_b:
            job = client_a.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=20000)
            wait_for(lambda: job.refresh().step >= 2, 120, "the job to run")
            runner = next(e.message for e in job.events() if e.message.startswith("started by")).split()[-1]
            other = client_b if runner == "A" else client_a
            step_at_cancel = other.personalization.job(job.id).cancel("from the other replica").step
            with pytest.raises(JobCancelledError):
                job.wait(timeout=60)
            assert job.reason == "from the other replica"
            assert job.step <= step_at_cancel + 3
