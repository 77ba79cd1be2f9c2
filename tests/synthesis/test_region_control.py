"""GradOP region-semantic control: a phrase's cross-attention mass moves into its region."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atelier.core.attention import AttentionCall, controlled_attention
from atelier.core.control import CallControl
from atelier.core.models import ModelRegistry
from atelier.synthesis.gradop import SynthesisParams, gradop_plus
from atelier.synthesis.regions import RegionBinding, RegionController, phrase_tokens, region_hook
from atelier.toyworld import world

pytestmark = pytest.mark.timeout(600)


class MassMeter(RegionController):
    """Measures, at every cross-attention call, the share of each bound phrase's (unmodified)
    attention column that falls inside its region; applies the control only when ``apply``."""

    def __init__(self, *args, apply: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.apply = apply
        self.inside: list[float] = []

    def wants(self, site, step) -> bool:
        return site.is_cross

    def attend(self, call: AttentionCall) -> torch.Tensor:
        probs = call.probabilities()
        if call.spatial_size is not None and call.step > 0:
            cond = probs[call.layout.row(0, "cond")]  # (heads, queries, tokens)
            for region in self.regions:
                inside = torch.nn.functional.interpolate(region.mask[None, None].float(), size=call.spatial_size,
                                                         mode="area").flatten() > 0.5
                columns = cond[:, :, region.tokens]  # (heads, queries, k)
                self.inside.append(float(columns[:, inside].sum() / columns.sum().clamp_min(1e-12)))
        return call.attend(probs=self.adjust(call, probs) if self.apply else probs)


@pytest.fixture(scope="module")
def model():
    return ModelRegistry().load_sd("toy")


def test_phrase_tokens_find_the_phrase(model):
    tokens = phrase_tokens(model.tokenizer, "a red circle and a green square", "green square")
    assert len(tokens) >= 2 and tokens[0] > 1
    assert phrase_tokens(model.tokenizer, "a red circle", "blue dragon") == []


def test_region_control_raises_attention_mass_inside_the_region(model):
    shares = {True: [], False: []}
    for seed in (20, 23):
        scene = world.scene_from_seed(seed, num_objects=2)
        caption = scene.caption  # "a <colour> <shape> and a <colour> <shape> on ..."
        phrases = [f"{obj.colour} {obj.shape}" for obj in scene.spec.objects]
        scribble = torch.from_numpy(world.scribble_of(scene)).permute(2, 0, 1)[None].float() / 255
        cond, uncond = model.encode_prompt([caption, ""]).chunk(2)
        bindings = [RegionBinding(mask=torch.from_numpy(mask), tokens=phrase_tokens(model.tokenizer, caption, phrase))
                    for mask, phrase in zip(scene.masks, phrases)]
        assert all(binding.tokens for binding in bindings)
        for apply in (True, False):
            meter = MassMeter(bindings, kappa=0.4, num_train_timesteps=1000, apply=apply)
            params = SynthesisParams(steps=10, seed=seed)
            with controlled_attention(model.unet):
                gradop_plus(model, scribble, cond, uncond, params, CallControl(),
                            attention=region_hook(meter, params.guidance, (8, 8)))
            shares[apply].append(np.mean(meter.inside))
    assert np.mean(shares[True]) > np.mean(shares[False]), shares
