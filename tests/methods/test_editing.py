"""Editing engines: Prompt-to-Prompt and MasaCtrl over the shared attention controller."""

import pytest
import torch

from atelier.core.attention import AttentionController, BatchLayout, attention_kwargs, controlled_attention
from atelier.core.control import CallControl
from atelier.core.diffusion import guided_eps, sample
from atelier.core.errors import Cancelled, InvalidArgument
from atelier.core.models import SDModel
from atelier.core.tiny_models import build_tiny_sd
from atelier.inversion.editing import edit, make_controller, plan_p2p
from atelier.inversion.masactrl import MasaCtrlParams, MutualSelfAttention, first_controlled_layer
from atelier.inversion.proxedit import ProxEditParams
from atelier.inversion.p2p import (LocalBlend, P2PParams, blend_sites, global_alignment, refinement_mapper,
                                   replacement_mapper, self_replace_sites, tokenize_words)

STEPS = 5
MAX_LEN = 77


@pytest.fixture(scope="module")
def model():
    pipe = build_tiny_sd()
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)
    return SDModel(name="tiny", vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                   unet=pipe.unet, device=torch.device("cpu"), dtype=torch.float32,
                   scheduler_config=dict(pipe.scheduler.config))


@pytest.fixture(scope="module")
def z_T():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def plain(model, z_T, prompt, uncond_prompt, guidance=7.5):
    """Ordinary guided DDIM sampling of one branch, no attention control."""
    cond, uncond = model.encode_prompt([prompt]), model.encode_prompt([uncond_prompt])
    return model.decode_latents(sample(model, z_T, cond, uncond, STEPS, guidance, CallControl()))


def field_of(error: InvalidArgument) -> list[str]:
    return [field for field, _ in error.violations]


# ---------------------------------------------------------------- token mappers

def test_refinement_mapper_aligns_tokens(model):
    source = tokenize_words(model.tokenizer, "a circle", MAX_LEN)
    target = tokenize_words(model.tokenizer, "a big red circle", MAX_LEN)
    mapper, alphas = refinement_mapper(source, target, MAX_LEN)
    # target: BOS a big red circle EOS  <-  source: BOS a circle EOS
    assert alphas[:6].tolist() == [1, 1, 0, 0, 1, 1]
    assert [mapper[n].item() for n in (0, 1, 4, 5)] == [0, 1, 2, 3]
    assert mapper[6:].tolist() == list(range(6, MAX_LEN)) and alphas[6:].eq(1).all()
    assert global_alignment([1, 2, 3], [1, 4, 2, 3]) == [0, -1, 1, 2]
    assert global_alignment([5, 1, 2], [1, 2]) == [1, 2]


def test_replacement_mapper_swaps_words_and_spreads_multi_token_words(model):
    source = tokenize_words(model.tokenizer, "a red circle", MAX_LEN)
    target = tokenize_words(model.tokenizer, "a blue circle", MAX_LEN)
    assert torch.equal(replacement_mapper(source, target, MAX_LEN), torch.eye(MAX_LEN))
    source = tokenize_words(model.tokenizer, "zebra red", MAX_LEN)   # zebra = 5 tokens, red = 1
    target = tokenize_words(model.tokenizer, "a zebra", MAX_LEN)
    assert len(source.ids) == len(target.ids) == 8
    mapper = replacement_mapper(source, target, MAX_LEN)
    assert mapper[1:6, 1].tolist() == [1.0] * 5                     # zebra's 5 tokens -> a
    torch.testing.assert_close(mapper[6, 2:7], torch.full((5,), 0.2))  # red -> zebra's 5 tokens
    assert torch.equal(mapper[7:, 7:], torch.eye(MAX_LEN - 7))       # EOS and padding


# ---------------------------------------------------------------- P2P mechanics

class Check(AttentionController):
    """Runs the engine's controller and checks its attention output against an independent expectation."""

    def __init__(self, inner, expect):
        self.inner, self.expect, self.checked = inner, expect, []

    def attend(self, call):
        if not self.inner.wants(call.site, call.step):
            return call.attend()
        raw = call.probabilities()
        expected_probs = self.expect(call.site, raw.clone(), call.layout)
        torch.testing.assert_close(self.inner.attend(call), torch.matmul(expected_probs, call.value),
                                   atol=1e-5, rtol=0)
        self.checked.append((call.site.is_cross, call.site.name))
        return call.attend(probs=expected_probs)


