"""With the image encoder on Triton the segmentation process loads SAM without its ViT image
encoder: fewer parameters, and the decode path gives exactly the full model's masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from atelier.segmentation.sam import Prompt

PROMPTS = [
    Prompt.of([(40, 24)], [1]),
    Prompt.of([(10, 12), (50, 30)], [1, 0], boxes=[(4, 4, 60, 40)]),
    Prompt.of(boxes=[(0, 0, 63, 47)]),
]


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.fixture(scope="module")
def decoder_only(sam_source):
    from atelier.segmentation.sam import SamPredictor

    return SamPredictor.load(sam_source, name="toy-sam", device="cpu", dtype="fp32", with_encoder=False)


def test_decoder_only_predictor_holds_no_vision_encoder(decoder_only, predictor):
    assert predictor.has_encoder and not decoder_only.has_encoder
    assert not hasattr(decoder_only.model, "vision_encoder")
    names = [name for name, _ in decoder_only.model.named_parameters()]
    assert names and not [n for n in names if n.startswith("vision_encoder")]
    # Exactly the full model minus its encoder: nothing else was dropped.
    full = dict(predictor.model.named_parameters())
    assert set(names) == {n for n in full if not n.startswith("vision_encoder.")}
    assert parameter_bytes(decoder_only.model) == parameter_bytes(predictor.model) \
        - parameter_bytes(predictor.model.vision_encoder)
    with pytest.raises(RuntimeError, match="without its image encoder"):
        decoder_only.encode(torch.zeros(1, 3, predictor.input_size, predictor.input_size))


@pytest.mark.parametrize("multimask", [False, True])
def test_decoder_only_masks_are_bit_identical_to_the_full_model(decoder_only, predictor, image, multimask):
    prepared = predictor.prepare(PILImage.fromarray(image))
    embedding = predictor.encode(predictor.pixel_values(prepared)[None])[0]
    with_previous = Prompt.of([(30, 20)], [1], mask_input=np.linspace(
        -1, 1, predictor.low_res_size ** 2, dtype=np.float32).reshape(predictor.low_res_size, -1))
    for prompt in PROMPTS + [with_previous]:
        want = predictor.decode(embedding, prepared, prompt, multimask=multimask)
        got = decoder_only.decode(embedding, prepared, prompt, multimask=multimask)
        np.testing.assert_array_equal(got.low_res_logits, want.low_res_logits)
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.masks, want.masks)
        assert got.best_index == want.best_index


class _EncoderOutsideTheProcess:
    """Stands in for the Triton client (the external boundary): answers ``encode`` with the
    local model's embeddings, as the exported encoder does."""

    def __init__(self, predictor):
        self.predictor = predictor

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.predictor.encode(torch.from_numpy(pixel_values)).numpy()


def test_triton_backend_loads_the_segmenter_without_the_encoder(sam_source, predictor, image):
    from prometheus_client import CollectorRegistry

    from atelier.core.config import ServerConfig
    from atelier.core.metrics import Metrics
    from atelier.core.models import ModelEntry
    from atelier.segmentation.app import SegmentationApp, SegmentationSettings

    config = ServerConfig(service="segmentation", host="127.0.0.1", port=0, metrics_port=0,
                          models={"toy-sam": sam_source})
    app = SegmentationApp(config, SegmentationSettings(backend="triton"), Metrics(CollectorRegistry()))
    app._triton = _EncoderOutsideTheProcess(predictor)  # what load() sets for --backend triton
    segmenter = app._load_segmenter(ModelEntry(name="toy-sam", source=sam_source, folder=sam_source),
                                    torch.device("cpu"), torch.float32)
    try:
        assert not segmenter.predictor.has_encoder
        # The registry's memory accounting sees only the decoder side.
        assert sum(parameter_bytes(m) for m in segmenter.torch_modules()) < parameter_bytes(predictor.model)
        output = segmenter.segment(PILImage.fromarray(image), [PROMPTS[1]])
        want = predictor.decode(predictor.encode(predictor.pixel_values(predictor.prepare(
            PILImage.fromarray(image)))[None])[0], predictor.prepare(PILImage.fromarray(image)), PROMPTS[1])
        np.testing.assert_array_equal(output.results[0].masks, want.masks)
    finally:
        segmenter.close()
        app.executor.shutdown()
