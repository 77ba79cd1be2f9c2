"""Every inversion method and editing option through the SDK (sync and asyncio) against a real
loopback inversion server on the embedded toy model: round trips, observable effects, and
field violations that name the SDK argument."""
from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest
from PIL import Image, ImageDraw

import atelier
import atelier.aio
from atelier.aio.inversion import AsyncInversionClient
from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.server import start
from atelier.inversion.app import InversionApp
from atelier.sdk.inversion import InversionClient

pytestmark = pytest.mark.timeout(300)
PROMPT = "a red circle on a blue background"
TARGET = "a green circle on a blue background"
SQUARE = "a red square on a blue background"
STEPS = 3


def scene(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(210, 40, 40))
    return image


@pytest.fixture(scope="module")
def service():
    config = ServerConfig(service="inversion", host="127.0.0.1", port=0, metrics_port=0, max_image_pixels=128 * 128)
    metrics = Metrics()
    running = start(InversionApp(config, metrics=metrics), config, metrics)
    assert running.wait_loaded(240), "the default model did not load"
    client = atelier.Client(inversion=running.address, timeout=120)
    yield running.address, client
    client.close()
    running.stop(0)


def pixels(result: atelier.EditResult) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


@pytest.mark.parametrize("method", ["npi", "proxnpi", "direct_inversion", "null_text", "fixed_point"])
def test_each_new_method_round_trips(service, method):
    _, client = service
    inversion = client.inversion.invert(scene(), PROMPT, method=method, num_inference_steps=STEPS, return_chain=True)
    assert inversion.method == method and inversion.chain.shape == (STEPS + 1, 4, 8, 8)
    if method == "null_text":
        assert inversion.null_embeddings is not None and inversion.null_embeddings.shape[0] == STEPS
        assert np.isfinite(inversion.null_embeddings).all()
        inversion = atelier.Inversion.from_bytes(inversion.to_bytes())  # persisted, embeddings included
        assert inversion.null_embeddings is not None
    else:
        assert inversion.null_embeddings is None
    edited = client.inversion.edit(inversion, TARGET, guidance_scale=2.5)
    assert edited.image.size == (64, 64)


def test_null_text_embeddings_are_what_edit_needs_back(service):
    _, client = service
    inversion = client.inversion.invert(scene(), PROMPT, method="null_text", num_inference_steps=STEPS)
    inversion.proto.ClearField("null_embeddings")
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.edit(inversion, TARGET)
    assert [f for f, _ in info.value.field_violations] == ["source"]


def test_null_text_guidance_scale_reaches_the_optimisation(service):
    _, client = service
    low, high = (client.inversion.invert(scene(), PROMPT, method="null_text", num_inference_steps=STEPS,
                                         null_text_guidance_scale=g).null_embeddings for g in (1.5, 7.5))
    assert low is not None and high is not None and not np.allclose(low, high)


def test_check_first_changes_the_diagnostics_from_both_clients(service):
    address, client = service
    kwargs = dict(method="spdinv", num_inference_steps=STEPS, loss_threshold=1.0)
    reference = client.inversion.invert(scene(), PROMPT, **kwargs)
    assert [d.rounds for d in reference.diagnostics] == [1] * STEPS  # the reference steps once, then checks

    async def check_first():
        async with atelier.aio.Client(inversion=address, timeout=120) as aio_client:
            return await aio_client.inversion.invert(scene(), PROMPT, check_first=True, **kwargs)

    assert [d.rounds for d in asyncio.run(check_first()).diagnostics] == [0] * STEPS


def test_fixed_point_options_reach_the_iteration(service):
    _, client = service
    none = client.inversion.invert(scene(), PROMPT, method="fixed_point", num_inference_steps=STEPS, max_rounds=0)
    some = client.inversion.invert(scene(), PROMPT, method="fixed_point", num_inference_steps=STEPS, max_rounds=3,
                                   loss_threshold=0.0, anderson_memory=0)
    assert [d.rounds for d in none.diagnostics] == [0] * STEPS
    assert [d.rounds for d in some.diagnostics] == [3] * STEPS


def test_editing_options_change_the_image(service):
    _, client = service
    inversion = client.inversion.invert(scene(), PROMPT, method="proxnpi", num_inference_steps=STEPS,
                                        return_chain=True)

    def edit(**kwargs) -> np.ndarray:
        return pixels(client.inversion.edit(inversion, TARGET, guidance_scale=7.5, **kwargs))

    default = edit()
    assert not np.array_equal(default, edit(proximal_guidance=False))
    assert not np.array_equal(default, edit(quantile=0.2))
    assert not np.array_equal(default, edit(preset="spdinv"))
    assert not np.array_equal(edit(inversion_guidance=False),
                              edit(inversion_guidance=True, inversion_guidance_timestep=1000))


