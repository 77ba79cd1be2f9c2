"""LayerDiffusion as a TrainingRun on the embedded toy model (few steps)."""
import io

import numpy as np
import pytest
import torch

from atelier.core.control import CallControl
from atelier.core.errors import FailedPrecondition, InvalidArgument
from atelier.personalization.layerdiffusion import LayerDiffusionParams, LayerDiffusionRun, generate_with_concept
from atelier.personalization.layerdiffusion.conditioning import guidance_schedule
from atelier.personalization.layerdiffusion.generate import iterative_guidance_sample
from atelier.toyworld import world


def scene(seed=3, **kwargs):
    s = world.scene_from_seed(seed, num_objects=1, **kwargs)
    image = world.to_tensor_batch([s])
    mask = torch.from_numpy(np.stack(s.masks[:1]))[:, None]
    return image, mask


def reference():
    return scene(11, background_kind="striped", background_colour="blue")


def params(**kwargs):
    defaults = dict(object_text="a red triangle", background_text="on a striped blue background",
                    embedding_steps=2, finetune_steps=2, num_images=1, num_inference_steps=4, reference_steps=3)
    defaults.update(kwargs)
    return LayerDiffusionParams(**defaults)


def run_steps(run, count):
    return [run.step(CallControl()) for _ in range(count)]


def box_segmenter(image):
    """A stand-in for SAM on the generated reference: the centre square is 'the object'."""
    mask = torch.zeros(1, 1, *image.shape[-2:], dtype=torch.bool)
    mask[..., 24:40, 24:40] = True
    return mask


def test_stage1_lowers_its_masked_loss(model):
    image, mask = scene()
    ref, ref_mask = reference()
    p = params(embedding_steps=40, embedding_learning_rate=2e-2, finetune=False, num_images=0)
    run = LayerDiffusionRun(model, image, mask, p, reference=ref, reference_mask=ref_mask, seed=1)

    def validation():
        state = run.generator.get_state()
        losses = []
        with torch.no_grad():
            for seed in range(16):
                run.generator.manual_seed(1000 + seed)
                losses.append(float(run.embedding_loss(CallControl(), backward=False)))
        run.generator.set_state(state)
        return sum(losses) / len(losses)

    before = validation()
    reports = run_steps(run, p.embedding_steps)
    assert {r.phase for r in reports} == {"embedding"}
    after = validation()
    assert after < 0.95 * before, (before, after)


def test_interpolation_uses_the_optimised_embeddings(model):
    image, mask = scene()
    ref, ref_mask = reference()
    p = params(embedding_steps=3, finetune=False, num_images=0, alpha=0.7)
    run = LayerDiffusionRun(model, image, mask, p, reference=ref, reference_mask=ref_mask)
    e_a0, e_b0 = run.e_a.detach().clone(), run.e_b.detach().clone()
    run_steps(run, 3)
    concept = run.finish()
    e_a, e_b = concept.tensors["embedding.object"], concept.tensors["embedding.background"]
    assert not torch.equal(e_a, e_a0) and not torch.equal(e_b, e_b0)
    assert torch.allclose(concept.tensors["embedding.optimised"], 0.7 * e_a + 0.3 * e_b)
    assert not torch.allclose(concept.tensors["embedding.optimised"], 0.7 * e_a0 + 0.3 * e_b0)


def test_even_odd_schedule_alternates_on_the_step_index(model):
    assert guidance_schedule(5) == ["object", "optimised", "object", "optimised", "object"]
    assert guidance_schedule(3, iterative=False) == ["optimised"] * 3
    e_a = model.encode_prompt(["a red triangle"])
    e_opt = model.encode_prompt(["a red triangle on a striped blue background"])
    seen = []
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    iterative_guidance_sample(model, e_a, e_opt, noise, 6, 7.5, True, CallControl(),
                              record=lambda i, t, name, cond: seen.append((i, t, name, cond)))
    assert [i for i, *_ in seen] == list(range(6))
    assert all(t % 2 == 1 for _, t, _, _ in seen)  # SD's timesteps: a literal t % 2 never picks e_a
    for i, _, name, cond in seen:
        assert (cond is e_a) == (i % 2 == 0) and (cond is e_opt) == (i % 2 == 1), (i, name)


