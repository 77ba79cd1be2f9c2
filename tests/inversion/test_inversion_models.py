"""The inversion service's models over real gRPC on loopback: kinds, ListModels, per-model
default guidance, any VAE factor, images resized to the factor, answers sized before work,
bad entries, preloading and the LRU memory budget."""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import atelier
from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.models import EMBEDDED_DIR
from atelier.core.server import start
from atelier.inversion.app import InversionApp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from test_models import clone_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)
PROMPT = "a red circle on a blue background"


def scene(width: int = 64, height: int = 64) -> Image.Image:
    image = Image.new("RGB", (width, height), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(210, 40, 40))
    return image


@pytest.fixture(scope="module")
def factor4(tmp_path_factory) -> str:
    """A tiny SD whose VAE downsamples 4x (three blocks), saved as a diffusers folder."""
    from atelier.core.tiny_models import SD_CONFIGS, build_tiny_sd

    configs = copy.deepcopy(SD_CONFIGS)
    configs["vae"].update(block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                          up_block_types=("UpDecoderBlock2D",) * 3)
    folder = tmp_path_factory.mktemp("f4")
    build_tiny_sd(seed=3, configs=configs).save_pretrained(folder)
    return str(folder)


def _serve(models, **overrides):
    values = dict(service="inversion", host="127.0.0.1", port=0, metrics_port=-1, max_image_pixels=128 * 128,
                  models=models)
    values.update(overrides)
    config = ServerConfig(**values)
    metrics = Metrics()
    running = start(InversionApp(config, metrics=metrics), config, metrics)
    assert running.wait_loaded(240)
    return running, metrics


@pytest.fixture(scope="module")
def service(factor4, tmp_path_factory):
    second = clone_model(EMBEDDED_DIR / "toy", tmp_path_factory.mktemp("second") / "m")
    broken = str(tmp_path_factory.mktemp("broken"))  # an empty folder
    running, metrics = _serve({"f4": factor4, "second": second, "broken": broken}, max_message_bytes=1 << 20)
    assert running.load_error is None, running.load_error
    client = atelier.Client(inversion=running.address, timeout=120, retries=0)
    deadline = time.monotonic() + 120
    while set(running.app.registry.loaded_names()) != {"toy", "f4", "second"} and time.monotonic() < deadline:
        time.sleep(0.1)  # preloading on the loader thread
    yield running, metrics, client
    client.close()
    running.stop(0)


def test_a_sam_model_is_refused_by_name_not_loaded(service):
    _, _, client = service
    with pytest.raises(atelier.FailedPreconditionError, match="'toy-sam' is a SAM model"):
        client.inversion.invert(scene(), PROMPT, num_inference_steps=2, model="toy-sam")
    with pytest.raises(atelier.FailedPreconditionError, match="'broken' is unavailable: neither"):
        client.inversion.invert(scene(), PROMPT, num_inference_steps=2, model="broken")
    with pytest.raises(atelier.NotFoundError):
        client.inversion.invert(scene(), PROMPT, num_inference_steps=2, model="nope")


def test_list_models_lists_this_services_kind_with_defaults_and_no_paths(service):
    running, _, client = service
    models = {m.name: m for m in client.models()}
    assert set(models) == {"toy", "f4", "second", "broken"}  # not toy-sam: that is segmentation's
    toy = models["toy"]
    assert (toy.service, toy.kind, toy.is_default, toy.available, toy.loaded) == \
        ("inversion", "stable-diffusion", True, True, True)
    assert toy.default_guidance_scale == 2.5 and toy.dtype == "float32"  # the toy's atelier.json
    assert models["f4"].default_guidance_scale == 7.5 and models["f4"].loaded  # preloaded
    assert not models["broken"].available and "neither" in models["broken"].unavailable_reason
    assert not any("/" in m.unavailable_reason for m in models.values())


def test_a_vae_with_another_factor_inverts_and_edits(service):
    _, _, client = service
    inversion = client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=3, model="f4")
    assert inversion.z_T.shape == (1, 4, 16, 16) and (inversion.width, inversion.height) == (64, 64)
    edited = client.inversion.edit(inversion, "a green circle on a blue background", guidance_scale=1.0)
    assert edited.image.size == (64, 64)


def test_images_are_resized_to_the_vae_factor_like_diffusers(service):
    _, _, client = service
    inversion = client.inversion.invert(scene(60, 68), PROMPT, method="ddim", num_inference_steps=2)
    assert (inversion.width, inversion.height) == (56, 64) and inversion.z_T.shape == (1, 4, 8, 7)
    assert client.inversion.edit(inversion, PROMPT).image.size == (56, 64)


def test_unset_guidance_uses_the_models_default(service):
    _, _, client = service
    inversion = client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=3)
    target = "a green circle on a blue background"
    unset = np.asarray(client.inversion.edit(inversion, target).image)
    assert np.array_equal(unset, np.asarray(client.inversion.edit(inversion, target, guidance_scale=2.5).image))
    assert not np.array_equal(unset, np.asarray(client.inversion.edit(inversion, target, guidance_scale=7.5).image))


def test_an_answer_over_the_message_limit_is_refused_before_any_work(service):
    running, metrics, client = service
    before = metrics.registry.get_sample_value("atelier_unet_evaluations_total", {"kind": "forward"})
    with pytest.raises(atelier.InvalidArgumentError, match="message size limit") as caught:
        client.inversion.invert(scene(128, 128), PROMPT, method="ddim", num_inference_steps=999, return_chain=True)
    assert caught.value.field_violations[0][0] == "return_chain"
    assert metrics.registry.get_sample_value("atelier_unet_evaluations_total", {"kind": "forward"}) == before


def test_every_loaded_model_reports_its_load_time(service):
    _, metrics, _ = service
    for name in ("toy", "f4", "second"):
        assert metrics.registry.get_sample_value("atelier_model_load_seconds", {"model": name}) > 0
        assert metrics.registry.get_sample_value("atelier_model_loaded",
                                                 {"model": name, "kind": "stable-diffusion"}) == 1


def test_a_bad_entry_fails_a_strict_start(tmp_path):
    config = ServerConfig(service="inversion", host="127.0.0.1", port=0, metrics_port=-1,
                          models={"broken": str(tmp_path)}, strict_models=True)
    metrics = Metrics()
    running = start(InversionApp(config, metrics=metrics), config, metrics)
    try:
        assert running.wait_loaded(120)
        assert "model 'broken': neither a Stable Diffusion folder" in str(running.load_error)
    finally:
        running.stop(0)


def test_a_tiny_memory_budget_unloads_the_least_recently_used_model(tmp_path):
    second = clone_model(EMBEDDED_DIR / "toy", tmp_path / "second")
    running, _ = _serve({"second": second}, model_memory_bytes=1, preload_models=False)
    client = atelier.Client(inversion=running.address, timeout=120, retries=0)
    try:
        assert {m.name for m in client.models() if m.loaded} == {"toy"}
        client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=2, model="second")
        assert {m.name for m in client.models() if m.loaded} == {"second"}
        client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=2)  # toy again: reloaded
        assert {m.name for m in client.models() if m.loaded} == {"toy"}
    finally:
        client.close()
        running.stop(0)
