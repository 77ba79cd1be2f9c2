"""The synthesis service end to end: real gRPC servers (synthesis and inversion) on loopback,
driven through the SDK."""
from __future__ import annotations

import shutil
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw

import atelier
from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.models import EMBEDDED_DIR
from atelier.core.server import start
from atelier.inversion.app import InversionApp
from atelier.sdk.common import to_image_proto
from atelier.sdk.synthesis import Region
from atelier.synthesis.app import SynthesisApp
from atelier.toyworld import world
from atelier.v1 import synthesis_pb2, synthesis_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.timeout(600)
PROMPT = "a red circle on a blue background"
STEPS = 10  # strength 0.8 -> optimisation after steps 2, 3, 4


def scribble(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(210, 40, 40))
    return image


def _serve(app_class, service: str, **extras):
    config = ServerConfig(service=service, host="127.0.0.1", port=0, metrics_port=0,
                          max_image_pixels=128 * 128, max_queue=2, extras=extras)
    metrics = Metrics()
    running = start(app_class(config, metrics=metrics), config, metrics)
    assert running.wait_loaded(240), f"the {service} model did not load"
    return running, metrics


@pytest.fixture(scope="module")
def servers():
    inversion, inversion_metrics = _serve(InversionApp, "inversion")
    synthesis, synthesis_metrics = _serve(SynthesisApp, "synthesis", inversion_address=inversion.address)
    client = atelier.Client(synthesis=synthesis.address, timeout=300)
    yield {"inversion": inversion, "inversion_metrics": inversion_metrics, "synthesis": synthesis,
           "synthesis_metrics": synthesis_metrics, "client": client}
    client.close()
    synthesis.stop(0)
    inversion.stop(0)


def unet_evaluations(metrics: Metrics) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        if family.name == "atelier_unet_evaluations":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


# ---------------------------------------------------------------------------------- GradOP+ / SDEdit

def test_gradop_streams_previews_counts_decoder_passes_and_is_deterministic(servers):
    client = servers["client"]
    events, previews = [], []
    first = client.synthesis.gradop_result(scribble(), PROMPT, num_inference_steps=STEPS, seed=7,
                                           progress=events.append, preview_every=5, on_preview=previews.append)
    assert first.image.size == (64, 64) and first.image.mode == "RGB"
    assert first.seed == 7
    assert first.usage.vae_decoder_backward_evaluations == 3 * 12  # iterative_steps x grad_steps
    assert first.usage.unet_forward_evaluations == STEPS
    assert [p.step for p in previews] == [5, 10] and previews[0].image.size == (32, 32)
    assert {e.stage for e in events} >= {"sample", "optimise"}
    again = client.synthesis.gradop_result(scribble(), PROMPT, num_inference_steps=STEPS, seed=7)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    other = client.synthesis.gradop_result(scribble(), PROMPT, num_inference_steps=STEPS, seed=8)
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_stroke_fidelity_gradop_beats_sdedit_and_text_to_image(servers):
    """Toy-world scribbles (flat paintings of one-object scenes) with their captions, default
    strength 0.8, same seed for all three: mean stroke loss GradOP+ < SDEdit and < text-to-image."""
    synthesis = servers["client"].synthesis
    losses = {"gradop": [], "sdedit": [], "t2i": []}
    for index in range(4):
        scene = world.scene_from_seed(100 + index, num_objects=1)
        painting, caption = world.scribble_of(scene), scene.caption
        options = {"num_inference_steps": STEPS, "seed": index}
        losses["gradop"].append(synthesis.gradop_result(painting, caption, **options).stroke_loss)
        losses["sdedit"].append(synthesis.sdedit_result(painting, caption, **options).stroke_loss)
        # iterative_steps=0 is plain text-to-image sampling with the same seed.
        losses["t2i"].append(synthesis.gradop_result(painting, caption, iterative_steps=0, **options).stroke_loss)
    mean = {name: float(np.mean(values)) for name, values in losses.items()}
    assert mean["gradop"] < mean["sdedit"], mean
    assert mean["gradop"] < mean["t2i"], mean


def test_median_quantize_painting_runs_and_reports_its_loss(servers):
    result = servers["client"].synthesis.gradop_result(scribble(), PROMPT, num_inference_steps=STEPS, seed=3,
                                                       painting="median_quantize", grad_steps=4)
    assert result.usage.vae_decoder_backward_evaluations == 3 * 4
    assert 0.0 <= result.stroke_loss < 1.0


