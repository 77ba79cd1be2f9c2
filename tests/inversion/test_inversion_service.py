"""The inversion service end to end: a real gRPC server on loopback, driven through the SDK."""
from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image, ImageDraw

import atelier
from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.server import start
from atelier.inversion.app import InversionApp
from atelier.v1 import inversion_pb2, inversion_pb2_grpc

pytestmark = pytest.mark.timeout(300)
PROMPT = "a red circle on a blue background"


def scene(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(210, 40, 40))
    return image


def _serve(**config_overrides):
    config = ServerConfig(service="inversion", host="127.0.0.1", port=0, metrics_port=0,
                          max_image_pixels=128 * 128, **config_overrides)
    metrics = Metrics()
    running = start(InversionApp(config, metrics=metrics), config, metrics)
    assert running.wait_loaded(240), "the default model did not load"
    return running, metrics


@pytest.fixture(scope="module")
def service():
    running, metrics = _serve(max_queue=0)
    client = atelier.Client(inversion=running.address, timeout=120)
    yield running, metrics, client
    client.close()
    running.stop(0)


def unet_evaluations(metrics: Metrics) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        if family.name == "atelier_unet_evaluations":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def wait_idle(running, timeout: float = 60.0) -> None:
    executor = running.app.executor
    deadline = time.monotonic() + timeout
    while (executor.busy() or executor.queue_depth()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not executor.busy(), "the executor is still busy"


def test_invert_then_edit_round_trip(service):
    running, _, client = service
    events = []
    inv = client.inversion.invert(scene(), PROMPT, method="spdinv", num_inference_steps=4, return_chain=True, progress=events.append)
    assert inv.z_T.shape == (1, 4, 8, 8) and inv.chain.shape == (5, 4, 8, 8)
    np.testing.assert_allclose(inv.chain[-1:], inv.z_T)
    assert [d.index for d in inv.diagnostics] == [1, 2, 3, 4]
    assert all(d.residual >= 0 and 0 <= d.rounds <= 25 for d in inv.diagnostics)
    assert inv.usage.unet_forward_evaluations + inv.usage.unet_backward_evaluations >= 4
    assert events and events[-1].step == events[-1].total
    edited = client.inversion.edit(inv, "a green circle on a blue background", engine="p2p")
    assert edited.image.size == (64, 64) and edited.image.mode == "RGB" and edited.source_image is None
    both = client.inversion.edit(inv, "a red square on a blue background", engine="masactrl", return_source=True)
    assert both.image.size == both.source_image.size == (64, 64)
    assert both.usage.unet_forward_evaluations == 4  # one batched UNet call per step


def test_edit_inverts_an_image_in_the_same_call(service):
    _, _, client = service
    edited = client.inversion.edit(scene(), "a green circle on a blue background", source_prompt=PROMPT,
                                   method="ddim", num_inference_steps=3)
    assert edited.image.size == (64, 64)


def test_ddim_chain_is_deterministic_and_spdinv_lowers_the_residual(service):
    _, _, client = service
    ddim = client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=4)
    again = client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=4)
    np.testing.assert_array_equal(ddim.z_T, again.z_T)
    spd = client.inversion.invert(scene(), PROMPT, method="spdinv", num_inference_steps=4)
    assert np.mean([d.residual for d in spd.diagnostics]) < np.mean([d.residual for d in ddim.diagnostics])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 100000}, "num_inference_steps"),
        ({"image": scene(4)}, "image"),  # below the VAE factor (other sizes are resized)
        ({"image": scene(256)}, "image"),
        ({"learning_rate": -1.0}, "learning_rate"),
    ],
)
def test_bad_invert_requests_name_the_field(service, kwargs, field):
    _, _, client = service
    image = kwargs.pop("image", scene())
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.invert(image, PROMPT, **kwargs)
    fields = [f for f, _ in info.value.field_violations]
    assert any(f == field or f.startswith(field + ".") for f in fields), fields


def test_unknown_model_is_not_found(service):
    _, _, client = service
    with pytest.raises(atelier.NotFoundError):
        client.inversion.invert(scene(), PROMPT, num_inference_steps=2, model="no-such-model")


def test_malformed_latent_and_empty_target_prompt(service):
    _, _, client = service
    inv = client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=2)
    broken = atelier.Inversion.from_bytes(inv.to_bytes())
    broken.proto.z_t.raw = broken.proto.z_t.raw[:-4]
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.edit(broken, "a green circle on a blue background")
    assert any(f.startswith("source.z_t") for f, _ in info.value.field_violations)
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.edit(inv, "   ")
    assert [f for f, _ in info.value.field_violations] == ["target_prompt"]


