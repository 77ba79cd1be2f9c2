"""The layer_edit job kind on loopback: segmentation + personalization servers, through the SDK."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import atelier
from atelier.sdk.personalization import JobCancelledError
from pers_helpers import wait_for

pytestmark = pytest.mark.timeout(600)

SHORT = dict(embedding_steps=2, finetune_steps=2, num_inference_steps=3, num_images=2, reference_steps=3)


def toy_scene(seed, kind="solid", colour="white", shape="circle", object_colour="green"):
    from atelier.toyworld import world

    scene = world.render(world.sample_spec(np.random.default_rng(seed), num_objects=1, shapes=[shape],
                                           colours=[object_colour], background_kind=kind,
                                           background_colour=colour))
    return scene.image, scene.masks[0]


@pytest.fixture(scope="module")
def segmentation():
    from prometheus_client import CollectorRegistry

    from atelier.core.config import ServerConfig
    from atelier.core.metrics import Metrics
    from atelier.core.server import start
    from atelier.segmentation.app import SegmentationApp

    config = ServerConfig(service="segmentation", host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1)
    metrics = Metrics(CollectorRegistry())
    running = start(SegmentationApp(config, metrics=metrics), config, metrics)
    assert running.wait_loaded(120) and running.load_error is None
    yield running
    running.stop(1)


@contextlib.contextmanager
def layer_edit_server(data_dir, segmentation_address, checkpoint_every=50):
    """A personalization server offering the real layer_edit method."""
    from prometheus_client import CollectorRegistry

    from atelier.core.config import ServerConfig
    from atelier.core.metrics import Metrics
    from atelier.core.server import start
    from atelier.personalization.app import PersonalizationApp
    from atelier.personalization.layerdiffusion.job import LayerEditMethod

    config = ServerConfig(service="personalization", host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1,
                          max_queue=8, max_image_pixels=256 * 256, extras=dict(
                              data_dir=str(data_dir), segmentation_address=segmentation_address,
                              checkpoint_every=checkpoint_every, job_poll_seconds=0.2, lease_seconds=30.0))
    metrics = Metrics(CollectorRegistry())
    app = PersonalizationApp(config, metrics=metrics, methods={"layer_edit": LayerEditMethod()})
    running = start(app, config, metrics)
    app.attach(running)
    try:
        assert running.wait_loaded(240) and running.load_error is None, running.load_error
        yield running
    finally:
        running.stop(1)


@pytest.fixture(scope="module")
def service(tmp_path_factory, segmentation):
    with layer_edit_server(tmp_path_factory.mktemp("layer"), segmentation.address, checkpoint_every=2) as running:
        client = atelier.Client(personalization=running.address, timeout=120)
        yield running, client
        client.close()


def test_layer_edit_end_to_end_with_generated_reference_and_segmented_masks(service):
    _, client = service
    image, _ = toy_scene(3)
    seen = []
    job = client.personalization.layer_edit(image, "a red circle", "on a striped blue background", seed=5, **SHORT)
    assert job.total_steps == 1 + 2 + 2 + 2
    result = job.wait(progress=seen.append)
    assert [p.stage for p in seen] == ["reference"] + ["embedding"] * 2 + ["finetune"] * 2 + ["sample"] * 2
    assert [p.step for p in seen] == list(range(1, 8))
    assert "embedding=" in seen[1].message and "background=" in seen[3].message
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    concept = result.concept
    assert concept.method == "layer_edit" and concept.model == "toy"
    # the concept draws more seeds; the job's own seed redraws the job's images exactly
    # (Generate's guidance defaults to the model's; the job sampled at the paper's 7.5)
    again = client.personalization.generate(concept, "", seed=5, num_images=2, num_inference_steps=3,
                                            guidance_scale=7.5)
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again.images, result.images)] == [True, True]
    other = client.personalization.generate(concept, "", seed=50, num_inference_steps=3)
    assert not np.array_equal(np.asarray(other.image), np.asarray(result.images[0]))


def test_layer_edit_with_a_reference_and_masks(service):
    _, client = service
    image, mask = toy_scene(3)
    reference, reference_mask = toy_scene(11, kind="striped", colour="blue", shape="triangle", object_colour="red")
    job = client.personalization.layer_edit(image, "a red circle", "on a striped blue background",
                                            reference=reference, mask=mask, reference_mask=reference_mask,
                                            alpha=0.5, iterative_guidance=False, **SHORT)
    assert job.total_steps == 2 + 2 + 2
    result = job.wait()
    assert len(result.images) == 2


def test_the_asyncio_client_runs_the_same_layer_edit(service):
    import asyncio

    import atelier.aio

    running, client = service
    image, mask = toy_scene(3)
    reference, reference_mask = toy_scene(11, kind="striped", colour="blue", shape="triangle", object_colour="red")
    kwargs = dict(reference=reference, mask=mask, reference_mask=reference_mask, seed=9, **SHORT)
    seen = []

    async def main():
        async with atelier.aio.Client(personalization=running.address, timeout=120) as aio_client:
            job = await aio_client.personalization.layer_edit(image, "a red circle", "on a striped blue background",
                                                              **kwargs)
            return await job.wait(progress=seen.append)

    result = asyncio.run(asyncio.wait_for(main(), 300))
    expected = client.personalization.layer_edit(image, "a red circle", "on a striped blue background",
                                                 **kwargs).wait()
    assert isinstance(result, atelier.sdk.personalization.LayerEditResult) and result.concept.method == "layer_edit"
    assert [p.stage for p in seen] == ["embedding"] * 2 + ["finetune"] * 2 + ["sample"] * 2
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, expected.images)] == [True] * 2


def test_cancel_and_resume(tmp_path, segmentation):
    image, mask = toy_scene(3)
    reference, reference_mask = toy_scene(11, kind="striped", colour="blue", shape="triangle")
    kwargs = dict(reference=reference, mask=mask, reference_mask=reference_mask, seed=1,
                  embedding_steps=6, finetune_steps=6, num_inference_steps=3, num_images=1)
    with layer_edit_server(tmp_path / "a", segmentation.address, checkpoint_every=2) as running:
        client = atelier.Client(personalization=running.address, timeout=120)
        straight = client.personalization.layer_edit(image, "a red circle", "on a striped blue background",
                                                     **kwargs).wait()
        job = client.personalization.layer_edit(image, "a red circle", "on a striped blue background",
                                                embedding_steps=200, finetune_steps=2, reference=reference,
                                                mask=mask, reference_mask=reference_mask)
        wait_for(lambda: job.refresh().step >= 2, 120, "the job to start")
        job.cancel("enough")
        with pytest.raises(JobCancelledError):
            job.wait()
        assert job.refresh().step < 200
        resumed = client.personalization.layer_edit(image, "a red circle", "on a striped blue background", **kwargs)
        wait_for(lambda: resumed.refresh().checkpoint_step >= 4, 120, "a checkpoint at step 4")
        client.close()
    # the replica stops (its lease is released); another one on the same data resumes the job
    with layer_edit_server(tmp_path / "a", segmentation.address, checkpoint_every=2) as running:
        client = atelier.Client(personalization=running.address, timeout=120)
        job = client.personalization.job(resumed.id)
        result = job.wait()
        assert job.refresh().attempts >= 2
        assert np.array_equal(np.asarray(result.images[0]), np.asarray(straight.images[0]))
        client.close()


def _violations(error):
    return [field for field, _ in error.value.field_violations]


def test_bad_inputs_name_their_fields(service):
    _, client = service
    image, mask = toy_scene(3)
    reference, reference_mask = toy_scene(11, kind="striped", colour="blue")
    small, _ = toy_scene(4)
    cases = [
        (dict(object_text=""), "object_text"),
        (dict(background_text="  "), "background_text"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.5), "alpha"),
        (dict(reference=small[:32, :32], reference_mask=reference_mask[:32, :32]), "reference"),
        (dict(mask=np.zeros_like(mask)), "masks[0]"),
        (dict(mask=np.ones_like(mask)), "masks[0]"),
        (dict(reference=reference, reference_mask=np.zeros_like(reference_mask)), "reference_mask"),
        (dict(reference=reference, reference_mask=np.ones_like(reference_mask)), "reference_mask"),
        (dict(embedding_steps=0), "embedding_steps"),
    ]
    for change, field in cases:
        kwargs = dict(image=image, object_text="a red circle", background_text="on a striped blue background",
                      mask=mask, **SHORT)
        kwargs.update(change)
        with pytest.raises(atelier.InvalidArgumentError) as error:
            client.personalization.layer_edit(**kwargs)
        assert field in _violations(error), (field, error.value)
    with pytest.raises(TypeError):
        client.personalization.layer_edit(image, "a red circle", "on a blue background", no_such_option=1)