def test_sdedit_follows_diffusers_strength(servers):
    result = servers["client"].synthesis.sdedit_result(scribble(), PROMPT, strength=0.5, num_inference_steps=STEPS,
                                                       seed=1)
    assert result.usage.unet_forward_evaluations == 5  # int(10 * 0.5) denoising steps
    assert result.usage.vae_decoder_backward_evaluations == 0


def test_gradop_deadline_stops_the_decoder_optimisation(servers):
    client = servers["client"]
    with pytest.raises(atelier.DeadlineExceededError):
        client.synthesis.gradop(scribble(), PROMPT, num_inference_steps=STEPS, seed=1, grad_steps=1000,
                                timeout=3.0)
    executor = servers["synthesis"].app.executor
    deadline = time.monotonic() + 30
    while executor.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not executor.busy(), "the optimisation kept running after the deadline"


# ---------------------------------------------------------------------------------- bad input

def _grey_png() -> tensor_pb2.Image:
    import io

    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, format="PNG")
    return tensor_pb2.Image(encoding=tensor_pb2.Image.PNG, data=buffer.getvalue())


@pytest.mark.parametrize("call, kwargs, field", [
    ("gradop", {"scribble": _grey_png()}, "scribble"),
    ("gradop", {"scribble": scribble(60)}, "scribble"),
    ("gradop", {"scribble": scribble(256)}, "scribble"),
    ("gradop", {"strength": 0.0}, "strength"),
    ("gradop", {"strength": 1.5}, "strength"),
    ("gradop", {"iterative_steps": 9}, "iterative_steps"),
    ("gradop", {"num_inference_steps": 0}, "num_inference_steps"),
    ("gradop", {"guidance_scale": -1.0}, "guidance_scale"),
    ("gradop", {"grad_steps": -1}, "grad_steps"),
    ("gradop", {"learning_rate": 0.0}, "learning_rate"),
    ("gradop", {"seed": -5}, "seed"),
    ("gradop", {"region_kappa": 2.0}, "region_kappa"),
    ("gradop", {"regions": [Region("red circle", mask=np.ones((32, 32), bool))]}, "regions[0].mask"),
    ("gradop", {"regions": [Region("purple dragon", mask=np.ones((64, 64), bool))]}, "regions[0].phrase"),
    ("gradop", {"regions": [Region("red circle", color=(1, 2, 3))]}, "regions[0].color"),
    ("sdedit", {"regions": [Region("red circle", mask=np.ones((64, 64), bool))]}, "regions"),
    ("variations", {"n": 0}, "n"),
    ("variations", {"n": 17}, "n"),
    ("variations", {"lam": 1.5}, "lam"),
    ("variations", {"lam": -0.1}, "lam"),
    ("variations", {"image": scribble(60)}, "image"),
    ("variations", {"ip_adapter_scale": -1.0}, "ip_adapter_scale"),
    ("variations", {"interpolation_until": 5000}, "interpolation_until"),
])
def test_bad_requests_name_the_field(servers, call, kwargs, field):
    synthesis = servers["client"].synthesis
    image_key = "image" if call == "variations" else "scribble"
    image = kwargs.pop(image_key, scribble())
    method = getattr(synthesis, call)
    with pytest.raises(atelier.InvalidArgumentError) as info:
        method(image, PROMPT, num_inference_steps=kwargs.pop("num_inference_steps", STEPS), **kwargs)
    fields = [f for f, _ in info.value.field_violations]
    assert fields and (fields[0] == field or fields[0].startswith(field + ".")), fields


def test_unknown_painting_function_is_refused(servers):
    request = synthesis_pb2.GenerateRequest(scribble=to_image_proto(scribble()), prompt=PROMPT, painting=99)
    channel = grpc.insecure_channel(servers["synthesis"].address)
    with pytest.raises(grpc.RpcError) as info:
        list(synthesis_pb2_grpc.SynthesisStub(channel).Generate(request, timeout=60))
    channel.close()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "painting" in info.value.details()


def test_unknown_model_is_not_found(servers):
    with pytest.raises(atelier.NotFoundError):
        servers["client"].synthesis.gradop(scribble(), PROMPT, model="no-such-model")