@pytest.mark.parametrize("target, params, token_map", [
    ("a blue circle", P2PParams(mode="replace"), lambda src: src),
    ("a big red circle", P2PParams(mode="refine"), None),
    ("a red circle", P2PParams(mode="reweight", reweight={"red": 3.0}), "reweight"),
], ids=["replace", "refine", "reweight"])
def test_p2p_target_attention_is_the_mapped_source_attention_during_the_window(model, z_T, target, params, token_map):
    source_prompt = "a red circle"
    plan = plan_p2p(model.tokenizer, source_prompt, target, params, MAX_LEN)
    embeddings = model.encode_prompt([source_prompt, target])
    latents = z_T.expand(2, -1, -1, -1)
    layout = BatchLayout(branches=2)

    def expect(site, probs, layout):
        rows = layout.split(probs)
        src = rows[1, 0]
        if not site.is_cross:
            rows[1, 1] = src
        elif token_map is None:  # refine: BOS a big red circle EOS <- BOS a (new) red circle EOS
            own = rows[1, 1].clone()
            rows[1, 1] = src[..., [0, 1, 0, 2, 3, 4] + list(range(6, MAX_LEN))]
            rows[1, 1][..., 2] = own[..., 2]
        elif token_map == "reweight":
            rows[1, 1] = src.clone()
            rows[1, 1][..., 2] *= 3.0
        else:
            rows[1, 1] = token_map(src)
        return probs

    with controlled_attention(model.unet) as sites:
        controller = Check(make_controller(sites, 10, plan, params, MasaCtrlParams(), (8, 8), 8), expect)
        with torch.no_grad():
            guided_eps(model, latents, 900, embeddings, embeddings[:1], 7.5, CallControl(),
                       attention_kwargs(controller, 0, layout, (8, 8)))
    checked_self = {name for is_cross, name in controller.checked if not is_cross}
    assert checked_self == self_replace_sites(sites, (8, 8), 8) and checked_self
    assert sum(is_cross for is_cross, _ in controller.checked) == sum(s.is_cross for s in sites)


def test_refine_expectation_matches_the_alignment(model):
    # Pins the hand-written index list used above: "a red circle" -> "a big red circle".
    source = tokenize_words(model.tokenizer, "a red circle", MAX_LEN)
    target = tokenize_words(model.tokenizer, "a big red circle", MAX_LEN)
    mapper, alphas = refinement_mapper(source, target, MAX_LEN)
    assert mapper[:6].tolist() == [0, 1, 0, 2, 3, 4] and alphas[:6].tolist() == [1, 1, 0, 1, 1, 1]


def test_p2p_windows_and_layers_follow_the_fractions(model):
    plan = plan_p2p(model.tokenizer, "a red circle", "a blue circle", P2PParams(), MAX_LEN)
    with controlled_attention(model.unet) as sites:
        controller = make_controller(sites, 10, plan, P2PParams(), MasaCtrlParams(), (8, 8), 8)
    cross = next(s for s in sites if s.is_cross)
    low_self = next(s for s in sites if s.name in self_replace_sites(sites, (8, 8), 8))
    assert [controller.wants(cross, i) for i in (0, 7, 8)] == [True, True, False]     # int(0.8 * 11)
    assert [controller.wants(low_self, i) for i in (0, 5, 6)] == [True, True, False]  # int(0.6 * 10)
    with controlled_attention(model.unet) as sites:
        short = make_controller(sites, 4, plan, P2PParams(), MasaCtrlParams(), (8, 8), 8)
    assert short.cross_steps == 4 and short.self_steps == 2  # the reference's alpha table has steps + 1 rows
    # The tiny UNet (sample_size 8) has attention at 8x8 (level 0) and 4x4 (level 1): self-attention
    # is replaced on maps of at most (8 / 2)**2 positions, the 4x4 ones; LocalBlend reads the 4x4
    # down/up cross-attention (2 + 3 layers), unpooled (a 3x3 window would be 3/4 of that map).
    assert {s.level for s in sites if s.name in self_replace_sites(sites, (8, 8), 8)} == {1}
    layout = blend_sites(sites, (8, 8))
    assert sorted(n.split(".")[0] for n in layout.sites) == ["down_blocks"] * 2 + ["up_blocks"] * 3
    assert layout.pooling == 1 and layout.subtract_floor


# ---------------------------------------------------------------- whole edits

