"""The Triton backend against a REAL tritonserver (nvidia-pytriton's bundled binary, run
from .venv-triton on loopback ports): masks equal the local path's, Triton batches
concurrent requests too, and when the server goes away the service answers UNAVAILABLE and
its health says NOT_SERVING. Stopping Triton leaves no process and no /dev/shm segment."""
from __future__ import annotations

import glob
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import atelier
from atelier.segmentation.sam import Prompt
from segmentation_helpers import assert_same_masks, make_image, metric_value, reference, running_service

TRITON_VENV = Path(__file__).resolve().parents[2] / ".venv-triton"

pytestmark = pytest.mark.skipif(
    not (TRITON_VENV / ".installed").exists(),
    reason=f"{TRITON_VENV} is absent: `make triton-venv` (make test builds it) installs nvidia-pytriton's tritonserver",
)

# Equality with the local path: the same preprocessing feeds the same SamModel weights on both
# sides, so embeddings agree to float32 round-off (measured: identical on CPU); masks may differ
# only at pixels whose logit sits at the threshold (<= 0.2%), logits/scores within 0.1% of scale.


@pytest.fixture(scope="module")
def triton(sam_source):
    from atelier.segmentation.triton_launcher import TritonServer

    shm_before = set(glob.glob("/dev/shm/*"))
    server = TritonServer(TRITON_VENV, sam_path=sam_source)
    with server:
        assert server.shm_segments(), "the Python backend should hold shared memory while running"
        yield server
    # stop() ran on exit: SIGTERM, graceful unload.
    assert server.process.returncode == 0, server.process.returncode
    assert server.stop() == [], "tritonserver left shared-memory segments behind"
    assert not (set(glob.glob("/dev/shm/*")) - shm_before), "new /dev/shm entries after Triton stopped"


@pytest.fixture(scope="module")
def service(triton, sam_source):
    with running_service(sam_source, backend="triton", triton_url=triton.grpc_url, max_wait_seconds=0.3, adaptive_wait=False,
                         triton_timeout_seconds=10, health_interval_seconds=0.2, client_timeout=30) as handle:
        yield handle


def test_triton_path_masks_equal_the_local_path(service, predictor):
    pixels = make_image(21)
    for kwargs, prompt in [({"points": [(10, 20), (60, 5)], "labels": [1, 0]}, Prompt.of([(10, 20), (60, 5)], [1, 0])),
                           ({"boxes": (5, 5, 40, 30)}, Prompt.of(boxes=[(5, 5, 40, 30)]))]:
        result = service.client.segmentation.segment(pixels, multimask=True, **kwargs)
        assert_same_masks(result.masks, result.scores, result.low_res_logits,
                          reference(predictor, pixels, prompt, multimask=True))
    assert service.segmenter.batcher.executions >= 1
    assert metric_value(service.scrape(), "atelier_segmentation_cache_hits_total", backend="triton") == 1


def test_concurrent_requests_are_batched_through_triton(service, triton, predictor):
    images = [make_image(200 + i) for i in range(4)]
    barrier = threading.Barrier(len(images))
    results, errors = [None] * len(images), []

    def call(i):
        try:
            barrier.wait(10)
            results[i] = service.client.segmentation.segment(images[i], points=[(40, 24)])
        except Exception as error:  # noqa: BLE001 - surfaced below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert max(r.encoder_batch_size for r in results) > 1
    for pixels, result in zip(images, results):
        assert_same_masks(result.masks, result.scores, result.low_res_logits,
                          reference(predictor, pixels, Prompt.of([(40, 24)], [1])))
    # Triton's own counters: fewer executions than inferences means it ran batches.
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    inferences = metric_value(text, "nv_inference_count", model="sam_image_encoder", version="1")
    executions = metric_value(text, "nv_inference_exec_count", model="sam_image_encoder", version="1")
    assert 0 < executions < inferences


def _wait_for_health(address: str, wanted) -> int:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest(service="atelier.v1.Segmentation")
        status = None
        for _ in range(150):
            status = check(request, timeout=5).status
            if status == wanted:
                break
            threading.Event().wait(0.1)
        return status


def test_triton_going_away_is_unavailable_and_health_follows(service, triton, sam_source):
    # Runs last in this module: it stops the module's Triton (the fixture's teardown then
    # finds it stopped and checks that nothing was left behind).
    from atelier.segmentation.triton_launcher import TritonServer

    cached = make_image(31)
    service.client.segmentation.segment(cached, points=[(5, 5)])
    assert triton.stop() == []
    with pytest.raises(atelier.UnavailableError, match="Triton server at"):
        service.client.segmentation.segment(make_image(32), points=[(5, 5)])
    # A cached image needs no encoder: it is still served.
    assert service.client.segmentation.segment(cached, points=[(9, 9)]).embedding_cached
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert _wait_for_health(service.running.address, not_serving) == not_serving

    # Triton back on the same port: health returns to SERVING and the encoder works again.
    with TritonServer(TRITON_VENV, sam_path=sam_source, grpc_port=triton.grpc_port) as again:
        serving = health_pb2.HealthCheckResponse.SERVING
        assert _wait_for_health(service.running.address, serving) == serving
        assert not service.client.segmentation.segment(make_image(33), points=[(5, 5)]).embedding_cached
    assert again.process.returncode == 0 and again.stop() == []
