"""Segmentation's models over real gRPC on loopback: SAM only, ListModels, answers sized before
work, per-model metrics and no UNet metrics."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

import atelier
from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.server import start
from atelier.segmentation.app import SegmentationApp, SegmentationSettings
from segmentation_helpers import make_image

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def service(sam_source):
    config = ServerConfig(service="segmentation", host="127.0.0.1", port=0, metrics_port=-1,
                          max_message_bytes=8 << 20, models={"toy-sam": sam_source, "sam-b": sam_source})
    metrics = Metrics(CollectorRegistry())
    app = SegmentationApp(config, SegmentationSettings(), metrics)
    running = start(app, config, metrics)
    assert running.wait_loaded(120) and running.load_error is None, running.load_error
    client = atelier.Client(running.address, timeout=60, retries=0)
    yield running, app, metrics, client
    client.close()
    running.stop(2)


def test_a_stable_diffusion_model_is_refused_by_name(service):
    _, _, _, client = service
    with pytest.raises(atelier.FailedPreconditionError, match="'toy' is a Stable Diffusion model"):
        client.segmentation.segment(make_image(0), points=[(10, 10)], model="toy")


def test_list_models_lists_only_sam_models(service):
    _, _, _, client = service
    models = {m.name: m for m in client.models() if m.service == "segmentation"}
    assert set(models) == {"toy-sam", "sam-b"}
    assert all(m.kind == "sam" and m.available for m in models.values())
    assert models["toy-sam"].is_default and models["toy-sam"].loaded


def test_a_batch_whose_masks_exceed_the_message_limit_is_refused_before_any_work(service):
    _, app, _, client = service
    segmenter = app.segmenter_for("")[1]
    executions = segmenter.batcher.executions
    image = make_image(3)
    prompt_sets = [{"points": [(5, 5)]}] * 256
    with pytest.raises(atelier.InvalidArgumentError, match="message size limit") as caught:
        client.segmentation.segment_many(image, prompt_sets, multimask=True)
    assert caught.value.field_violations[0][0] == "prompt_sets"  # the SDK argument
    assert segmenter.batcher.executions == executions  # the encoder never ran


def test_metrics_are_per_sam_model_and_there_are_no_unet_counters(service):
    _, app, metrics, client = service
    client.segmentation.segment(make_image(4), points=[(10, 10)], model="sam-b")
    value = metrics.registry.get_sample_value
    assert value("atelier_segmentation_cache_entries", {"backend": "local", "model": "sam-b"}) == 1
    assert value("atelier_segmentation_cache_entries", {"backend": "local", "model": "toy-sam"}) is not None
    for name in ("toy-sam", "sam-b"):
        assert value("atelier_model_load_seconds", {"model": name}) > 0
    assert not any(f.name.startswith("atelier_unet") for f in metrics.registry.collect())


def test_the_asyncio_client_lists_the_same_models_and_skips_services_not_there(service):
    import asyncio

    import atelier.aio

    running = service[0]

    async def ask():
        async with atelier.aio.Client(running.address, retries=0) as client:  # every service at one address
            return await client.models()

    assert {(m.service, m.name) for m in asyncio.run(ask())} == {("segmentation", "toy-sam"),
                                                                 ("segmentation", "sam-b")}
