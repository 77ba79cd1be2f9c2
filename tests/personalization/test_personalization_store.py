"""The job store and artifact folder on their own (SQLite): claims, leases, event indices,
retention, atomic content-addressed files."""
from __future__ import annotations

import threading
import time

import pytest

from atelier.personalization.artifacts import ArtifactStore
from atelier.personalization.database import ConceptRow
from atelier.personalization.store import IdempotencyConflict, JobStore, QueueFull


@pytest.fixture
def store(tmp_path):
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


def _create(store, key=None, body="b", max_pending=10):
    return store.create_job(idempotency_key=key, body_hash=body, inputs_hash="0" * 64, method="eqdiff",
                            base_model="toy", placeholder_token="<c>", class_word="box", total_steps=5,
                            max_pending=max_pending)


def test_claim_is_exclusive_and_expired_leases_are_taken_over(store):
    job, created = _create(store)
    assert created and job.state == "PENDING" and job.next_event == 1
    results = []
    barrier = threading.Barrier(4)

    def claim(owner):
        barrier.wait()
        results.append((owner, store.claim(owner, lease_seconds=0.5)))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [(owner, claimed) for owner, claimed in results if claimed is not None]
    assert len(winners) == 1
    owner, (claimed, took_over) = winners[0]
    assert claimed.lease_owner == owner and not took_over and claimed.attempts == 1
    assert store.claim("other", 0.5) is None  # lease still valid
    assert store.record_step(job.id, owner, 1, 5, "train", {"loss": 1.0}) is False
    time.sleep(0.6)
    again, took_over = store.claim("other", 5)
    assert took_over and again.lease_owner == "other" and again.attempts == 2
    # The old owner lost its lease: its writes are refused.
    assert store.record_step(job.id, owner, 2, 5, "train", {}) is None
    assert store.renew(job.id, owner, 5) is None
    assert store.set_checkpoint(job.id, owner, "1" * 64, 2) is None


def test_event_indices_are_dense_under_concurrent_writers(store):
    job, _ = _create(store)
    store.claim("w", 30)

    def write(n):
        for i in range(n):
            store.record_step(job.id, "w", i, 5, "train", {})

    def cancel():
        store.request_cancel(job.id, "stop")

    threads = [threading.Thread(target=write, args=(20,)) for _ in range(3)] + [threading.Thread(target=cancel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = store.events(job.id, 0, limit=1000)
    assert [e.idx for e in events] == list(range(len(events))) and len(events) == 2 + 60
    assert store.get_job(job.id).cancel_requested


def test_idempotency_and_bounded_queue(store):
    first, created = _create(store, key="k", body="x")
    again, created_again = _create(store, key="k", body="x")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        _create(store, key="k", body="y")
    with pytest.raises(QueueFull):
        _create(store, max_pending=1)


def test_retention_deletes_finished_jobs_but_not_concepts(store, tmp_path):
    artifacts = ArtifactStore(tmp_path / "a")
    inputs = artifacts.put(b"inputs")
    job, _ = store.create_job(idempotency_key=None, body_hash="b", inputs_hash=inputs, method="eqdiff",
                              base_model="toy", placeholder_token="<c>", class_word="box", total_steps=1,
                              max_pending=10)
    store.claim("w", 30)
    concept_file = artifacts.put(b"concept")
    row = ConceptRow(id="concept-1", job_id=job.id, placeholder_token="<c>", class_word="box", base_model="toy",
                     method="eqdiff", content_hash=concept_file, size_bytes=7, create_time=time.time(), metadata="{}")
    assert store.succeed(job.id, "w", row)
    assert store.purge_finished(time.time() - 3600) == []  # too recent
    assert store.purge_finished(time.time() + 1) == [inputs]
    assert store.get_job(job.id) is None and store.events(job.id, 0) == []
    assert store.get_concept("concept-1") is not None and store.unreferenced(inputs)
    assert not store.unreferenced(concept_file)


def test_checkpoint_parts_live_exactly_as_long_as_a_checkpoint_refers_to_them(store):
    c1, c2, c3, p1, p2 = (str(i) * 64 for i in range(1, 6))
    job, _ = _create(store)
    store.claim("w", 30)
    assert store.set_checkpoint(job.id, "w", c1, 1, parts=[p1]) == []
    assert not store.unreferenced(p1)
    assert store.set_checkpoint(job.id, "w", c2, 2, parts=[p1]) == [c1]  # the part is kept, not re-counted
    assert store.set_checkpoint(job.id, "w", c3, 3, parts=[p2]) == sorted([c2, p1])
    assert store.set_checkpoint(job.id, "x", c1, 4, parts=[p1]) is None  # not the lease holder
    assert store.get_job(job.id).checkpoint_hash == c3
    assert store.clear_checkpoint(job.id) == []  # still running: the checkpoint is kept
    assert store.end(job.id, "w", "FAILED", "boom")
    assert store.clear_checkpoint(job.id) == sorted([c3, p2])
    assert store.unreferenced(p2) and store.get_job(job.id).checkpoint_hash is None
    # a finished job whose checkpoint was never cleared: retention releases the checkpoint and its parts
    other, _ = _create(store)
    store.claim("w", 30)
    store.set_checkpoint(other.id, "w", c1, 1, parts=[p1])
    assert store.end(other.id, "w", "CANCELLED", "stop")
    assert set(store.purge_finished(time.time() + 1)) == {"0" * 64, c1, p1}


def test_artifacts_are_content_addressed_and_checked(tmp_path):
    artifacts = ArtifactStore(tmp_path)
    digest = artifacts.put(b"hello")
    assert artifacts.put(b"hello") == digest and artifacts.get(digest) == b"hello"
    assert not list(artifacts.path(digest).parent.glob(".tmp-*"))
    artifacts.path(digest).write_bytes(b"hellO")
    with pytest.raises(OSError, match="corrupt"):
        artifacts.get(digest)
    artifacts.delete(digest)
    artifacts.delete(digest)  # idempotent
    with pytest.raises(FileNotFoundError):
        artifacts.get(digest)
