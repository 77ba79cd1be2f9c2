"""EqDiff training runs and generation on the embedded toy model."""
import io
import threading

import pytest
import torch

from atelier.core.attention import ControlledAttnProcessor
from atelier.core.control import CallControl
from atelier.core.diffusion import sample
from atelier.core.errors import FailedPrecondition, InvalidArgument
from atelier.personalization.eqdiff.generate import generate_with_concept
from atelier.personalization.eqdiff.params import EqDiffParams
from atelier.personalization.eqdiff.run import EqDiffRun

from eqdiff_helpers import class_images, concept_data

PROMPT = "photo of a <new2> box"


def run_steps(run, count):
    return [run.step(CallControl()) for _ in range(count)]


def test_resume_is_bit_exact(model):
    images, masks = concept_data()
    # the class images come from the base model (one "class_images" step), then 3 training steps
    params = EqDiffParams(class_word="box", steps=3, num_class_images=3, class_image_steps=2)
    straight = EqDiffRun(model, images, masks, params, seed=5)
    assert straight.total_steps == 4
    reports = run_steps(straight, 4)
    assert [r.phase for r in reports] == ["class_images", "train", "train", "train"]

    first = EqDiffRun(model, images, masks, params, seed=5)
    run_steps(first, 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = EqDiffRun(model, images, masks, params, seed=5)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step_index == 2
    later = run_steps(resumed, 2)
    assert [r.losses for r in later] == [r.losses for r in reports[2:]]
    a, b = straight.finish(), resumed.finish()
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.metadata == b.metadata and a.metadata["method"] == "eqdiff"
    assert a.metadata["base_model"] == model.name and a.metadata["placeholder_token"] == "<new2>"
    assert EqDiffParams.from_json(a.metadata["params"]) == params
    with pytest.raises(FailedPrecondition):
        straight.step(CallControl())


def test_training_loss_falls(model):
    images, masks = concept_data()
    params = EqDiffParams(class_word="box", steps=25, learning_rate=2e-3, scale_lr=False)
    run = EqDiffRun(model, images, masks, params, class_images=class_images(), seed=1)
    before = run.validation_loss(range(6))
    run_steps(run, params.steps)
    after = run.validation_loss(range(6))
    assert after["loss"] < 0.97 * before["loss"], (before, after)


def test_learned_embeddings_change_generation_and_nothing_leaks(model):
    images, masks = concept_data()
    # embeddings only (no Custom Diffusion K/V, no RRA): the change comes from S*_LF + S*_HF
    params = EqDiffParams(class_word="box", steps=12, learning_rate=5e-3, scale_lr=False,
                          custom_diffusion=False, rra=False, prior_preservation=False)
    run = EqDiffRun(model, images, masks, params, seed=2)
    start = run.embeddings.weight.detach().clone()
    run_steps(run, params.steps)
    concept = run.finish()
    assert not torch.allclose(concept.tensors["fdte.embeddings"], start)

    steps = 10
    base_noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def base_image():
        latents = sample(model, base_noise, model.encode_prompt(["photo of a box"]), model.encode_prompt([""]),
                         steps, 7.5, CallControl())
        return model.decode_latents(latents)

    alone = base_image()
    personal = generate_with_concept(model, concept, PROMPT, num_inference_steps=steps, seed=0)
    assert personal.shape == (1, 3, 64, 64) and 0 <= personal.min() and personal.max() <= 1
    assert (personal - alone).abs().mean() > 0.01

    # a full concept (CD K/V + RRA) generating in another thread: the base model is unchanged for others
    full = EqDiffRun(model, images, masks, EqDiffParams(class_word="box", steps=2, learning_rate=1e-3,
                                                       scale_lr=False), class_images=class_images(), seed=3)
    run_steps(full, 2)
    full_concept = full.finish()
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("concept", generate_with_concept(
        model, full_concept, PROMPT, num_inference_steps=steps, seed=0)))
    worker.start()
    during = [base_image() for _ in range(2)]
    worker.join()
    assert all(torch.equal(image, alone) for image in during)
    assert results["concept"].shape == (1, 3, 64, 64)
    assert not any(isinstance(p, ControlledAttnProcessor) for p in model.unet.attn_processors.values())
    assert torch.equal(base_image(), alone)


def test_generation_rejects_bad_requests(model):
    images, masks = concept_data(count=2)
    run = EqDiffRun(model, images, masks, EqDiffParams(class_word="box", steps=1, prior_preservation=False), seed=0)
    run_steps(run, 1)
    concept = run.finish()
    with pytest.raises(InvalidArgument) as error:
        generate_with_concept(model, concept, "photo of a box", num_inference_steps=2)
    assert error.value.violations[0][0] == "prompt"
    with pytest.raises(InvalidArgument) as error:
        generate_with_concept(model, concept, PROMPT, num_inference_steps=0)
    assert error.value.violations[0][0] == "num_inference_steps"
    other = type(concept)(concept.tensors, {**concept.metadata, "base_model": "sd15"})
    with pytest.raises(FailedPrecondition):
        generate_with_concept(model, other, PROMPT, num_inference_steps=2)