def _long_invert_request() -> inversion_pb2.InvertRequest:
    # SPDInv that never meets its threshold: 25 gradient rounds per step, long enough to interrupt.
    return dict(method="spdinv", num_inference_steps=200, loss_threshold=0.0)


def test_deadline_mid_run_stops_compute(service):
    running, metrics, client = service
    wait_idle(running)
    before = unet_evaluations(metrics)
    with pytest.raises(atelier.DeadlineExceededError):
        client.inversion.invert(scene(), PROMPT, timeout=1.5, **_long_invert_request())
    wait_idle(running)
    stopped_at = unet_evaluations(metrics)
    assert stopped_at > before, "the call never started computing"
    time.sleep(0.5)
    assert unet_evaluations(metrics) == stopped_at, "UNet evaluations went on after the deadline"


def test_client_cancel_stops_compute(service):
    running, metrics, client = service
    wait_idle(running)
    cancel = atelier.CancelToken()
    seen = []

    def on_progress(event):
        seen.append(event)
        if len(seen) == 3:
            cancel.cancel()

    before = unet_evaluations(metrics)
    with pytest.raises(atelier.CancelledError):
        client.inversion.invert(scene(), PROMPT, progress=on_progress, cancel=cancel, **_long_invert_request())
    wait_idle(running)
    stopped_at = unet_evaluations(metrics)
    assert stopped_at > before
    time.sleep(0.5)
    assert unet_evaluations(metrics) == stopped_at


def test_full_queue_is_resource_exhausted(service):
    running, _, client = service
    wait_idle(running)
    cancel = atelier.CancelToken()
    started = threading.Event()
    outcome = {}

    def long_call():
        try:
            client.inversion.invert(scene(), PROMPT, cancel=cancel, progress=lambda e: started.set(),
                                    **_long_invert_request())
        except atelier.AtelierError as error:
            outcome["error"] = error

    worker = threading.Thread(target=long_call)
    worker.start()
    try:
        assert started.wait(60)
        with pytest.raises(atelier.ResourceExhaustedError):  # max_queue=0: nothing may wait
            client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=2)
    finally:
        cancel.cancel()
        worker.join(60)
        wait_idle(running)
    assert isinstance(outcome.get("error"), atelier.CancelledError)


def test_health_reflection_and_metrics(service):
    running, _, client = service
    wait_idle(running)
    client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=2)
    with grpc.insecure_channel(running.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "atelier.v1.Inversion"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert "atelier.v1.Inversion" in names
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Invert",grpc_service="atelier.v1.Inversion",grpc_type="server_stream"}' in text
    assert "atelier_model_load_seconds" in text


def test_bad_edit_options_are_refused_before_any_compute(service):
    running, metrics, client = service
    wait_idle(running)
    before = unet_evaluations(metrics)
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.edit(scene(), "a green circle on a blue background", source_prompt=PROMPT,
                              num_inference_steps=5, cross_replace_fraction=1.5, start_step=None)
    assert [f for f, _ in info.value.field_violations] == ["cross_replace_fraction"]
    assert unet_evaluations(metrics) == before  # the inversion in the same call never ran


def test_a_long_unknown_model_name_is_not_found_without_leaks(service):
    _, _, client = service
    name = "m" * 10_000
    with pytest.raises(atelier.NotFoundError) as info:  # not RESOURCE_EXHAUSTED (trailer too big)
        client.inversion.invert(scene(), PROMPT, num_inference_steps=2, model=name)
    message = info.value.message
    assert "'mmm" in message and len(message) < 300
    assert "toy" not in message and "/" not in message  # neither the model list nor folders


def test_every_bad_invert_field_is_reported_at_once(service):
    _, _, client = service
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.invert(scene(256), "p" * 5000, num_inference_steps=0, learning_rate=-1.0)
    fields = {f.split(".")[0] if f.startswith("image") else f for f, _ in info.value.field_violations}
    assert {"image", "prompt", "num_inference_steps", "learning_rate"} <= fields, fields


def test_all_training_timesteps_run_until_the_deadline(service):
    running, _, client = service
    wait_idle(running)
    events = []
    with pytest.raises(atelier.DeadlineExceededError):  # not INTERNAL (t = 1000 overflowed)
        client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=1000, timeout=3,
                                progress=events.append)
    assert events, "the inversion never started stepping"
    wait_idle(running)