def test_masactrl_options_change_the_image_from_the_asyncio_client(service):
    address, client = service
    inversion = client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=STEPS)

    async def edits():
        async with atelier.aio.Client(inversion=address, timeout=120) as aio_client:
            def edit(**kwargs):
                return aio_client.inversion.edit(inversion, SQUARE, engine="masactrl", guidance_scale=2.5,
                                                 start_step=0, start_layer=0, **kwargs)
            return [pixels(r) for r in await asyncio.gather(
                edit(), edit(end_step=0), edit(mask_source_words=["circle"], mask_target_words=["square"]))]

    controlled, uncontrolled, masked = asyncio.run(edits())
    assert not np.array_equal(controlled, uncontrolled)  # end_step=0: no step under mutual self-attention
    assert not np.array_equal(controlled, masked)


@pytest.mark.parametrize("call, kwargs, field", [
    ("invert", dict(method="spdinv", check_first=True, max_rounds=-1), "max_rounds"),
    ("invert", dict(method="fixed_point", max_rounds=-1), "max_rounds"),
    ("invert", dict(method="fixed_point", loss_threshold=-1.0), "loss_threshold"),
    ("invert", dict(method="fixed_point", anderson_memory=99), "anderson_memory"),
    ("invert", dict(method="null_text", null_text_guidance_scale=float("nan")), "null_text_guidance_scale"),
    ("edit_image", dict(method="fixed_point", anderson_memory=-1), "anderson_memory"),
    ("edit_image", dict(method="null_text", null_text_guidance_scale=99.0), "null_text_guidance_scale"),
    ("edit", dict(quantile=1.5), "quantile"),
    ("edit", dict(inversion_guidance_timestep=-1), "inversion_guidance_timestep"),
    ("edit", dict(inversion_guidance=True), "source"),  # the inversion was returned without its chain
    ("edit", dict(engine="masactrl", end_step=-1), "end_step"),
    ("edit_chain", dict(engine="masactrl", inversion_guidance=True, proximal_guidance=True), "inversion_guidance"),
    ("edit", dict(engine="masactrl", mask_source_words=["circle"], mask_target_words=["zebra"]),
     "mask_target_words"),
    ("edit", dict(engine="masactrl", mask_source_words=["circle"], mask_target_words=["circle"],
                  mask_threshold=2.0), "mask_threshold"),
])
def test_bad_values_name_the_sdk_argument(service, call, kwargs, field):
    _, client = service
    with pytest.raises(atelier.InvalidArgumentError) as info:
        if call == "invert":
            client.inversion.invert(scene(), PROMPT, num_inference_steps=STEPS, **kwargs)
        elif call == "edit_image":
            client.inversion.edit(scene(), TARGET, source_prompt=PROMPT, num_inference_steps=STEPS, **kwargs)
        else:
            inversion = client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=STEPS,
                                                return_chain=call == "edit_chain")
            client.inversion.edit(inversion, TARGET, **kwargs)
    assert [f for f, _ in info.value.field_violations] == [field]


def test_options_that_cannot_apply_are_refused_before_sending(service):
    _, client = service
    with pytest.raises(ValueError, match="anderson_memory do not apply to method='spdinv'"):
        client.inversion.invert(scene(), PROMPT, anderson_memory=2)
    with pytest.raises(ValueError, match="check_first do not apply to method='ddim'"):
        client.inversion.invert(scene(), PROMPT, method="ddim", check_first=True)
    with pytest.raises(ValueError, match="unknown edit preset"):
        client.inversion.edit(scene(), TARGET, source_prompt=PROMPT, preset="nope")
    with pytest.raises(ValueError, match="end_step, mask_source_words do not apply to engine='p2p'"):
        client.inversion.edit(scene(), TARGET, source_prompt=PROMPT, end_step=3, mask_source_words=["circle"])
    with pytest.raises(TypeError, match="mask_source_words must be a list"):
        client.inversion.edit(scene(), SQUARE, engine="masactrl", source_prompt=PROMPT, mask_source_words="circle")
    inversion = client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="max_rounds .*apply only when source is an image"):
        client.inversion.edit(inversion, TARGET, max_rounds=3)


def test_the_sync_and_asyncio_clients_take_the_same_arguments():
    for name in ("invert", "edit"):
        sync = inspect.signature(getattr(InversionClient, name)).parameters
        awaited = inspect.signature(getattr(AsyncInversionClient, name)).parameters
        assert list(sync.items()) == list(awaited.items())