def test_p2p_with_target_equal_to_source_reproduces_the_source(model, z_T):
    out = edit(model, z_T, "a red circle", "a red circle", STEPS, p2p=P2PParams())
    assert torch.equal(out.image, out.source_image)
    torch.testing.assert_close(out.source_image, plain(model, z_T, "a red circle", "a red circle"),
                               atol=1e-5, rtol=0)


def test_p2p_word_replace_changes_the_image_and_keeps_the_source_branch(model, z_T):
    out = edit(model, z_T, "a red circle", "a blue circle", STEPS, p2p=P2PParams())
    assert out.mode == "replace"
    assert (out.image - out.source_image).abs().max() > 1e-4
    torch.testing.assert_close(out.source_image, plain(model, z_T, "a red circle", "a red circle"),
                               atol=1e-5, rtol=0)


def test_local_blend_threshold_extremes(model, z_T):
    # Maps are normalised to max 1, so threshold 1 masks nothing: the target becomes the source.
    # (Threshold 0 keeps all but each map's minimum here: the tiny UNet's 4x4 maps are min-max
    # normalised, see p2p.blend_sites.)
    kwargs = dict(mode="replace", blend_start_fraction=0.0)
    none_kept = edit(model, z_T, "a red circle", "a blue circle", STEPS,
                     p2p=P2PParams(blend_words=["red", "blue"], blend_threshold=1.0, **kwargs))
    assert torch.equal(none_kept.image, none_kept.source_image)
    most_kept = edit(model, z_T, "a red circle", "a blue circle", STEPS,
                     p2p=P2PParams(blend_words=["red", "blue"], blend_threshold=0.0, **kwargs))
    assert (most_kept.image - most_kept.source_image).abs().max() > 1e-4


def test_local_blend_mask_follows_the_word_maps():
    weights = torch.zeros(2, 4)
    weights[0, 1] = weights[1, 2] = 1.0
    blend = LocalBlend(weights, threshold=0.3, start_step=1)
    probs = torch.full((2, 1, 16, 4), 0.01)
    probs[0, 0, 0, 1] = 1.0    # source word attends at (0, 0) of a 4x4 map
    probs[1, 0, 15, 2] = 1.0   # target word attends at (3, 3)
    site = type("Site", (), {"name": "s"})()
    blend.record(site, probs, (4, 4))
    mask = blend.mask((8, 8))[1, 0]
    assert mask[:4, :4].all() and mask[4:, 4:].all() and not mask[:4, 4:].any() and not mask[4:, :4].any()
    latents = torch.stack([torch.zeros(4, 8, 8), torch.ones(4, 8, 8)])
    assert torch.equal(blend(0, latents), latents)  # before start_step
    blended = blend(1, latents)
    assert torch.equal(blended[1, :, :4, 4:], torch.zeros(4, 4, 4)) and blended[1, :, :4, :4].eq(1).all()


def test_masactrl_before_start_step_is_plain_sampling(model, z_T):
    # The target branch: "" unconditional (SPDInv's MasaCtrl script); the source runs unguided.
    no_prox = ProxEditParams(proximal_guidance=False)
    late = edit(model, z_T, "a red circle", "a blue square", STEPS, engine="masactrl",
                masactrl=MasaCtrlParams(start_step=STEPS), prox_edit=no_prox)
    torch.testing.assert_close(late.image, plain(model, z_T, "a blue square", ""), atol=1e-5, rtol=0)
    torch.testing.assert_close(late.source_image, plain(model, z_T, "a red circle", "", guidance=1.0),
                               atol=1e-5, rtol=0)
    early = edit(model, z_T, "a red circle", "a blue square", STEPS, engine="masactrl",
                 masactrl=MasaCtrlParams(start_step=1, start_layer=0), prox_edit=no_prox)
    assert (early.image - late.image).abs().max() > 1e-4
    torch.testing.assert_close(early.source_image, late.source_image, atol=1e-5, rtol=0)