def test_resume_is_bit_exact_across_phases(model):
    image, mask = scene()
    p = params(embedding_steps=2, finetune_steps=2, num_images=2)
    straight = LayerDiffusionRun(model, image, mask, p, segment=box_segmenter, seed=4)
    assert straight.total_steps == 1 + 2 + 2 + 2
    reports = run_steps(straight, straight.total_steps)
    assert [r.phase for r in reports] == ["reference", "embedding", "embedding", "finetune", "finetune",
                                          "sample", "sample"]
    assert reports[-1].preview is not None and set(reports[3].losses) == {"object", "background", "loss"}
    expected = straight.finish()
    for cut in (1, 2, 4, 6):  # inside / between every phase
        first = LayerDiffusionRun(model, image, mask, p, segment=box_segmenter, seed=4)
        run_steps(first, cut)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = LayerDiffusionRun(model, image, mask, p, segment=box_segmenter, seed=4)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        later = run_steps(resumed, resumed.total_steps - cut)
        assert [r.losses for r in later] == [r.losses for r in reports[cut:]], cut
        got = resumed.finish()
        assert got.tensors.keys() == expected.tensors.keys()
        assert all(torch.equal(got.tensors[k], expected.tensors[k]) for k in expected.tensors), cut
        assert got.metadata == expected.metadata
    with pytest.raises(FailedPrecondition):
        straight.step(CallControl())


def test_finetune_changes_the_unet_and_generate_redraws_the_job_images(model):
    image, mask = scene()
    ref, ref_mask = reference()
    p = params(embedding_steps=1, finetune_steps=2, finetune_learning_rate=1e-4, num_images=2)
    run = LayerDiffusionRun(model, image, mask, p, reference=ref, reference_mask=ref_mask, seed=7)
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    run_steps(run, run.total_steps)
    concept = run.finish()
    tuned = {k[len("unet."):]: v for k, v in concept.tensors.items() if k.startswith("unet.")}
    assert tuned.keys() == base.keys() and any(not torch.equal(tuned[k], base[k]) for k in base)
    assert all(torch.equal(v, base[k]) for k, v in model.unet.state_dict().items())  # shared model untouched
    again = generate_with_concept(model, concept, seed=7, num_images=2)
    assert torch.allclose(again, concept.tensors["result.images"], atol=1e-6)
    other = generate_with_concept(model, concept, seed=20, num_images=1)
    assert not torch.allclose(other, again[1:2])


def test_ablations_shape_the_run(model):
    image, mask = scene()
    ref, ref_mask = reference()
    no_layers = LayerDiffusionRun(model, image, mask, params(layered_optimization=False, finetune=False),
                                  reference=ref, reference_mask=ref_mask)
    assert [name for name, count in no_layers.phases if count] == ["sample"]
    bg_only = LayerDiffusionRun(model, image, mask, params(object_loss=False, embedding_steps=1),
                                reference=ref, reference_mask=ref_mask)
    reports = run_steps(bg_only, 3)
    assert set(reports[-1].losses) == {"background", "loss"}


@pytest.mark.parametrize("kwargs, field", [
    (dict(object_text=" "), "object_text"),
    (dict(background_text=""), "background_text"),
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(embedding_steps=0), "embedding_steps"),
    (dict(finetune_steps=10 ** 9), "finetune_steps"),
    (dict(object_loss_weight=-1.0), "object_loss_weight"),
    (dict(finetune_mode="qlora"), "finetune_mode"),
    (dict(lora_rank=0), "lora_rank"),
    (dict(guidance_scale=0.5), "guidance_scale"),
    (dict(object_loss=False, background_loss=False), "background_loss"),
])
def test_bad_params_are_named(kwargs, field):
    with pytest.raises(InvalidArgument) as error:
        params(**kwargs).validate()
    assert field in str(error.value)


def test_bad_inputs_are_named(model):
    image, mask = scene()
    ref, ref_mask = reference()
    p = params()
    cases = [
        (dict(object_mask=torch.zeros_like(mask)), "object_mask"),
        (dict(object_mask=torch.ones_like(mask)), "object_mask"),
        (dict(reference=ref[..., :32, :32], reference_mask=ref_mask[..., :32, :32]), "reference"),
        (dict(reference_mask=torch.zeros_like(ref_mask)), "reference_mask"),
        (dict(reference_mask=torch.ones_like(ref_mask)), "reference_mask"),
        (dict(image=image * 3), "image"),
    ]
    for change, field in cases:
        kwargs = dict(image=image, object_mask=mask, params=p, reference=ref, reference_mask=ref_mask)
        kwargs.update(change)
        with pytest.raises(InvalidArgument) as error:
            LayerDiffusionRun(model, **kwargs)
        assert field in str(error.value), (field, str(error.value))


def test_cancel_stops_inside_a_step_and_leaves_the_run_resumable(model):
    from atelier.core.errors import Cancelled

    image, mask = scene()
    ref, ref_mask = reference()
    p = params(embedding_steps=1, finetune_steps=1, num_images=1, num_inference_steps=20)
    run = LayerDiffusionRun(model, image, mask, p, reference=ref, reference_mask=ref_mask, seed=3)
    run_steps(run, 2)
    calls = []
    control = CallControl(is_cancelled=lambda: len(calls) > 3)
    original = control.unet

    def counting_unet(backward=False):
        calls.append(backward)
        original(backward)

    control.unet = counting_unet
    with pytest.raises(Cancelled):
        run.step(control)  # the sample step: 20 UNet calls; the 4th is refused
    assert len(calls) == 4 and run.step_index == 2 and run.images == []
    run.step(CallControl())
    assert run.step_index == run.total_steps and len(run.images) == 1


