"""The shared attention mechanism: installation, default equivalence, recording, K/V injection."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from atelier.core.attention import (AttentionController, AttentionRecorder, BatchLayout, ControlledAttnProcessor,
                                    attention_kwargs, attention_sites, controlled_attention, feature_size)

TOKENS, TEXT_DIM = 77, 32


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=32, cross_attention_dim=TEXT_DIM, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 6, generator=generator)  # non-square on purpose
    text = torch.randn(4, TOKENS, TEXT_DIM, generator=generator)
    return x, torch.tensor(500), text


def run(unet, inputs, controller=None, step=0):
    x, t, text = inputs
    kwargs = None if controller is None else attention_kwargs(controller, step, BatchLayout(branches=2), (8, 6))
    return unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample


class ExplicitProbabilities(AttentionController):
    """Does nothing, but through the explicit softmax(QK^T/sqrt d) path."""

    def attend(self, call):
        return call.attend(probs=call.probabilities())


class DuplicatedKeys(AttentionController):
    """Concatenates every row's K/V with itself: softmax over duplicated keys leaves the output unchanged."""

    def attend(self, call):
        return call.attend(key=torch.cat([call.key, call.key], dim=2), value=torch.cat([call.value, call.value], dim=2))


class SourceKeys(AttentionController):
    """Every row attends to row 0's keys/values in self-attention (the MasaCtrl shape of edit)."""

    def wants(self, site, step):
        return not site.is_cross

    def attend(self, call):
        return call.attend(key=call.key[:1].expand_as(call.key), value=call.value[:1].expand_as(call.value))


@pytest.mark.parametrize("controller", [None, AttentionController(), ExplicitProbabilities(), DuplicatedKeys()],
                         ids=["no-controller", "default", "explicit-probs", "duplicated-kv"])
def test_doing_nothing_leaves_the_output_unchanged_and_uninstall_restores(unet, inputs, controller):
    before = dict(unet.attn_processors)
    expected = run(unet, inputs)
    with controlled_attention(unet) as sites:
        assert all(isinstance(p, ControlledAttnProcessor) for p in unet.attn_processors.values())
        assert len(sites) == len(before)
        actual = run(unet, inputs, controller)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)


def test_uninstall_restores_after_an_error(unet, inputs):
    before = dict(unet.attn_processors)

    class Failing(AttentionController):
        def attend(self, call):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), controlled_attention(unet):
        run(unet, inputs, Failing())
    assert all(unet.attn_processors[name] is before[name] for name in before)


def test_sites_are_listed_in_execution_order(unet, inputs):
    class Order(AttentionController):
        def __init__(self):
            self.names = []

        def attend(self, call):
            self.names.append(call.site.name)
            return call.attend()

    order = Order()
    with controlled_attention(unet) as sites:
        run(unet, inputs, order)
    assert order.names == [site.name for site in sites]
    assert [s.place for s in sites] == sorted((s.place for s in sites), key=("down", "mid", "up").index)
    assert [s.self_index for s in sites if not s.is_cross] == list(range(sum(not s.is_cross for s in sites)))
    assert [s.cross_index for s in sites if s.is_cross] == list(range(sum(s.is_cross for s in sites)))
    levels = {s.name.split(".transformer_blocks")[0]: s.level for s in sites}
    assert levels["down_blocks.0.attentions.0"] == 0 and levels["down_blocks.1.attentions.0"] == 1
    assert levels["mid_block.attentions.0"] == 1
    assert levels["up_blocks.0.attentions.0"] == 1 and levels["up_blocks.1.attentions.0"] == 0


def test_recorded_cross_attention_maps_have_the_right_shapes_and_sum_to_one(unet, inputs):
    recorder = AttentionRecorder(cross=True, self_attention=False)
    with controlled_attention(unet) as sites:
        run(unet, inputs, recorder, step=3)
    cross = [s for s in sites if s.is_cross]
    assert sorted(recorder.maps) == sorted((3, s.name) for s in cross)
    for site in cross:
        probs = recorder.maps[(3, site.name)]
        h, w = feature_size((8, 6), site.level, probs.shape[2])
        assert (h, w) == ((8, 6) if site.level == 0 else (4, 3))
        heads = unet.get_submodule(site.name).heads
        assert probs.shape == (4, heads, h * w, TOKENS)
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, heads, h * w), atol=1e-5, rtol=0)


def test_self_attention_maps_are_square_over_positions(unet, inputs):
    recorder = AttentionRecorder(cross=False, self_attention=True)
    with controlled_attention(unet) as sites:
        run(unet, inputs, recorder)
    for site in (s for s in sites if not s.is_cross):
        probs = recorder.maps[(0, site.name)]
        assert probs.shape[-1] == probs.shape[-2]


def test_key_value_injection_reaches_the_output(unet, inputs):
    x, t, text = inputs
    same = (x[:1].expand_as(x).contiguous(), t, text[:1].expand_as(text).contiguous())
    with controlled_attention(unet):
        injected = run(unet, inputs, SourceKeys())
        # Rows identical to row 0 are unaffected by attending to row 0's own keys.
        torch.testing.assert_close(run(unet, same, SourceKeys()), run(unet, same), atol=1e-5, rtol=0)
    plain = run(unet, inputs)
    torch.testing.assert_close(injected[:1], plain[:1], atol=1e-5, rtol=0)
    assert (injected[1:] - plain[1:]).abs().max() > 1e-3


def test_batch_layout_rows():
    layout = BatchLayout(branches=2)
    assert layout.size == 4 and layout.row(0, "uncond") == 0 and layout.row(1, "cond") == 3
    assert layout.split(torch.arange(4)).tolist() == [[0, 1], [2, 3]]


def test_overlapping_installs_keep_control_until_the_last_leaves(unet, inputs):
    before = dict(unet.attn_processors)
    first, second = controlled_attention(unet), controlled_attention(unet)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert all(isinstance(p, ControlledAttnProcessor) for p in unet.attn_processors.values())
    recorder = AttentionRecorder()
    run(unet, inputs, recorder)
    assert recorder.maps
    second.__exit__(None, None, None)
    assert all(unet.attn_processors[name] is before[name] for name in before)
