"""Editing as SPDInv's published pipeline runs it: ProxEdit (proximal and inversion guidance), the
SPDInv presets, each inversion method's recipe, and the layer rules scaled to small UNets."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from atelier.core.attention import attention_sites, controlled_attention
from atelier.core.control import CallControl
from atelier.core.errors import InvalidArgument
from atelier.inversion import editing, p2p as p2p_module
from atelier.inversion.editing import edit
from atelier.inversion.inversion import invert
from atelier.inversion.masactrl import MasaCtrlParams, MutualSelfAttention
from atelier.inversion.p2p import P2PController, P2PParams, blend_sites, self_replace_sites
from atelier.inversion.presets import changed_words, spdinv_p2p
from atelier.inversion.proxedit import ProxEditParams, edit_mask, shrink
from atelier.toyworld import world

pytestmark = pytest.mark.timeout(300)
STEPS = 8


@pytest.fixture(scope="module")
def scene():
    spec = world.sample_spec(np.random.default_rng(7), num_objects=1, background_kind="solid")
    return world.render(spec)


@pytest.fixture(scope="module")
def ddim_inversion(model, scene):
    image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1
    return invert(model, image, scene.caption, method="ddim", steps=STEPS)


def colour_edit(scene):
    obj = scene.spec.objects[0]
    new = "blue" if obj.colour != "blue" else "red"
    return scene.caption, scene.caption.replace(f"a {obj.colour} {obj.shape}", f"a {new} {obj.shape}", 1)


# ---------------------------------------------------------------- proximal guidance

def test_shrink_is_the_reference_l0_prox():
    delta = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    shrunk, tau = shrink(delta, 0.5)
    assert tau == pytest.approx(delta.abs().quantile(0.5).item())
    expected = torch.where(delta.abs() > tau, delta - delta.sign() * tau, torch.zeros_like(delta))
    torch.testing.assert_close(shrunk, expected)
    mask = edit_mask(torch.tensor([[[[0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]]]]), torch.tensor(1.0))
    assert mask.eq(1).all()  # one cell above tau, dilated 3x3


def test_proximal_guidance_changes_the_edit_and_identity_edits_stay_exact(model, ddim_inversion, scene):
    source, target = colour_edit(scene)
    on = edit(model, ddim_inversion.z_T, source, target, STEPS, guidance=2.5, method="spdinv")
    off = edit(model, ddim_inversion.z_T, source, target, STEPS, guidance=2.5, method="spdinv",
               prox_edit=ProxEditParams(proximal_guidance=False))
    assert (on.image - off.image).abs().max() > 1e-3
    same = edit(model, ddim_inversion.z_T, source, source, STEPS, guidance=2.5, method="spdinv")
    assert torch.equal(same.image, same.source_image)  # NPI: d = 0 on both rows


def test_inversion_guidance_puts_the_unedited_source_on_the_chain(model, ddim_inversion, scene):
    # The source row's guidance direction is 0 under NPI, so its mask is empty and every step
    # below t = 1000 resets it to the chain: it ends at z_0 exactly.
    source, target = colour_edit(scene)
    chain = ddim_inversion.chain
    guided = edit(model, ddim_inversion.z_T, source, target, STEPS, guidance=2.5, method="spdinv", chain=chain,
                  prox_edit=ProxEditParams(inversion_guidance_timestep=1000))
    z0_image = model.decode_latents(chain[:1])
    torch.testing.assert_close(guided.source_image, z0_image, atol=1e-5, rtol=0)
    unguided = edit(model, ddim_inversion.z_T, source, target, STEPS, guidance=2.5, method="spdinv", chain=chain,
                    prox_edit=ProxEditParams(inversion_guidance=False))
    assert (unguided.source_image - z0_image).abs().max() > 1e-3
    assert (guided.image - unguided.image).abs().max() > 1e-3


def test_inversion_guidance_needs_the_chain_when_asked(model, ddim_inversion, scene):
    source, target = colour_edit(scene)
    with pytest.raises(InvalidArgument) as error:
        edit(model, ddim_inversion.z_T, source, target, STEPS, prox_edit=ProxEditParams(inversion_guidance=True))
    assert "source" in [field for field, _ in error.value.violations]
    with pytest.raises(InvalidArgument) as error:
        edit(model, ddim_inversion.z_T, source, target, STEPS, chain=ddim_inversion.chain[1:])
    assert "source" in [field for field, _ in error.value.violations]
    with pytest.raises(InvalidArgument) as error:
        edit(model, ddim_inversion.z_T, source, target, STEPS, prox_edit=ProxEditParams(quantile=1.0))
    assert "quantile" in [field for field, _ in error.value.violations]


def test_directinversion_source_branch_walks_the_chain(model, ddim_inversion, scene):
    source, target = colour_edit(scene)
    out = edit(model, ddim_inversion.z_T, source, target, STEPS, guidance=2.5, method="directinv",
               chain=ddim_inversion.chain)
    torch.testing.assert_close(out.source_image, model.decode_latents(ddim_inversion.chain[:1]), atol=1e-5, rtol=0)
    with pytest.raises(InvalidArgument):
        edit(model, ddim_inversion.z_T, source, target, STEPS, method="directinv")


def test_methods_differ_in_their_unconditional(model, ddim_inversion, scene):
    source, target = colour_edit(scene)
    npi = edit(model, ddim_inversion.z_T, source, target, STEPS, guidance=2.5, method="npi")
    ddim = edit(model, ddim_inversion.z_T, source, target, STEPS, guidance=2.5, method="ddim")
    assert (npi.source_image - ddim.source_image).abs().max() > 1e-3  # "" vs the source prompt


# ---------------------------------------------------------------- presets

def test_changed_words_and_the_spdinv_p2p_preset():
    assert changed_words("a red circle on a white background", "a blue circle on a white background") == (
        ["red"], ["blue"])
    assert changed_words("a cat sitting", "a silver cat sculpture sitting") == ([], ["silver", "sculpture"])
    params = spdinv_p2p("a red circle", "a blue circle", P2PParams())
    assert params.mode == "refine" and params.blend_words == ["red", "blue"] and params.reweight == {"blue": 2.0}
    kept = spdinv_p2p("a red circle", "a blue circle", P2PParams(mode="replace", blend_words=["circle"]))
    assert kept.mode == "replace" and kept.blend_words == ["circle"]


def test_preset_reaches_the_edit(model, ddim_inversion, scene):
    source, target = colour_edit(scene)
    preset = edit(model, ddim_inversion.z_T, source, target, STEPS, guidance=2.5, preset="spdinv")
    plain = edit(model, ddim_inversion.z_T, source, target, STEPS, guidance=2.5)
    assert preset.mode == "refine" and (preset.image - plain.image).abs().max() > 1e-3
    with pytest.raises(InvalidArgument):
        edit(model, ddim_inversion.z_T, source, target, STEPS, preset="nope")


# ---------------------------------------------------------------- layer rules on small and SD-sized UNets

def test_the_toy_unet_attends_at_the_latent_resolution_and_the_editors_control_it(model):
    # SD 1.x's layout scaled down: attention at 8x8, 4x4 and 2x2 (the first toy had none at 8x8,
    # so P2P and MasaCtrl acted on 16- and 4-token maps only).
    with controlled_attention(model.unet) as sites:
        masactrl = MutualSelfAttention(sites, MasaCtrlParams())
    latent = [s for s in sites if s.level == 0]
    assert {(s.place, s.is_cross) for s in latent} == {(p, c) for p in ("down", "up") for c in (False, True)}
    assert {s.level for s in sites} == {0, 1, 2}
    cross_edit = P2PController(lambda base, targets: targets, cross_steps=STEPS, self_steps=0, self_sites=set())
    assert all(cross_edit.wants(s, 0) for s in latent if s.is_cross)  # word swaps reach the 8x8 maps
    decoder_8x8 = {s.name for s in latent if s.place == "up" and not s.is_cross}
    assert decoder_8x8 and decoder_8x8 <= masactrl.layers  # MasaCtrl's decoder layers, as on SD


def test_self_replacement_reaches_the_toy_4x4_layers(model):
    with controlled_attention(model.unet) as sites:
        chosen = self_replace_sites(sites, (8, 8), model.unet.config.sample_size)
    levels = {s.level for s in sites if s.name in chosen}
    assert levels == {1, 2}  # the 4x4 and 2x2 maps: at most (8 / 2)**2 positions, as 32**2 on SD


def test_sd_sized_unet_keeps_the_references_layers():
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(32, 32, 32, 32), layers_per_block=2,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    sites = attention_sites(unet)
    layout = blend_sites(sites, (64, 64))
    assert {s.level for s in sites if s.name in layout.sites} == {2}  # the 16x16 maps
    assert layout.pooling == 3 and not layout.subtract_floor
    assert [s.place for s in sites if s.name in layout.sites] == ["down"] * 2 + ["up"] * 3  # [2:4], [:3]
    replaced = {s.level for s in sites if s.name in self_replace_sites(sites, (64, 64), 64)}
    assert replaced == {1, 2, 3}  # 32x32, 16x16 and the 8x8 mid block: <= 32**2


def test_local_blend_covers_the_object_not_the_frame(model, ddim_inversion, scene, monkeypatch):
    masks = []
    original = p2p_module.LocalBlend.mask
    monkeypatch.setattr(p2p_module.LocalBlend, "mask", lambda self, size: masks.append(original(self, size)) or masks[-1])
    source, target = colour_edit(scene)
    edit(model, ddim_inversion.z_T, source, target, STEPS, guidance=2.5,
         p2p=P2PParams(blend_words=list(sum(changed_words(source, target), []))))
    coverage = masks[-1][1].float().mean().item()
    assert coverage < 0.6, coverage  # 1.000 with the reference's level and pooling on this model


def test_masactrl_stops_at_the_references_total_steps(model):
    with controlled_attention(model.unet) as sites:
        controller = MutualSelfAttention(sites, MasaCtrlParams())
        late = MutualSelfAttention(sites, MasaCtrlParams(end_step=60))
    layer = next(s for s in sites if s.name in controller.layers)
    assert controller.wants(layer, 49) and not controller.wants(layer, 50)
    assert late.wants(layer, 59)


# ---------------------------------------------------------------- caller input (issue 9)

@pytest.mark.parametrize("separator", ["\x1c", "\x1d", "\x1e", "\x1f"])
def test_prompts_with_separator_characters_are_invalid_arguments(model, ddim_inversion, separator):
    with pytest.raises(InvalidArgument) as error:
        editing.plan_p2p(model.tokenizer, "a red circle", f"a{separator}blue circle", P2PParams(), 77)
    assert [field for field, _ in error.value.violations] == ["target_prompt"]


def test_reweight_beyond_float32_is_an_invalid_argument(model, ddim_inversion):
    control = CallControl()
    with pytest.raises(InvalidArgument) as error:
        edit(model, ddim_inversion.z_T, "a red circle", "a blue circle", STEPS, control=control,
             p2p=P2PParams(reweight={"blue": 1e308}))
    assert [field for field, _ in error.value.violations] == ["reweight"]
    assert control.forward_evaluations == 0


# ---------------------------------------------------------------- MasaCtrl MaskAuto

def test_mask_auto_attends_foreground_to_foreground(model):
    from types import SimpleNamespace

    from atelier.core.attention import AttentionCall, BatchLayout
    from atelier.inversion.masactrl import MutualSelfAttentionMaskAuto

    with controlled_attention(model.unet) as sites:
        controller = MutualSelfAttentionMaskAuto(sites, MasaCtrlParams(start_step=0), torch.zeros(2, 77),
                                                 frozenset(), threshold=0.5)
    site = next(s for s in sites if s.name in controller.layers)
    source_map, target_map = torch.zeros(16), torch.zeros(16)
    source_map[:8], target_map[8:] = 1.0, 1.0  # source object: first 8 positions; target object: last 8
    controller.maps, controller.map_size = [torch.stack([source_map, target_map])], (4, 4)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 1, 16, 8, generator=generator) for _ in range(3))
    call = AttentionCall(module=SimpleNamespace(scale=0.5, heads=1), site=site, step=0, layout=BatchLayout(2),
                         query=q, key=k, value=v, hidden_states=None, context=None, attention_mask=None,
                         spatial_size=(4, 4))
    out = controller.attend(call).view(2, 2, 1, 16, 8)
    for group in range(2):
        source_k, source_v = k[2 * group], v[2 * group]
        own = torch.softmax(q[2 * group] @ source_k.transpose(-1, -2) * 0.5, -1) @ source_v
        torch.testing.assert_close(out[group, 0], own)
        target_q = q[2 * group + 1]
        fg = torch.softmax(target_q[:, 8:] @ source_k[:, :8].transpose(-1, -2) * 0.5, -1) @ source_v[:, :8]
        bg = torch.softmax(target_q[:, :8] @ source_k[:, 8:].transpose(-1, -2) * 0.5, -1) @ source_v[:, 8:]
        torch.testing.assert_close(out[group, 1, :, 8:], fg)
        torch.testing.assert_close(out[group, 1, :, :8], bg)


def test_mask_auto_at_threshold_zero_is_plain_masactrl_and_checks_its_words(model, ddim_inversion, scene):
    source, target = colour_edit(scene)
    obj = scene.spec.objects[0]
    kwargs = dict(engine="masactrl", guidance=2.5, method="ddim")
    plain = edit(model, ddim_inversion.z_T, source, target, STEPS, masactrl=MasaCtrlParams(start_step=1), **kwargs)
    words = dict(mask_source_words=[obj.shape], mask_target_words=[obj.shape])
    everywhere = edit(model, ddim_inversion.z_T, source, target, STEPS,
                      masactrl=MasaCtrlParams(start_step=1, mask_threshold=0.0, **words), **kwargs)
    torch.testing.assert_close(everywhere.image, plain.image, atol=1e-5, rtol=0)
    masked = edit(model, ddim_inversion.z_T, source, target, STEPS, masactrl=MasaCtrlParams(start_step=1, **words),
                  **kwargs)
    assert (masked.image - plain.image).abs().max() > 1e-4
    with pytest.raises(InvalidArgument) as error:
        edit(model, ddim_inversion.z_T, source, target, STEPS,
             masactrl=MasaCtrlParams(mask_source_words=["zebra"], mask_target_words=[obj.shape]), **kwargs)
    assert [field for field, _ in error.value.violations] == ["mask_source_words"]
    with pytest.raises(InvalidArgument) as error:
        edit(model, ddim_inversion.z_T, source, target, STEPS, masactrl=MasaCtrlParams(mask_source_words=["a"]),
             **kwargs)
    assert [field for field, _ in error.value.violations] == ["mask_target_words"]