def test_lora_mode_trains_only_adapters_resumes_and_generates(model):
    image, mask = scene()
    ref, ref_mask = reference()
    p = params(embedding_steps=1, finetune_steps=2, finetune_mode="lora", finetune_learning_rate=1e-2,
               num_images=1)
    straight = LayerDiffusionRun(model, image, mask, p, reference=ref, reference_mask=ref_mask, seed=2)
    reports = run_steps(straight, straight.total_steps)
    concept = straight.finish()
    lora = {k: v for k, v in concept.tensors.items() if k.startswith("lora.")}
    assert lora and not any(k.startswith("unet.") for k in concept.tensors)
    assert sum(v.numel() for v in lora.values()) < 0.2 * sum(p.numel() for p in model.unet.parameters())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at 0: it trained

    first = LayerDiffusionRun(model, image, mask, p, reference=ref, reference_mask=ref_mask, seed=2)
    run_steps(first, 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = LayerDiffusionRun(model, image, mask, p, reference=ref, reference_mask=ref_mask, seed=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [r.losses for r in run_steps(resumed, resumed.total_steps - 2)] == [r.losses for r in reports[2:]]
    assert all(torch.equal(resumed.finish().tensors[k], v) for k, v in concept.tensors.items())
    again = generate_with_concept(model, concept, seed=2, num_images=1)
    assert torch.allclose(again, concept.tensors["result.images"], atol=1e-6)


def test_vae_work_is_checked_and_counted(model, monkeypatch):
    """Every VAE encode/decode goes through control.vae(): a cancelled control stops before the
    input's encode, and a sample step cancelled after its UNet calls never decodes."""
    from atelier.core.errors import Cancelled

    image, mask = scene()
    ref, ref_mask = reference()
    p = params(layered_optimization=False, finetune=False, num_images=1, num_inference_steps=2)
    with pytest.raises(Cancelled):
        LayerDiffusionRun(model, image, mask, p, reference=ref, reference_mask=ref_mask,
                          control=CallControl(is_cancelled=lambda: True))
    counted = CallControl()
    run = LayerDiffusionRun(model, image, mask, p, reference=ref, reference_mask=ref_mask, control=counted)
    assert counted.vae_evaluations == 1
    decodes = []
    monkeypatch.setattr(model, "decode_latents", lambda latents: decodes.append(latents))
    control = CallControl(is_cancelled=lambda: control.forward_evaluations >= 2)
    with pytest.raises(Cancelled):
        run.step(control)
    assert control.forward_evaluations == 2 and decodes == []


def test_sampling_at_1000_steps_starts_inside_the_alphas_table(model):
    from atelier.core.errors import Cancelled

    image, mask = scene()
    e = model.encode_prompt(["a red triangle"])
    control = CallControl(is_cancelled=lambda: control.forward_evaluations >= 2)
    seen = []
    with pytest.raises(Cancelled):
        iterative_guidance_sample(model, e, e, torch.zeros(1, 4, 8, 8), 1000, 7.5, True, control,
                                  record=lambda i, t, name, cond: seen.append(t))
    assert seen[0] == 999 and control.forward_evaluations == 2


@pytest.mark.parametrize("change", ["no_params", "params_not_an_object", "no_width", "no_embedding",
                                    "embedding_shape"])
def test_a_malformed_concept_is_a_failed_precondition(model, change):
    """Concepts come from ImportConcept too (any file): generation names what is wrong instead of
    raising KeyError/AttributeError (INTERNAL)."""
    from atelier.personalization.training import Concept

    shape = tuple(model.encode_prompt([""]).shape)
    metadata = {"method": "layer_edit", "base_model": model.name, "params": params().to_json(), "height": "64",
                "width": "64"}
    tensors = {"embedding.object": torch.zeros(shape), "embedding.optimised": torch.zeros(shape)}
    if change == "no_params":
        del metadata["params"]
    elif change == "params_not_an_object":
        metadata["params"] = "7"
    elif change == "no_width":
        del metadata["width"]
    elif change == "no_embedding":
        del tensors["embedding.optimised"]
    elif change == "embedding_shape":
        tensors["embedding.object"] = torch.zeros(1, 5, shape[-1])
    with pytest.raises(FailedPrecondition):
        generate_with_concept(model, Concept(tensors, metadata), num_inference_steps=1)
