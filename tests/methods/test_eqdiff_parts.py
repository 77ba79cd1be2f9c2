"""EqDiff building blocks: parameters, FDTE spectra and injection, MGDP, RRA at initialisation."""
import math

import pytest
import torch

from atelier.core.attention import BatchLayout, attention_kwargs, controlled_attention
from atelier.core.errors import InvalidArgument
from atelier.personalization.eqdiff import fdte, mgdp
from atelier.personalization.eqdiff.params import EqDiffParams
from atelier.personalization.eqdiff.rra import EqDiffAttention, EqDiffLayers, ReferenceBank

from eqdiff_helpers import concept_data


# ---------------------------------------------------------------- parameters
def test_defaults_are_the_reference_ones():
    params = EqDiffParams(class_word="box").validate()
    assert params.steps == 600 and params.weight_decay == 1e-2 and params.max_grad_norm == 1.0
    assert (params.p_low, params.p_high, params.p_original) == (0.1, 0.1, 0.8)
    assert params.effective_learning_rate == pytest.approx(4e-5)  # 1e-5 x batch 2 x 2 (prior)
    assert params.initializer == "box"
    assert EqDiffParams.from_json(params.to_json()) == params


@pytest.mark.parametrize("changes, field", [
    ({"class_word": ""}, "class_word"),
    ({"steps": 0}, "steps"),
    ({"steps": 10**9}, "steps"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"p_low": 0.5}, "p_original"),
    ({"p_high": 1.5}, "p_high"),
    ({"placeholder_token": "a b"}, "placeholder_token"),
    ({"prompt_template": "photo of a box"}, "prompt_template"),
    ({"mask_dilation_iterations": -1}, "mask_dilation_iterations"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"num_class_images": 0}, "num_class_images"),
])
def test_bad_params_name_their_argument(changes, field):
    with pytest.raises(InvalidArgument) as error:
        EqDiffParams(**{"class_word": "box", **changes}).validate()
    assert field in [f for f, _ in error.value.violations]


# ---------------------------------------------------------------- FDTE
def _energy(images, inside_half):
    """Share of grayscale spectral energy inside the centre box of half-width ``inside_half``."""
    gray = images.mean(dim=1)
    power = torch.fft.fftshift(torch.fft.fft2(gray), dim=(-2, -1)).abs() ** 2
    box = fdte.centre_box(gray.shape[-2], gray.shape[-1], inside_half, inside_half)
    return float(power[..., box].sum() / power.sum())


def test_half_widths_scale_with_image_size():
    assert fdte.scaled_half_width(50, 512) == 50 and fdte.scaled_half_width(5, 512) == 5
    assert fdte.scaled_half_width(50, 64) == 6 and fdte.scaled_half_width(5, 64) == 1
    assert fdte.scaled_half_width(50, 256) == 25


def _spectrum(field):
    return torch.fft.fftshift(torch.fft.fft2(field), dim=(-2, -1))


def test_filtered_spectra_respect_the_cut_offs():
    images, _ = concept_data(count=3)
    low_box, high_box = fdte.centre_box(64, 64, 6, 6), fdte.centre_box(64, 64, 1, 1)  # 50 and 5 px at 512
    original = _spectrum(images.mean(dim=1)).abs() ** 2
    low_field = fdte.filtered_field(images, fdte.LOW)
    high_field = fdte.filtered_field(images, fdte.HIGH)
    low_power, high_power = _spectrum(low_field).abs() ** 2, _spectrum(high_field).abs() ** 2
    # low-pass: no energy outside the box, all of the original's inside it
    assert float(low_power[..., ~low_box].sum()) < 1e-6 * float(original.sum())
    assert torch.allclose(low_power[..., low_box], original[..., low_box], rtol=1e-3, atol=1e-2)
    # high-pass: nothing inside the box (DC included), all of the original's outside it
    assert float(high_power[..., high_box].sum()) < 1e-6 * float(original.sum())
    assert torch.allclose(high_power[..., ~high_box], original[..., ~high_box], rtol=1e-3, atol=1e-2)
    # the images FDTE trains on: |field| as grayscale RGB
    low, high = fdte.frequency_filter(images, fdte.LOW), fdte.frequency_filter(images, fdte.HIGH)
    assert low.shape == images.shape and torch.equal(low[:, 0], low[:, 2])
    assert torch.allclose(low[:, 0], low_field.abs(), atol=1e-6)
    assert torch.allclose(high[:, 1], high_field.abs(), atol=1e-6)
    # even after |.|, the low-pass image keeps far less energy outside the box than the original
    assert _energy(low, 6) > 0.98 and _energy(images, 6) < 0.9