@pytest.mark.parametrize("case, field", [
    ("no_images", "images"), ("grayscale", "images"), ("out_of_range", "images"), ("odd_size", "images"),
    ("mask_size", "masks"), ("mask_count", "masks"), ("empty_mask", "masks[1]"),
    ("unknown_class_word", "class_word"), ("bad_initializer", "initializer_token"), ("steps", "steps"),
])
def test_bad_inputs_name_their_argument(model, case, field):
    images, masks = concept_data(count=2)
    params = EqDiffParams(class_word="box", steps=1)
    if case == "no_images":
        images, masks = images[:0], masks[:0]
    elif case == "grayscale":
        images = images[:, :1]
    elif case == "out_of_range":
        images = images * 3
    elif case == "odd_size":
        images, masks = images[..., :60, :60], masks[..., :60, :60]
    elif case == "mask_size":
        masks = masks[..., :32, :32]
    elif case == "mask_count":
        masks = masks[:1]
    elif case == "empty_mask":
        masks = masks.clone()
        masks[1] = False
    elif case == "unknown_class_word":
        params = EqDiffParams(class_word="qzxjvbox")
    elif case == "bad_initializer":
        params = EqDiffParams(class_word="box", initializer_token="qzxjvbox")
    elif case == "steps":
        params = EqDiffParams(class_word="box", steps=0)
    with pytest.raises(InvalidArgument) as error:
        EqDiffRun(model, images, masks, params)
    assert field in [f for f, _ in error.value.violations]


def test_a_cancelled_control_stops_the_step(model):
    from atelier.core.errors import Cancelled

    images, masks = concept_data(count=2)
    run = EqDiffRun(model, images, masks, EqDiffParams(class_word="box", steps=2, prior_preservation=False))
    with pytest.raises(Cancelled):
        run.step(CallControl(is_cancelled=lambda: True))
    assert run.step_index == 0


def _cancel_after_unet(evaluations):
    """A control cancelled once ``evaluations`` UNet calls ran: the VAE work after them must not start."""
    control = CallControl(is_cancelled=lambda: control.forward_evaluations + control.backward_evaluations
                          >= evaluations)
    return control


def test_generation_at_1000_steps_starts_inside_the_alphas_table(model):
    from atelier.core.errors import Cancelled

    images, masks = concept_data(count=1)
    params = EqDiffParams(class_word="box", steps=1, prior_preservation=False, rra=False)
    run = EqDiffRun(model, images, masks, params, seed=0)
    run_steps(run, 1)
    concept = run.finish()
    control = _cancel_after_unet(2)  # two steps at t=999 and 998 (t=1000 raised IndexError before)
    with pytest.raises(Cancelled):
        generate_with_concept(model, concept, PROMPT, num_inference_steps=1000, control=control)
    assert control.forward_evaluations == 2


def test_generation_stops_before_the_decode_when_cancelled(model, monkeypatch):
    from atelier.core.errors import Cancelled

    images, masks = concept_data(count=1)
    run = EqDiffRun(model, images, masks, EqDiffParams(class_word="box", steps=1, prior_preservation=False,
                                                      rra=False), seed=0)
    run_steps(run, 1)
    concept = run.finish()
    decodes = []
    monkeypatch.setattr(model, "decode_latents", lambda latents: decodes.append(latents))
    control = _cancel_after_unet(3)
    with pytest.raises(Cancelled):
        generate_with_concept(model, concept, PROMPT, num_inference_steps=3, control=control)
    assert control.forward_evaluations == 3 and decodes == [] and control.vae_evaluations == 0


def test_class_images_stop_before_the_decode_when_cancelled(model, monkeypatch):
    from atelier.core.errors import Cancelled

    images, masks = concept_data(count=1)
    params = EqDiffParams(class_word="box", steps=1, num_class_images=1, class_image_steps=2)
    run = EqDiffRun(model, images, masks, params, seed=0)
    decodes = []
    monkeypatch.setattr(model, "decode_latents", lambda latents: decodes.append(latents))
    control = _cancel_after_unet(2)
    with pytest.raises(Cancelled):
        run.step(control)  # the class-image step: 2 sampling steps, then the decode
    assert control.forward_evaluations == 2 and decodes == [] and run.step_index == 0


def test_training_counts_its_vae_encodes(model):
    images, masks = concept_data(count=1)
    run = EqDiffRun(model, images, masks, EqDiffParams(class_word="box", steps=1, prior_preservation=False),
                    seed=0)
    control = CallControl()
    run.step(control)
    assert control.vae_evaluations == 2  # the instance batch and the RRA reference batch


@pytest.mark.parametrize("change", ["no_params", "params_not_an_object", "bad_param_value", "no_height",
                                    "no_embeddings", "embeddings_1d", "embeddings_width", "no_reference"])
def test_a_malformed_concept_is_a_failed_precondition(model, change):
    """Concepts come from ImportConcept too (any file): generation names what is wrong instead of
    raising KeyError/AttributeError (INTERNAL)."""
    from atelier.personalization.training import Concept

    params = EqDiffParams(class_word="box", steps=1)
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    metadata = {"method": "eqdiff", "base_model": model.name, "params": params.to_json(), "height": "64",
                "width": "64"}
    tensors = {"fdte.embeddings": torch.zeros(2, width), "reference.image": torch.zeros(1, 3, 64, 64)}
    if change == "no_params":
        del metadata["params"]
    elif change == "params_not_an_object":
        metadata["params"] = "[1, 2]"
    elif change == "bad_param_value":
        metadata["params"] = params.to_json().replace('"steps": 1', '"steps": -5')
    elif change == "no_height":
        del metadata["height"]
    elif change == "no_embeddings":
        del tensors["fdte.embeddings"]
    elif change == "embeddings_1d":
        tensors["fdte.embeddings"] = torch.zeros(width)
    elif change == "embeddings_width":
        tensors["fdte.embeddings"] = torch.zeros(2, width + 1)
    elif change == "no_reference":
        del tensors["reference.image"]
    with pytest.raises(FailedPrecondition):
        generate_with_concept(model, Concept(tensors, metadata), PROMPT.replace("<new2>", params.placeholder_token),
                              num_inference_steps=1)
