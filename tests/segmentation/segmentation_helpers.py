"""Helpers shared by the segmentation tests (imported by name; no package)."""
from __future__ import annotations

import contextlib
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image as PILImage

HEIGHT, WIDTH = 48, 80  # not square, not the model's 256: exercises resize, pad and un-pad


def make_image(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A random image with a few solid rectangles (so images differ in structure, not only noise)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 80).astype(np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
        pixels[y0:y0 + rng.integers(6, height // 2), x0:x0 + rng.integers(6, width // 2)] = rng.integers(0, 256, 3)
    return pixels


def reference(predictor, pixels: np.ndarray, prompt, multimask: bool = False):
    """The in-process answer for one image and prompt: encoder alone (batch 1), then decode."""
    prepared = predictor.prepare(PILImage.fromarray(pixels))
    embedding = predictor.encode(predictor.pixel_values(prepared)[None])[0]
    return predictor.decode(embedding, prepared, prompt, multimask=multimask)


def assert_same_masks(got_masks, got_scores, got_logits, want, rel: float = 1e-3, max_flipped: float = 0.002):
    """Equal up to float noise: logits and scores within ``rel`` of their largest magnitude (a
    random tiny SAM's logits are ~1e-4, so absolute tolerances mean nothing); at most
    ``max_flipped`` of the mask pixels may differ (pixels whose logit sits at the threshold)."""
    np.testing.assert_allclose(got_logits, want.low_res_logits, rtol=0,
                               atol=rel * float(np.abs(want.low_res_logits).max()))
    np.testing.assert_allclose(got_scores, want.scores, rtol=0, atol=rel * float(np.abs(want.scores).max()))
    assert got_masks.shape == want.masks.shape
    flipped = np.mean(got_masks != want.masks)
    assert flipped <= max_flipped, f"{flipped:.4%} of mask pixels differ"


def metric_value(text: str, name: str, **labels) -> float:
    """A sample's value from Prometheus text exposition (0 if absent)."""
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, label_text = key.partition("{")
        # The labels given must match; others (e.g. model) may be there too.
        if metric == name and wanted <= set(filter(None, label_text.rstrip("}").split(","))):
            return float(value)
    return 0.0


@dataclass
class Service:
    running: object
    app: object
    client: object
    metrics_url: str

    def scrape(self) -> str:
        return urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()

    @property
    def segmenter(self):
        return self.app.segmenter_for("")[1]


@contextlib.contextmanager
def running_service(sam_source: str, max_image_pixels: int = 1024 * 1024, max_queue: int = 16,
                    client_timeout: Optional[float] = 60, **settings):
    """A segmentation server on loopback (own metrics registry, ``sam_source`` as toy-sam) and
    an SDK client for it."""
    import atelier
    from prometheus_client import CollectorRegistry

    from atelier.core.config import ServerConfig
    from atelier.core.metrics import Metrics
    from atelier.core.server import start
    from atelier.segmentation.app import SegmentationApp, SegmentationSettings
    from atelier.segmentation.segmenter import BatchingOptions

    batching = {k: settings.pop(k) for k in list(settings) if k in BatchingOptions.__dataclass_fields__}
    config = ServerConfig(service="segmentation", host="127.0.0.1", port=0, metrics_port=0, grace_seconds=2,
                          max_queue=max_queue, max_image_pixels=max_image_pixels, models={"toy-sam": sam_source})
    metrics = Metrics(CollectorRegistry())
    app = SegmentationApp(config, SegmentationSettings(batching=BatchingOptions(**batching), **settings), metrics)
    running = start(app, config, metrics)
    client = None
    try:
        assert running.wait_loaded(120), "segmentation service did not load"
        assert running.load_error is None, running.load_error
        client = atelier.Client(running.address, timeout=client_timeout, retries=0)
        yield Service(running, app, client, f"http://127.0.0.1:{running.metrics_port}/metrics")
    finally:
        if client is not None:
            client.close()
        running.stop(2)
