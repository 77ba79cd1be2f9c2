"""The segmentation service over real gRPC on loopback, through the SDK."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import atelier
from atelier.segmentation.sam import Prompt
from segmentation_helpers import (HEIGHT, WIDTH, assert_same_masks, make_image, metric_value, reference,
                                  running_service)


@pytest.fixture(scope="module")
def service(sam_source):
    # A long fixed wait makes the concurrency test deterministic: a batch waits for company.
    with running_service(sam_source, max_wait_seconds=0.3, max_batch_size=8, adaptive_wait=False) as handle:
        yield handle


def test_segment_returns_masks_at_input_resolution_scores_and_low_res_logits(service, predictor, image):
    result = service.client.segmentation.segment(image, points=[(10, 20), (60, 5)], labels=[1, 0])
    assert result.masks.shape == (1, HEIGHT, WIDTH) and result.masks.dtype == bool
    assert result.low_res_logits.shape == (1, predictor.low_res_size, predictor.low_res_size)
    assert (result.width, result.height, result.model) == (WIDTH, HEIGHT, "toy-sam")
    assert_same_masks(result.masks, result.scores, result.low_res_logits,
                      reference(predictor, image, Prompt.of([(10, 20), (60, 5)], [1, 0])))


def test_multimask_returns_three_candidates_and_the_best_by_predicted_iou(service, predictor, image):
    result = service.client.segmentation.segment(image, boxes=(5, 5, 40, 30), multimask=True)
    assert result.masks.shape == (3, HEIGHT, WIDTH) and result.scores.shape == (3,)
    assert result.best_index == int(np.argmax(result.scores))
    np.testing.assert_array_equal(result.mask, result.masks[result.best_index])
    assert_same_masks(result.masks, result.scores, result.low_res_logits,
                      reference(predictor, image, Prompt.of(boxes=[(5, 5, 40, 30)]), multimask=True))


def test_second_prompt_on_the_same_image_hits_the_cache(service):
    pixels = make_image(11)
    segmenter = service.segmenter
    first = service.client.segmentation.segment(pixels, points=[(30, 30)])
    executions = segmenter.batcher.executions
    hits = metric_value(service.scrape(), "atelier_segmentation_cache_hits_total", backend="local")
    second = service.client.segmentation.segment(pixels, points=[(5, 40)], labels=[0], boxes=(0, 0, 50, 47))
    assert not first.embedding_cached and first.encoder_batch_size >= 1
    assert second.embedding_cached and second.encoder_batch_size == 0
    assert segmenter.batcher.executions == executions, "the encoder ran again for a cached image"
    text = service.scrape()
    assert metric_value(text, "atelier_segmentation_cache_hits_total", backend="local") == hits + 1
    assert metric_value(text, "atelier_segmentation_cache_misses_total", backend="local") >= 1


def test_batch_form_runs_one_encoder_pass_for_many_prompt_sets(service, predictor):
    pixels = make_image(12)
    prompt_sets = [
        {"points": [(10, 10)]},
        atelier.PromptSet(points=[(70, 40), (20, 20)], labels=[1, 0]),
        {"boxes": (30, 10, 75, 45)},
    ]
    executions = service.segmenter.batcher.executions
    results = service.client.segmentation.segment_many(pixels, prompt_sets, multimask=True)
    assert service.segmenter.batcher.executions == executions + 1
    assert len(results) == 3
    for result, prompt in zip(results, [Prompt.of([(10, 10)], [1]), Prompt.of([(70, 40), (20, 20)], [1, 0]),
                                        Prompt.of(boxes=[(30, 10, 75, 45)])]):
        assert_same_masks(result.masks, result.scores, result.low_res_logits,
                          reference(predictor, pixels, prompt, multimask=True))


def test_previous_low_res_mask_refines(service, predictor, image):
    first = service.client.segmentation.segment(image, points=[(10, 20)], multimask=True)
    refined = service.client.segmentation.segment(image, points=[(10, 20)], mask_input=first)
    want = reference(predictor, image, Prompt.of([(10, 20)], [1], mask_input=first.logits))
    assert_same_masks(refined.masks, refined.scores, refined.low_res_logits, want)
    assert refined.embedding_cached


def test_concurrent_requests_are_batched_and_each_gets_its_own_masks(service, predictor):
    images = [make_image(100 + i) for i in range(4)]
    barrier = threading.Barrier(len(images))
    results = [None] * len(images)
    errors = []

    def call(i):
        try:
            barrier.wait(10)
            results[i] = service.client.segmentation.segment(images[i], points=[(40, 24)], multimask=True)
        except Exception as error:  # noqa: BLE001 - surfaced below
            errors.append(error)

    before = metric_value(service.scrape(), "atelier_segmentation_encoder_executions_total", backend="local")
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert max(r.encoder_batch_size for r in results) > 1
    text = service.scrape()
    executions = metric_value(text, "atelier_segmentation_encoder_executions_total", backend="local") - before
    assert executions < len(images)
    assert metric_value(text, "atelier_segmentation_encoder_batch_size_count", backend="local") > \
        metric_value(text, "atelier_segmentation_encoder_batch_size_bucket", backend="local", le="1.0")
    wants = [reference(predictor, pixels, Prompt.of([(40, 24)], [1]), multimask=True) for pixels in images]
    for i, (result, want) in enumerate(zip(results, wants)):
        assert_same_masks(result.masks, result.scores, result.low_res_logits, want)
        others = [w for j, w in enumerate(wants) if j != i]
        assert all(np.mean(result.masks != other.masks) > 0.05 for other in others), "masks of another image"


@pytest.mark.parametrize("kwargs, field", [
    ({"points": [(WIDTH + 5, 10)]}, "points[0]"),
    ({"points": [(10, -3)]}, "points[0]"),
    ({}, "points"),
    ({"points": [(10, 10)], "labels": [2]}, "labels[0]"),
    ({"boxes": (40, 5, 10, 30)}, "boxes[0]"),
    ({"points": [(10, 10)], "mask_input": np.zeros((8, 8), np.float32)}, "mask_input"),
])
def test_bad_input_is_invalid_argument_naming_the_field(service, image, kwargs, field):
    with pytest.raises(atelier.InvalidArgumentError) as caught:
        service.client.segmentation.segment(image, **kwargs)
    assert field in [f for f, _ in caught.value.field_violations]


def test_batch_bad_input_names_the_prompt_set(service, image):
    with pytest.raises(atelier.InvalidArgumentError) as caught:
        service.client.segmentation.segment_many(image, [{"points": [(1, 1)]}, {"boxes": (9, 9, 1, 1)}, {}])
    assert [f for f, _ in caught.value.field_violations] == ["prompt_sets[1].boxes[0]", "prompt_sets[2]"]


def test_image_over_the_size_limit_is_invalid_argument(sam_source):
    with running_service(sam_source, max_image_pixels=40 * 40) as small:
        with pytest.raises(atelier.InvalidArgumentError) as caught:
            small.client.segmentation.segment(make_image(1), points=[(1, 1)])
        assert caught.value.field_violations[0][0] == "image.width"
        assert "limit" in caught.value.field_violations[0][1]


def test_unknown_model_is_not_found(service, image):
    with pytest.raises(atelier.NotFoundError, match="no-such-sam"):
        service.client.segmentation.segment(image, points=[(1, 1)], model="no-such-sam")


def test_triton_unreachable_is_unavailable_and_health_says_not_serving(sam_source):
    from atelier.segmentation.triton_launcher import free_port

    with running_service(sam_source, backend="triton", triton_url=f"127.0.0.1:{free_port()}", triton_timeout_seconds=5,
                         health_interval_seconds=0.2, client_timeout=30) as down:
        with pytest.raises(atelier.UnavailableError) as caught:
            down.client.segmentation.segment(make_image(2), points=[(1, 1)])
        assert "Triton server at 127.0.0.1" in caught.value.message and "sam_image_encoder" in caught.value.message
        with grpc.insecure_channel(down.running.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest(service="atelier.v1.Segmentation")
            status = None
            for _ in range(100):
                status = check(request, timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                threading.Event().wait(0.1)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert metric_value(down.scrape(), "atelier_segmentation_encoder_backend_ready", backend="triton") == 0


def test_sdk_rejects_malformed_arguments_before_sending(service, image):
    segmentation = service.client.segmentation
    with pytest.raises(ValueError, match="labels"):
        segmentation.segment(image, points=[(1, 1), (2, 2)], labels=[1])
    with pytest.raises(ValueError, match="boxes"):
        segmentation.segment(image, boxes=(1, 2, 3))
    with pytest.raises(ValueError, match=r"prompt_sets\[1\].points"):
        segmentation.segment_many(image, [{"points": [(1, 1)]}, {"points": [(1, 2, 3)]}])
    with pytest.raises(ValueError, match="prompt_sets"):
        segmentation.segment_many(image, [])


def test_many_bad_points_are_invalid_argument_with_bounded_details(service, image):
    # 60 points outside the image: 60 violations would overflow gRPC's 8 KiB trailers
    # (the client saw RESOURCE_EXHAUSTED); the status keeps the first ones and a count.
    points = [(WIDTH + 100 + i, HEIGHT + 100 + i) for i in range(60)]
    with pytest.raises(atelier.InvalidArgumentError) as caught:
        service.client.segmentation.segment(image, points=points)
    violations = caught.value.field_violations
    assert violations[0][0] == "points[0]"
    assert violations[-1][1].endswith("more violations omitted") and len(violations) < 60


@pytest.mark.parametrize("size", [(200, 1), (1, 200)])
def test_thin_images_segment(service, size):
    width, height = size
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    result = service.client.segmentation.segment(pixels, points=[(0, 0)])
    assert result.masks.shape[-2:] == (height, width)


def test_the_asyncio_client_gets_the_same_masks_concurrently(service, image):
    import asyncio

    import atelier.aio

    want = service.client.segmentation.segment(image, points=[(10, 20)])
    many_want = service.client.segmentation.segment_many(image, [{"points": [(10, 20)]}, {"boxes": (5, 5, 40, 30)}])

    async def main():
        async with atelier.aio.Client(segmentation=service.running.address, timeout=60) as client:
            assert await client.ready()
            singles = await asyncio.gather(*(client.segmentation.segment(image, points=[(10, 20)]) for _ in range(4)))
            many = await client.segmentation.segment_many(image, [{"points": [(10, 20)]}, {"boxes": (5, 5, 40, 30)}])
            return singles, many

    singles, many = asyncio.run(main())
    for result in singles:
        np.testing.assert_array_equal(result.masks, want.masks)
    for got, expected in zip(many, many_want):
        np.testing.assert_array_equal(got.masks, expected.masks)