# ---------------------------------------------------------------------------------- variations

def reference_image(seed: int = 5) -> Image.Image:
    return Image.fromarray(world.scene_from_seed(seed, num_objects=1).image)


def test_variations_end_to_end_through_both_services(servers, caplog):
    caplog.set_level("INFO")
    client = servers["client"]
    events = []
    result = client.synthesis.variations_result(reference_image(), PROMPT, n=3, num_inference_steps=STEPS, seed=2,
                                                progress=events.append)
    assert len(result.images) == 3 and all(image.size == (64, 64) for image in result.images)
    assert result.dca_path == "ip_adapter"  # the toy model ships IP-Adapter weights
    assert result.request_id
    # One batched UNet call per step for all variations (the reference branch is shared).
    assert result.usage.unet_forward_evaluations == STEPS
    assert result.inversion_usage.unet_forward_evaluations >= STEPS
    assert {"invert", "variations"} <= {e.stage for e in events}
    # Both services logged the request id (the inversion server where the call arrived).
    logged = [r.getMessage() for r in caplog.records if result.request_id in r.getMessage()]
    assert any("Inversion/Invert" in m for m in logged) and any("Variations" in m for m in logged), logged
    again = client.synthesis.variations(reference_image(), PROMPT, n=3, num_inference_steps=STEPS, seed=2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, again))


def _distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def test_lambda_moves_the_variations_and_they_differ(servers):
    """Over six toy-world references: lambda=1 (pure ISA) and lambda=0 (pure DCA) give different
    variations, and the permuted starts make the variations of one call differ. (RIVAL's ordering,
    ISA closer to the reference in pixels, held on the first toy UNet but not on the one retrained
    with attention at 8x8: docs/BENCHMARKS.md, Synthesis.)"""
    synthesis = servers["client"].synthesis
    images = {1.0: [], 0.0: []}
    pairwise = []
    for seed in range(5, 11):
        scene = world.scene_from_seed(seed, num_objects=1)
        reference = Image.fromarray(scene.image)
        for lam in images:
            variations = synthesis.variations(reference, scene.caption, lam=lam, n=3, num_inference_steps=STEPS, seed=4)
            images[lam].extend(variations)
            if lam == 1.0:
                pairwise.extend(_distance(variations[i], variations[j]) for i in range(3) for j in range(i + 1, 3))
    between = [_distance(a, b) for a, b in zip(images[1.0], images[0.0])]
    assert np.mean(between) > 1.0, between
    assert np.mean(pairwise) > 1.0 and min(pairwise) > 0.0, pairwise


def test_ip_adapter_scale_changes_the_variations(servers):
    synthesis = servers["client"].synthesis
    options = {"n": 2, "num_inference_steps": STEPS, "seed": 3, "lam": 0.0}
    with_image = synthesis.variations(reference_image(), PROMPT, ip_adapter_scale=1.0, **options)
    without = synthesis.variations(reference_image(), PROMPT, ip_adapter_scale=0.0, **options)
    assert any(_distance(a, b) > 0.1 for a, b in zip(with_image, without))


def test_short_deadline_cancels_the_inversion_call(servers):
    client, inversion_metrics = servers["client"], servers["inversion_metrics"]
    with pytest.raises((atelier.DeadlineExceededError, atelier.CancelledError)):
        # SPDInv at 200 steps takes far longer than the deadline.
        client.synthesis.variations(reference_image(), PROMPT, n=2, num_inference_steps=200, inversion="spdinv",
                                    timeout=2.0)
    time.sleep(1.0)
    before = unet_evaluations(inversion_metrics)
    time.sleep(2.0)
    assert unet_evaluations(inversion_metrics) == before, "the inversion kept running after the caller's deadline"


