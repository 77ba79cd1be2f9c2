"""Jobs survive their server: kill -9 mid-job then restart (SQLite), and two replicas sharing a
real PostgreSQL server where one is killed and the other takes the job over after its lease."""
from __future__ import annotations

import threading

import pytest

import atelier
from pers_helpers import MASK_ARGS, ServerProcess, concept_image, free_port, wait_for
from postgres_cluster import missing_reason, postgres_cluster

pytestmark = pytest.mark.timeout(600)

STEPS = 150
IMAGES = [concept_image(0), concept_image(1)]


def _train(client, key: str):
    return client.personalization.train_eqdiff(IMAGES, class_word="box", steps=STEPS, idempotency_key=key,
                                               **MASK_ARGS)


def _check_resumed(job, events):
    """After the takeover the job went on from a checkpoint (every 5 steps, at least the one at
    step 10 the test waited for; never back to step 1) and finished."""
    resumed = [i for i, e in enumerate(events) if e.phase == "state" and "resumed" in e.message]
    assert len(resumed) == 1, [e.message for e in events if e.phase == "state"]
    before = [e.step for e in events[:resumed[0]] if e.phase == "train"]
    after = [e.step for e in events[resumed[0]:] if e.phase == "train"]
    checkpoint = after[0] - 1
    assert checkpoint % 5 == 0 and 10 <= checkpoint <= before[-1], (before[-3:], after[:3])
    assert after == list(range(checkpoint + 1, STEPS + 1))
    assert job.state == "SUCCEEDED" and job.attempts == 2


def test_kill_9_then_restart_resumes_from_checkpoint(tmp_path):
    port = free_port()
    server = ServerProcess(tmp_path, port, lease_seconds=2, checkpoint_every=5)
    client = atelier.Client(personalization=server.address, timeout=120)
    try:
        server.wait_serving()
        job = _train(client, "kill-9")
        # job.wait() runs across the crash: it must reconnect and resume its watch.
        outcome = {}
        waiter = threading.Thread(target=lambda: outcome.update(concept=job.wait(timeout=500)), daemon=True)
        waiter.start()
        wait_for(lambda: client.personalization.job(job.id).checkpoint_step >= 10, 300, "a checkpoint at step 10")
        server.kill()
        server.stop()
        server = ServerProcess(tmp_path, port, lease_seconds=2, checkpoint_every=5)
        server.wait_serving()
        waiter.join(500)
        concept = outcome["concept"]
        _check_resumed(job, list(job.events()))
        result = client.personalization.generate(concept, f"a {concept.token}", num_inference_steps=3)
        assert result.image.size == (64, 64)
    finally:
        client.close()
        server.stop()


@pytest.mark.skipif(bool(missing_reason()), reason=missing_reason() or "n/a")
def test_two_replicas_on_postgres_take_over_a_dead_replicas_job(tmp_path):
    with postgres_cluster() as url:
        a = ServerProcess(tmp_path, free_port(), database=url, lease_seconds=3, checkpoint_every=5, replica_id="A")
        b = None
        try:
            a.wait_serving()
            client_a = atelier.Client(personalization=a.address, timeout=120)
            job = _train(client_a, "replicas")
            # Kill A mid-job BEFORE B starts: on an idle machine the whole job takes A a few seconds,
            # less than B's start-up, so killing only once B serves let A finish first (seen in CI).
            wait_for(lambda: job.refresh().checkpoint_step >= 10, 300, "a checkpoint at step 10 on A")
            a.kill()
            client_a.close()
            b = ServerProcess(tmp_path, free_port(), database=url, lease_seconds=3, checkpoint_every=5,
                              replica_id="B")
            b.wait_serving()
            client_b = atelier.Client(personalization=b.address, timeout=120)
            on_b = client_b.personalization.job(job.id)
            assert on_b.id == job.id
            seen = []
            for event in on_b.events():
                seen.append(event)
                if event.phase == "train" and event.step >= 12:
                    break
            assert any("started by A" in e.message for e in seen)
            concept = on_b.wait(timeout=400)
            events = list(on_b.events())
            assert [e.index for e in events] == list(range(len(events)))
            states = [(e.step, e.message) for e in events if e.phase == "state"]
            assert any("resumed by B after the lease of A expired" in m for _, m in states), states
            _check_resumed(on_b, events)
            assert concept.job_id == job.id
            assert len(client_b.personalization.concepts()) == 1
            client_b.close()
        finally:
            a.stop()
            if b is not None:
                b.stop()