def test_apply_choices_filters_only_the_chosen_rows():
    images, _ = concept_data(count=3)
    out = fdte.apply_choices(images, torch.tensor([fdte.ORIGINAL, fdte.LOW, fdte.HIGH]), 50, 5)
    assert torch.equal(out[0], images[0])
    assert torch.equal(out[1], fdte.frequency_filter(images[1:2], fdte.LOW)[0])
    assert torch.equal(out[2], fdte.frequency_filter(images[2:3], fdte.HIGH)[0])


def test_placeholder_located_by_token_id_and_injection(model):
    tokenizer = model.tokenizer
    filler = fdte.single_token_id(tokenizer, "box", "class_word")
    prompt = "a striped <new2> box on a blue background"
    ids, positions = fdte.tokenize_with_placeholder(tokenizer, [prompt], "<new2>", filler)
    plain = tokenizer([prompt.replace("<new2>", "box")], padding="max_length",
                      max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    assert torch.equal(ids, plain)
    assert positions.sum() == 1 and ids[0, positions[0]].item() == filler
    # without injection: exactly the pipeline's prompt encoding
    assert torch.allclose(fdte.encode_with_injection(model.text_encoder, ids, positions, None),
                          model.encode_prompt([prompt.replace("<new2>", "box")]), atol=1e-6)
    vector = torch.randn(1, model.text_encoder.config.hidden_size)
    injected = fdte.encode_with_injection(model.text_encoder, ids, positions, vector)
    base = fdte.encode_with_injection(model.text_encoder, ids, positions, None)
    index = int(positions[0].nonzero()[0])
    assert torch.allclose(injected[0, :index], base[0, :index], atol=1e-6)  # causal: earlier tokens unchanged
    assert not torch.allclose(injected[0, index], base[0, index])
    with pytest.raises(InvalidArgument) as error:
        fdte.single_token_id(tokenizer, "", "class_word")
    assert error.value.violations[0][0] == "class_word"


def test_embeddings_table():
    embeddings = fdte.FrequencyEmbeddings(torch.ones(4))
    with torch.no_grad():
        embeddings.weight[fdte.HF_ROW] = 2.0
    vectors = embeddings.vectors(torch.tensor([fdte.LOW, fdte.HIGH, fdte.ORIGINAL]))
    assert vectors[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert embeddings.combined()[0].item() == 3.0


# ---------------------------------------------------------------- MGDP
def test_dilation_scales_and_matches_repeated_5x5_pools():
    assert mgdp.dilation_radius(5, 64) == 10 and mgdp.dilation_radius(5, 8) == 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[0, 0, 30:34, 20:25] = 1
    repeated = mask
    for _ in range(5):  # the reference: 5 passes of a 5x5 max-pool with reflect padding
        repeated = torch.nn.functional.max_pool2d(torch.nn.functional.pad(repeated, (2, 2, 2, 2), mode="reflect"), 5, 1)
    assert torch.equal(mgdp.dilate(mask, 10), repeated)


def test_mgdp_leaves_background_latents_untouched():
    generator = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:6] = 1
    z_t = 0.5 * z0 + 0.8 * noise
    mixed = mgdp.mask_guided_latents(z_t, z0, mask)
    background = (mask == 0).expand_as(z0)
    assert torch.equal(mixed[background], z0[background])
    assert torch.equal(mixed[~background], z_t[~background])
    # the loss only sees the subject: changing eps_hat outside the mask changes nothing
    eps_hat = torch.randn(2, 4, 8, 8, generator=generator)
    changed = torch.where(background, eps_hat + 5, eps_hat)
    assert mgdp.masked_diffusion_loss(eps_hat, noise, mask) == mgdp.masked_diffusion_loss(changed, noise, mask)
    ones = torch.ones(2, 1, 8, 8)
    assert math.isclose(float(mgdp.masked_diffusion_loss(eps_hat, noise, ones)),
                        4 * float(((eps_hat - noise) ** 2).mean()), rel_tol=1e-5)


# ---------------------------------------------------------------- RRA
def test_rra_fusion_starts_at_zero_so_the_output_is_the_base_unet(model):
    layers = EqDiffLayers(model.unet, custom_diffusion=False, rra=True)
    assert len(layers.rra) > 0
    assert all(float(layer.to_out_res.weight.detach().abs().sum()) == 0 for layer in layers.rra.values())
    generator = torch.Generator().manual_seed(3)
    x, ref = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    cond = model.encode_prompt(["a box", "a ball"])
    t = torch.tensor(500)
    layout = BatchLayout(branches=2, groups=("cond",))
    with torch.no_grad(), controlled_attention(model.unet):
        base = model.unet(x, t, encoder_hidden_states=cond).sample
        bank = ReferenceBank(set(layers.rra_site_names()))
        model.unet(ref, t, encoder_hidden_states=cond, cross_attention_kwargs=attention_kwargs(bank, 0, layout))
        assert set(bank.features) == set(layers.rra_site_names())
        controller = EqDiffAttention(layers, bank=bank)
        fused = model.unet(x, t, encoder_hidden_states=cond,
                           cross_attention_kwargs=attention_kwargs(controller, 0, layout)).sample
        assert torch.allclose(fused, base, atol=1e-5)
        # a non-zero fusion layer does change the output (the test can fail)
        for layer in layers.rra.values():
            torch.nn.init.constant_(layer.to_out_res.bias, 0.5)
        moved = model.unet(x, t, encoder_hidden_states=cond,
                           cross_attention_kwargs=attention_kwargs(controller, 0, layout)).sample
        assert (moved - base).abs().max() > 1e-3


def test_custom_diffusion_kv_start_at_the_base_weights(model):
    layers = EqDiffLayers(model.unet, custom_diffusion=True, rra=False)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    cond = model.encode_prompt(["a box"])
    with torch.no_grad(), controlled_attention(model.unet):
        base = model.unet(x, torch.tensor(300), encoder_hidden_states=cond).sample
        controller = EqDiffAttention(layers)
        out = model.unet(x, torch.tensor(300), encoder_hidden_states=cond,
                         cross_attention_kwargs=attention_kwargs(controller, 0, BatchLayout(1, ("cond",)))).sample
    assert torch.allclose(out, base, atol=1e-5)


# ---------------------------------------------------------------- attention losses
def test_attention_losses_vanish_on_ideal_maps_and_not_otherwise():
    from atelier.personalization.eqdiff.losses import cross_attention_loss, reference_attention_loss

    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[..., 4:12, 6:10] = True  # the subject; the maps below are 4x4 (16 queries)
    small = torch.nn.functional.interpolate(mask.float(), size=(4, 4), mode="nearest").flatten(1)  # (1, 16)
    positions = torch.zeros(1, 77, dtype=torch.bool)
    positions[0, 3] = True
    ideal = torch.full((1, 16, 77), 0.01)
    ideal[0, :, 3] = small[0] * 0.5  # any positive scale: the map is divided by its max
    assert float(cross_attention_loss([ideal], positions, mask)) == 0.0
    wrong = ideal.clone()
    wrong[0, :, 3] = 1 - small[0]
    assert float(cross_attention_loss([wrong], positions, mask)) > 0.5

    subject = small[0] > 0
    attention = torch.zeros(1, 16, 16)
    attention[0][:, subject] = 1.0 / int(subject.sum())  # every query attends to the reference subject
    assert float(reference_attention_loss([attention], mask, mask)) == 0.0
    away = torch.zeros(1, 16, 16)
    away[0][:, ~subject] = 1.0 / int((~subject).sum())  # attends to the reference background
    assert float(reference_attention_loss([away], mask, mask)) == pytest.approx(float(small.mean()))
