"""The Segmenter in-process: one encoder run per image even under concurrency, deadlines."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image as PILImage

from atelier.core.control import CallControl
from atelier.core.errors import DeadlineExceeded
from atelier.segmentation.sam import Prompt
from atelier.segmentation.segmenter import BatchingOptions, Segmenter
from segmentation_helpers import make_image


class _GatedEncoder:
    """The local encoder, held at a gate so callers pile up while it is busy."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.images = 0

    def __call__(self, pixel_values):
        self.entered.set()
        self.gate.wait(30)
        self.images += len(pixel_values)
        return self.predictor.encode(pixel_values)


def test_concurrent_callers_of_one_image_share_one_encoder_run(predictor):
    encoder = _GatedEncoder(predictor)
    segmenter = Segmenter(predictor, encoder, BatchingOptions(max_batch_size=4, max_wait_seconds=0.05))
    image = PILImage.fromarray(make_image(7))
    outputs, errors = [None] * 3, []

    def call(i):
        try:
            outputs[i] = segmenter.segment(image, [Prompt.of([(10 + i, 10)], [1])])
        except Exception as error:  # noqa: BLE001 - surfaced below
            errors.append(error)

    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        threads[0].start()
        assert encoder.entered.wait(30)  # the first caller's image is in the encoder now
        for thread in threads[1:]:
            thread.start()
        give_up = time.monotonic() + 30
        while segmenter.cache.misses < 3 and time.monotonic() < give_up:
            time.sleep(0.01)  # wait until the others looked the image up (and found it in flight)
        encoder.gate.set()
        for thread in threads:
            thread.join(30)
    finally:
        segmenter.close()
    assert not errors, errors
    assert encoder.images == 1 and segmenter.batcher.executions == 1
    again = segmenter.segment(image, [Prompt.of([(10, 10)], [1])])
    assert again.embedding_cached
    np.testing.assert_array_equal(again.results[0].masks, outputs[0].results[0].masks)


def test_a_deadline_while_waiting_for_the_encoder_is_deadline_exceeded(predictor):
    encoder = _GatedEncoder(predictor)
    segmenter = Segmenter(predictor, encoder, BatchingOptions(max_batch_size=1, max_wait_seconds=0))
    try:
        blocker = threading.Thread(target=segmenter.segment,
                                   args=(PILImage.fromarray(make_image(8)), [Prompt.of([(1, 1)], [1])]))
        blocker.start()
        assert encoder.entered.wait(30)
        with pytest.raises(DeadlineExceeded):
            segmenter.segment(PILImage.fromarray(make_image(9)), [Prompt.of([(1, 1)], [1])],
                              control=CallControl(deadline=time.monotonic() + 0.2))
        encoder.gate.set()
        blocker.join(30)
        assert segmenter.batcher.items == 1, "the expired call's image must not have been encoded"
        assert not segmenter._in_flight
    finally:
        segmenter.close()
