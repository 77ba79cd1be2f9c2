"""SAM method code in-process: the split encode/decode path equals transformers' own
end-to-end path (SamProcessor + SamModel.forward + post_process_masks), and prompt validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from atelier.core.errors import InvalidArgument
from atelier.segmentation.sam import Prompt, validate_prompts
from segmentation_helpers import HEIGHT, WIDTH


def _transformers_end_to_end(predictor, pixels, prompt: Prompt, multimask: bool, input_masks=None):
    image = PILImage.fromarray(pixels)
    kwargs = {}
    if len(prompt.points):
        kwargs.update(input_points=[[prompt.points.tolist()]], input_labels=[[prompt.labels.tolist()]])
    if len(prompt.boxes):
        kwargs.update(input_boxes=[prompt.boxes.tolist()])
    inputs = predictor.processor(images=image, return_tensors="pt", **kwargs)
    with torch.no_grad():
        out = predictor.model(pixel_values=inputs["pixel_values"], input_points=inputs.get("input_points"),
                              input_labels=inputs.get("input_labels"), input_boxes=inputs.get("input_boxes"),
                              input_masks=input_masks, multimask_output=multimask)
    masks = predictor.processor.post_process_masks(out.pred_masks, inputs["original_sizes"],
                                                   inputs["reshaped_input_sizes"])[0][0]
    return masks.numpy(), out.iou_scores[0, 0].numpy(), out.pred_masks[0, 0].numpy()


PROMPTS = {
    "points": Prompt.of([(10, 20), (60, 5)], [1, 0]),
    "box": Prompt.of(boxes=[(5, 5, 40, 30)]),
    "points+box": Prompt.of([(20, 20)], [1], boxes=[(5, 5, 40, 30)]),
}


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_decode_on_cached_embedding_equals_transformers_end_to_end(predictor, image, kind, multimask):
    prompt = PROMPTS[kind]
    prepared = predictor.prepare(PILImage.fromarray(image))
    embedding = predictor.encode(predictor.pixel_values(prepared)[None])[0]
    got = predictor.decode(embedding, prepared, prompt, multimask=multimask)

    want_masks, want_scores, want_logits = _transformers_end_to_end(predictor, image, prompt, multimask)
    assert got.masks.shape == (3 if multimask else 1, HEIGHT, WIDTH) and got.masks.dtype == bool
    assert got.low_res_logits.shape == (len(got.scores), predictor.low_res_size, predictor.low_res_size)
    np.testing.assert_allclose(got.scores, want_scores, atol=1e-5)
    np.testing.assert_allclose(got.low_res_logits, want_logits, atol=1e-5)
    np.testing.assert_array_equal(got.masks, want_masks)
    assert got.best_index == int(np.argmax(got.scores))
    assert 0 < got.masks.mean() < 1, "a degenerate mask would make this comparison meaningless"


def test_previous_low_res_mask_is_used_like_transformers_input_masks(predictor, image):
    prepared = predictor.prepare(PILImage.fromarray(image))
    embedding = predictor.encode(predictor.pixel_values(prepared)[None])[0]
    first = predictor.decode(embedding, prepared, PROMPTS["points"], multimask=True)
    previous = first.low_res_logits[first.best_index]
    refined_prompt = Prompt.of([(10, 20), (60, 5)], [1, 0], mask_input=previous)
    refined = predictor.decode(embedding, prepared, refined_prompt)

    size = predictor.low_res_size
    want_masks, want_scores, _ = _transformers_end_to_end(
        predictor, image, PROMPTS["points"], False, input_masks=torch.from_numpy(previous).reshape(1, 1, size, size))
    np.testing.assert_allclose(refined.scores, want_scores, atol=1e-5)
    np.testing.assert_array_equal(refined.masks, want_masks)
    without = predictor.decode(embedding, prepared, PROMPTS["points"])
    assert not np.allclose(refined.low_res_logits, without.low_res_logits), "mask_input had no effect"


def _fields(prompts, size=64):
    with pytest.raises(InvalidArgument) as caught:
        validate_prompts(prompts, WIDTH, HEIGHT, size, [""] if len(prompts) == 1 else None)
    return [field for field, _ in caught.value.violations]


@pytest.mark.parametrize("prompt, field", [
    (Prompt.of([(WIDTH, 5)], [1]), "points[0]"),
    (Prompt.of([(5, -1)], [1]), "points[0]"),
    (Prompt.of([(float("nan"), 5)], [1]), "points[0]"),
    (Prompt.of([(5, 5)], [2]), "labels[0]"),
    (Prompt.of([(5, 5)], [-1]), "labels[0]"),
    (Prompt.of(boxes=[(30, 5, 10, 20)]), "boxes[0]"),
    (Prompt.of(boxes=[(5, 20, 10, 5)]), "boxes[0]"),
    (Prompt.of(boxes=[(5, 5, WIDTH + 1, 20)]), "boxes[0]"),
    (Prompt.of(boxes=[(0, 0, 5, 5), (1, 1, 6, 6)]), "boxes"),
    (Prompt.of(), "points"),
    (Prompt.of([(5, 5)], [1], mask_input=np.zeros((32, 32), np.float32)), "mask_input"),
])
def test_bad_prompts_name_the_field(prompt, field):
    assert _fields([prompt]) == [field]


def test_every_violation_is_reported_with_its_prompt_index():
    prompts = [Prompt.of([(5, 5)], [1]), Prompt.of([(500, 5)], [3]), Prompt.of()]
    assert _fields(prompts) == ["prompt_sets[1].points[0]", "prompt_sets[1].labels[0]", "prompt_sets[2]"]
    with pytest.raises(InvalidArgument, match="prompt_sets"):
        validate_prompts([], WIDTH, HEIGHT, 64)


def test_valid_prompts_pass():
    validate_prompts([Prompt.of([(0, 0), (WIDTH - 0.5, HEIGHT - 0.5)], [1, 0], boxes=[(0, 0, WIDTH, HEIGHT)],
                                mask_input=np.zeros((1, 64, 64), np.float32))], WIDTH, HEIGHT, 64)