def test_masactrl_queries_attend_to_the_source_keys_and_values(model, z_T):
    class MutualCheck(AttentionController):
        def __init__(self, inner):
            self.inner, self.checked = inner, []

        def attend(self, call):
            if not self.inner.wants(call.site, call.step):
                return call.attend()
            q, k, v = (call.layout.split(x) for x in (call.query, call.key, call.value))
            probs = (torch.matmul(q, k[:, :1].transpose(-1, -2)) * call.scale).softmax(-1)  # source keys
            expected = torch.matmul(probs, v[:, :1]).reshape(call.query.shape)
            actual = self.inner.attend(call)
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
            own = call.layout.split(call.attend())[:, 0]
            torch.testing.assert_close(call.layout.split(actual)[:, 0], own, atol=1e-5, rtol=0)  # source rows
            self.checked.append(call.site.name)
            return actual

    embeddings = model.encode_prompt(["a red circle", "a blue square"])
    latents = torch.cat([z_T, torch.randn_like(z_T)])  # distinct branches
    with controlled_attention(model.unet) as sites:
        check = MutualCheck(MutualSelfAttention(sites, MasaCtrlParams(start_step=0)))
        with torch.no_grad():
            guided_eps(model, latents, 900, embeddings, embeddings[:1], 7.5, CallControl(),
                       attention_kwargs(check, 0, BatchLayout(branches=2), (8, 8)))
    assert len(check.checked) == 4 and set(check.checked) == check.inner.layers


def test_masactrl_layers_follow_the_reference_numbering(model):
    assert first_controlled_layer(10, 16) == 10 and first_controlled_layer(0, 11) == 0
    with controlled_attention(model.unet) as sites:
        controller = MutualSelfAttention(sites, MasaCtrlParams())
    self_layers = [s for s in sites if not s.is_cross]
    assert len(self_layers) == 11
    chosen = [s.self_index for s in self_layers if s.name in controller.layers]
    assert chosen == [7, 8, 9, 10]  # ceil(10 * 11 / 16) = 7: the last 4 of 11, as 10..15 are the last 6 of 16
    assert all(s.place == "up" for s in self_layers if s.name in controller.layers)
    assert not controller.wants(self_layers[-1], 3) and controller.wants(self_layers[-1], 4)


def test_edit_stops_within_one_evaluation_after_cancel(model, z_T):
    control = CallControl(is_cancelled=lambda: control.forward_evaluations >= 2)
    with pytest.raises(Cancelled):
        edit(model, z_T, "a red circle", "a blue circle", STEPS, control=control)
    assert control.forward_evaluations == 2


def test_progress_reports_every_step(model, z_T):
    events = []
    edit(model, z_T, "a red circle", "a red square", 3, engine="masactrl", guidance=1.0,
         control=CallControl(on_progress=events.append))
    assert [(e.stage, e.step, e.total) for e in events] == [("edit", 1, 3), ("edit", 2, 3), ("edit", 3, 3)]


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("target, params, field", [
    ("", P2PParams(), "target_prompt"),
    ("   ", P2PParams(), "target_prompt"),
    ("a red zebra", P2PParams(mode="replace"), "target_prompt"),        # 1 token vs 5
    ("a big red circle", P2PParams(mode="replace"), "target_prompt"),   # word counts differ
    ("a blue circle", P2PParams(mode="reweight", reweight={"red": 2.0}), "target_prompt"),
    ("a blue circle", P2PParams(reweight={"dog": 2.0}), "reweight"),
    ("a blue circle", P2PParams(blend_words=["dog"]), "blend_words"),
    ("a blue circle", P2PParams(mode="swap"), "mode"),
    ("a blue circle", P2PParams(cross_replace_fraction=1.5), "cross_replace_fraction"),
])
def test_invalid_p2p_requests_name_the_field_before_any_evaluation(model, z_T, target, params, field):
    control = CallControl()
    with pytest.raises(InvalidArgument) as error:
        edit(model, z_T, "a red circle", target, STEPS, p2p=params, control=control)
    assert field in field_of(error.value)
    assert control.forward_evaluations == 0


def test_invalid_common_and_masactrl_arguments(model, z_T):
    with pytest.raises(InvalidArgument) as error:
        edit(model, z_T, "a red circle", "a blue circle", 0, engine="paint")
    assert {"num_inference_steps", "engine"} <= set(field_of(error.value))
    with pytest.raises(InvalidArgument) as error:
        edit(model, z_T, "a", "b", STEPS, engine="masactrl", masactrl=MasaCtrlParams(start_step=-1, start_layer=17))
    assert {"start_step", "start_layer"} <= set(field_of(error.value))


def test_auto_mode_picks_replace_or_refine(model):
    assert plan_p2p(model.tokenizer, "a red circle", "a blue circle", P2PParams(), MAX_LEN).mode == "replace"
    assert plan_p2p(model.tokenizer, "a red circle", "a big red circle", P2PParams(), MAX_LEN).mode == "refine"
    assert plan_p2p(model.tokenizer, "a red cat", "a red zebra", P2PParams(), MAX_LEN).mode == "refine"