def _broken_model(folder: Path) -> str:
    """The embedded toy with UNet weights that do not load: served by name, its load fails."""
    shutil.copytree(EMBEDDED_DIR / "toy", folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    return str(folder)


def test_inversion_down_gives_unavailable_naming_it(servers, tmp_path):
    config = ServerConfig(service="synthesis", host="127.0.0.1", port=0, metrics_port=0,
                          max_image_pixels=128 * 128, extras={"inversion_address": "127.0.0.1:1"},
                          models={"broken": _broken_model(tmp_path / "broken")})
    metrics = Metrics()
    running = start(SynthesisApp(config, metrics=metrics), config, metrics)
    assert running.wait_loaded(120)
    try:
        with atelier.Client(synthesis=running.address, retries=0) as client:
            started = time.monotonic()
            with pytest.raises(atelier.UnavailableError) as info:
                client.synthesis.variations(reference_image(), PROMPT, n=1, num_inference_steps=STEPS, timeout=20)
            assert time.monotonic() - started < 20
            assert "inversion" in str(info.value)
        page = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
        assert 'atelier_dependency_up{address="127.0.0.1:1",dependency="inversion"} 0.0' in page
        # Our own model is resolved (and loaded) before the inversion service is called: with
        # nothing listening there, anything but UNAVAILABLE shows the call never went out.
        with atelier.Client(synthesis=running.address, retries=0) as client:
            with pytest.raises(atelier.FailedPreconditionError, match="loading failed"):
                client.synthesis.variations(reference_image(), PROMPT, n=1, num_inference_steps=STEPS,
                                            model="broken", timeout=20)
            with pytest.raises(atelier.NotFoundError):
                client.synthesis.variations(reference_image(), PROMPT, n=1, num_inference_steps=STEPS,
                                            model="no-such-model", timeout=20)
            with pytest.raises(atelier.FailedPreconditionError):
                client.synthesis.variations(reference_image(), PROMPT, n=1, num_inference_steps=STEPS,
                                            model="toy-sam", timeout=20)
    finally:
        running.stop(0)


def test_inversion_hung_past_the_callers_deadline_is_deadline_exceeded_naming_it():
    """The inversion call has no cap of ours: the caller's deadline less the margin bounds it, so a
    dependency that never answers leaves the caller's budget spent (core.dependencies' policy)."""
    silent = socket.socket()  # accepts connections (backlog) and never speaks: a hung dependency
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    config = ServerConfig(service="synthesis", host="127.0.0.1", port=0, metrics_port=0,
                          max_image_pixels=128 * 128, extras={"inversion_address": address})
    metrics = Metrics()
    running = start(SynthesisApp(config, metrics=metrics), config, metrics)
    assert running.wait_loaded(120)
    try:
        with atelier.Client(synthesis=running.address, retries=0) as client:
            started = time.monotonic()
            with pytest.raises(atelier.DeadlineExceededError) as info:
                client.synthesis.variations(reference_image(), PROMPT, n=1, num_inference_steps=STEPS, timeout=4)
            assert time.monotonic() - started < 4
            assert f"the inversion service at {address}" in str(info.value)
    finally:
        running.stop(0)
        silent.close()


def test_dependency_health_is_exported(servers):
    running = servers["synthesis"]
    deadline = time.monotonic() + 15
    line = ""
    while time.monotonic() < deadline:
        page = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
        line = next((l for l in page.splitlines() if l.startswith("atelier_dependency_up{")), "")
        if line.endswith(" 1.0"):
            break
        time.sleep(0.5)
    assert 'dependency="inversion"' in line and line.endswith(" 1.0"), line


def test_region_control_through_the_sdk(servers):
    scene = world.scene_from_seed(20, num_objects=2)
    painting = world.scribble_of(scene)
    first, second = scene.spec.objects
    colour = tuple(int(c) for c in painting[scene.masks[0]][0])
    regions = [Region(f"{first.colour} {first.shape}", color=colour),
               Region(f"{second.colour} {second.shape}", mask=scene.masks[1], weight=1.2)]
    result = servers["client"].synthesis.gradop_result(painting, scene.caption, num_inference_steps=STEPS, seed=1,
                                                       regions=regions)
    plain = servers["client"].synthesis.gradop_result(painting, scene.caption, num_inference_steps=STEPS, seed=1)
    assert result.image.size == (64, 64)
    assert not np.array_equal(np.asarray(result.image), np.asarray(plain.image))


def test_list_models_and_a_model_of_the_wrong_kind(servers):
    client = servers["client"]
    models = {m.name: m for m in client.models() if m.service == "synthesis"}
    assert models["toy"].is_default and models["toy"].kind == "stable-diffusion" and models["toy"].loaded
    assert "toy-sam" not in models  # a SAM model is segmentation's
    with pytest.raises(atelier.FailedPreconditionError):
        client.synthesis.gradop(scribble(), PROMPT, num_inference_steps=STEPS, model="toy-sam")
