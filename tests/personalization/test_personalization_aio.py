"""atelier.aio's personalization client against a real loopback server (SQLite store, the
textual-inversion test method standing in for EqDiff, the embedded toy model): jobs, watch,
cancel, concepts, export/import and generate behave as in the sync client."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import atelier
import atelier.aio
from atelier.sdk.personalization import JobCancelledError
from pers_helpers import concept_image, in_process_server, square_mask

pytestmark = pytest.mark.timeout(300)

IMAGES = [concept_image(0), concept_image(1)]
MASKS = [square_mask(), square_mask()]


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    with in_process_server(tmp_path_factory.mktemp("pers-aio"), checkpoint_every=5) as running:
        yield running.address


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 240))


def test_train_wait_generate_and_concepts(address):
    seen = []

    async def main():
        async with atelier.aio.Client(personalization=address, timeout=120) as client:
            pers = client.personalization
            job = await pers.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=4, idempotency_key="aio-1")
            assert isinstance(job, atelier.aio.AsyncJob) and job.total_steps == 4
            assert (await pers.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=4,
                                            idempotency_key="aio-1")).id == job.id
            concept = await job.wait(progress=seen.append)
            listed = [j.id async for j in pers.jobs(states=["succeeded"])]
            events = [(e.index, e.state, e.step) async for e in job.events()]
            result = await pers.generate(concept, f"a {concept.token} on a blue background", seed=0,
                                         num_inference_steps=3)
            return job, concept, listed, events, result, await pers.concepts()

    job, concept, listed, events, result, concepts = run(main())
    assert job.state == "SUCCEEDED" and [p.step for p in seen] == [1, 2, 3, 4]
    assert job.id in listed and concept.id in [c.id for c in concepts]
    assert [index for index, _, _ in events] == list(range(len(events))) and events[-1][1] == "SUCCEEDED"
    with atelier.Client(personalization=address) as sync:
        assert [(e.index, e.state, e.step) for e in sync.personalization.job(job.id).events()] == events
        again = sync.personalization.generate(concept, f"a {concept.token} on a blue background", seed=0,
                                              num_inference_steps=3)
    assert result.image.size == (64, 64) and result.concept_id == concept.id and result.seed == 0
    assert np.array_equal(np.asarray(result.image), np.asarray(again.image))


def test_export_import_delete(address, tmp_path):
    async def main():
        async with atelier.aio.Client(personalization=address, timeout=120) as client:
            pers = client.personalization
            concept = await (await pers.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=2)).wait()
            data = await pers.export(concept, tmp_path / "concept.safetensors")
            imported = await pers.import_(tmp_path / "concept.safetensors")
            await pers.delete_concept(imported)
            with pytest.raises(atelier.NotFoundError):
                await pers.concept(imported.id)
            return concept, data, imported

    concept, data, imported = run(main())
    assert data == (tmp_path / "concept.safetensors").read_bytes() and len(data) > 0
    assert imported.id != concept.id and imported.content_hash == concept.content_hash


def test_cancel_a_running_job_and_stop_watching_early(address):
    async def main():
        async with atelier.aio.Client(personalization=address, timeout=120) as client:
            job = await client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, steps=20000)
            first = []
            async for event in job.events():  # leaving the loop ends the watch
                first.append(event)
                if event.phase == "train" and event.step >= 2:
                    break
            await job.cancel("enough")
            with pytest.raises(JobCancelledError):
                await job.wait(timeout=60)
            return job, first

    job, first = run(main())
    assert job.state == "CANCELLED" and job.reason == "enough" and job.step < 20000
    assert first[-1].step >= 2


def test_bad_input_is_refused_like_the_sync_client(address):
    async def main(**kwargs):
        async with atelier.aio.Client(personalization=address) as client:
            await client.personalization.train_eqdiff(IMAGES, class_word="box", masks=MASKS, **kwargs)

    with pytest.raises(TypeError, match="unknown EqDiff options"):
        run(main(not_an_option=1))
    with pytest.raises(atelier.InvalidArgumentError) as caught:
        run(main(steps=0))
    assert caught.value.field_violations

    async def states():
        async with atelier.aio.Client(personalization=address) as client:
            return [job async for job in client.personalization.jobs(states=["finished"])]

    with pytest.raises(ValueError, match="unknown state"):
        run(states())