@pytest.mark.parametrize("option", ["learning_rate", "weight_decay", "loss_threshold"])
def test_spdinv_options_beyond_float32_are_invalid_argument(service, option):
    # Found by tests/fuzz: 1e308 passed isfinite and overflowed AdamW's float32 scalars (INTERNAL).
    _, _, client = service
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.invert(scene(), PROMPT, num_inference_steps=2, **{option: 1e308})
    assert [f for f, _ in info.value.field_violations] == [option]


def test_the_asyncio_client_inverts_and_edits_like_the_sync_one(service):
    import asyncio

    import atelier.aio

    running, _, client = service
    want = client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=3)

    async def main():
        async with atelier.aio.Client(inversion=running.address, timeout=120) as aio_client:
            inv = await aio_client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=3)
            edited = await aio_client.inversion.edit(inv, "a green circle on a blue background")
            return inv, edited

    inv, edited = asyncio.run(main())
    np.testing.assert_array_equal(inv.z_T, want.z_T)  # DDIM inversion is deterministic
    assert edited.image.size == (64, 64)


def test_edit_of_an_image_names_the_edit_arguments(service):
    _, _, client = service
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.edit(scene(4), "a green circle on a blue background", source_prompt=PROMPT)
    assert [f.split(".")[0] for f, _ in info.value.field_violations] == ["source"]  # not invert.image
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.edit(scene(), "a green circle on a blue background", source_prompt=PROMPT,
                              num_inference_steps=0)
    assert [f for f, _ in info.value.field_violations] == ["num_inference_steps"]
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.edit(scene(), "a green circle on a blue background", source_prompt="x" * 5000)
    assert [f for f, _ in info.value.field_violations] == ["source_prompt"]


def _edit_violations(address: str, request: inversion_pb2.EditRequest) -> set[str]:
    """The BadRequest field names of a raw Edit call (which must fail with INVALID_ARGUMENT)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with grpc.insecure_channel(address) as channel:
        stub = inversion_pb2_grpc.InversionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Edit(request, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    fields = set()
    for detail in rpc_status.from_call(info.value).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields |= {v.field for v in bad.field_violations}
    return fields


def test_every_bad_edit_field_is_reported_at_once_without_a_source(service):
    # Values the SDK refuses itself (unknown enums) reach the server through the raw API.
    running, metrics, _ = service
    wait_idle(running)
    before = unet_evaluations(metrics)
    request = inversion_pb2.EditRequest(
        target_prompt="t" * 5000, engine=99, guidance_scale=100.0, preset=99, concept_id="\x01",
        p2p=inversion_pb2.P2POptions(mode=99),
        prox_edit=inversion_pb2.ProxEditOptions(quantile=2.0, inversion_guidance_timestep=-1))
    fields = _edit_violations(running.address, request)
    assert fields == {"source", "target_prompt", "engine", "guidance_scale", "preset", "concept", "mode",
                      "quantile", "inversion_guidance_timestep"}, fields
    assert unet_evaluations(metrics) == before


def test_every_bad_edit_field_is_reported_beside_a_bad_source(service):
    running, metrics, client = service
    wait_idle(running)
    before = unet_evaluations(metrics)
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.edit(scene(), "a green circle on a blue background", source_prompt=PROMPT,
                              num_inference_steps=0, guidance_scale=100.0, quantile=2.0,
                              inversion_guidance_timestep=-1, cross_replace_fraction=1.5)
    fields = {f for f, _ in info.value.field_violations}
    assert fields == {"num_inference_steps", "guidance_scale", "quantile", "inversion_guidance_timestep",
                      "cross_replace_fraction"}, fields
    assert unet_evaluations(metrics) == before  # the inversion in the same call never ran


def test_every_bad_masactrl_edit_field_is_reported_at_once(service):
    _, _, client = service
    inv = client.inversion.invert(scene(), PROMPT, method="ddim", num_inference_steps=2)
    with pytest.raises(atelier.InvalidArgumentError) as info:
        client.inversion.edit(inv, "a red square on a blue background", engine="masactrl", guidance_scale=-1.0,
                              start_layer=999, mask_threshold=2.0, quantile=0.0)
    fields = {f for f, _ in info.value.field_violations}
    assert fields == {"guidance_scale", "start_layer", "mask_threshold", "quantile"}, fields
