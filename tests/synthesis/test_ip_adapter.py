"""The shipped toy IP-Adapter: loaded by diffusers' load_ip_adapter, and its image path matters."""
from __future__ import annotations

import pytest
import torch

from atelier.core.attention import controlled_attention
from atelier.core.control import CallControl
from atelier.core.models import ModelRegistry
from atelier.inversion.inversion import invert
from atelier.synthesis.ip_adapter import find_adapter, load_adapter
from atelier.synthesis.variations import RIVAL_NEGATIVE, DCAContext, VariationParams, isa_dca_variations
from atelier.toyworld import world

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def model():
    return ModelRegistry().load_sd("toy")


def test_shipped_adapter_loads_through_diffusers(model):
    path = find_adapter(model.source)
    assert path is not None, "the toy model ships ip_adapter/*.safetensors (make toy-ip-adapter)"
    adapter = load_adapter(model, path)
    assert adapter.processor_class == "IPAdapterAttnProcessor2_0"
    cross_layers = [name for name in model.unet.attn_processors if name.endswith("attn2.processor")]
    assert len(adapter.layers) == len(cross_layers)
    # Unloaded again: the shared UNet runs plain calls (no image_embeds required).
    assert model.unet.encoder_hid_proj is None
    assert not any(hasattr(p, "to_k_ip") for p in model.unet.attn_processors.values())
    image = torch.from_numpy(world.scene_from_seed(3).image).permute(2, 0, 1)[None].float() / 255
    tokens = adapter.image_tokens(image)
    assert tokens.shape == (1, 4, model.unet.config.cross_attention_dim)
    other = adapter.image_tokens(torch.from_numpy(world.scene_from_seed(4).image).permute(2, 0, 1)[None] / 255.0)
    assert not torch.allclose(tokens, other)


def test_image_embedding_changes_the_output_versus_scale_zero(model):
    adapter = load_adapter(model, find_adapter(model.source))
    scene = world.scene_from_seed(5, num_objects=1)
    image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255
    chain = invert(model, image * 2 - 1, scene.caption, method="ddim", steps=10).chain
    cond, uncond_ref, uncond_gen = model.encode_prompt([scene.caption, "", RIVAL_NEGATIVE]).chunk(3)
    dca = DCAContext(adapter.image_tokens(image), adapter.layers)
    outputs = {}
    for scale in (1.0, 0.0):
        params = VariationParams(n=2, steps=10, seed=1, lam=0.0, until=0, dca_scale=scale)
        with controlled_attention(model.unet):
            outputs[scale] = isa_dca_variations(model, chain, cond, uncond_ref, uncond_gen, dca, params,
                                                CallControl())
    assert (outputs[1.0] - outputs[0.0]).abs().mean() > 1e-3
