"""atelier.aio's synthesis client against real loopback servers (synthesis + inversion, the
embedded toy model): the same requests as the sync client give the same bytes, previews and
progress arrive, errors are typed, cancelling the task ends the call."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image, ImageDraw

import atelier
import atelier.aio
from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.server import start
from atelier.inversion.app import InversionApp
from atelier.synthesis.app import SynthesisApp
from atelier.toyworld import world

pytestmark = pytest.mark.timeout(600)
PROMPT = "a red circle on a blue background"
STEPS = 5


def scribble(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(210, 40, 40))
    return image


def _serve(app_class, service: str, **extras):
    from prometheus_client import CollectorRegistry

    config = ServerConfig(service=service, host="127.0.0.1", port=0, metrics_port=0,
                          max_image_pixels=128 * 128, max_queue=2, extras=extras)
    metrics = Metrics(CollectorRegistry())
    running = start(app_class(config, metrics=metrics), config, metrics)
    assert running.wait_loaded(240), f"the {service} model did not load"
    return running


@pytest.fixture(scope="module")
def address():
    inversion = _serve(InversionApp, "inversion")
    synthesis = _serve(SynthesisApp, "synthesis", inversion_address=inversion.address)
    yield synthesis.address
    synthesis.stop(0)
    inversion.stop(0)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 300))


def test_gradop_and_sdedit_match_the_sync_client(address):
    events, previews = [], []

    async def main():
        async with atelier.aio.Client(synthesis=address) as client:
            gradop = await client.synthesis.gradop_result(
                scribble(), PROMPT, num_inference_steps=STEPS, seed=7, grad_steps=2, progress=events.append,
                preview_every=STEPS, on_preview=previews.append)
            sdedit = await client.synthesis.sdedit(scribble(), PROMPT, num_inference_steps=STEPS, seed=7)
            return gradop, sdedit

    gradop, sdedit = run(main())
    with atelier.Client(synthesis=address) as sync:
        sync_gradop = sync.synthesis.gradop_result(scribble(), PROMPT, num_inference_steps=STEPS, seed=7, grad_steps=2)
        sync_sdedit = sync.synthesis.sdedit(scribble(), PROMPT, num_inference_steps=STEPS, seed=7)
    assert isinstance(gradop, atelier.sdk.synthesis.SynthesisResult) and gradop.seed == 7
    assert np.array_equal(np.asarray(gradop.image), np.asarray(sync_gradop.image))
    assert gradop.stroke_loss == sync_gradop.stroke_loss and gradop.usage.unet_forward_evaluations == STEPS
    assert np.array_equal(np.asarray(sdedit), np.asarray(sync_sdedit))
    assert [p.step for p in previews] == [STEPS] and isinstance(previews[0].image, Image.Image)
    assert {"sample", "optimise"} <= {e.stage for e in events}


def test_variations_match_the_sync_client(address):
    reference = Image.fromarray(world.scene_from_seed(3, num_objects=1).image)

    async def main():
        async with atelier.aio.Client(synthesis=address) as client:
            return await client.synthesis.variations_result(reference, PROMPT, n=2, num_inference_steps=STEPS, seed=2)

    result = run(main())
    with atelier.Client(synthesis=address) as sync:
        images = sync.synthesis.variations(reference, PROMPT, n=2, num_inference_steps=STEPS, seed=2)
    assert len(result.images) == 2 and result.dca_path == "ip_adapter" and result.request_id
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, images))


def test_bad_arguments_are_refused_as_in_the_sync_client(address):
    async def main(**kwargs):
        async with atelier.aio.Client(synthesis=address) as client:
            await client.synthesis.gradop(scribble(), PROMPT, **kwargs)

    with pytest.raises(TypeError, match="unexpected arguments: num_steps"):
        run(main(num_steps=3))  # refused before anything is sent
    with pytest.raises(ValueError, match="on_preview needs preview_every"):
        run(main(on_preview=print))
    with pytest.raises(atelier.InvalidArgumentError) as caught:
        run(main(num_inference_steps=0))
    assert "num_inference_steps" in [field for field, _ in caught.value.field_violations]


def test_cancelling_the_task_ends_the_call(address):
    async def main():
        async with atelier.aio.Client(synthesis=address) as client:
            started = asyncio.Event()
            task = asyncio.create_task(client.synthesis.gradop(
                scribble(), PROMPT, num_inference_steps=200, progress=lambda _: started.set()))
            await asyncio.wait_for(started.wait(), 120)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The server is free again: a short call goes through.
            return await client.synthesis.sdedit(scribble(), PROMPT, num_inference_steps=2, seed=1)

    assert run(main()).size == (64, 64)
