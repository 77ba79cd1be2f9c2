"""The training recipe builds the architectures that ship (so `make toy-world` remakes them)."""
import json

import pytest

from atelier.toyworld import train_common
from atelier.toyworld.train_common import EMBEDDED


def _shipped(relative: str) -> dict:
    path = EMBEDDED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (run `make toy-world`)")
    return json.loads(path.read_text())


@pytest.mark.parametrize("relative, recipe", [("toy/vae/config.json", train_common.VAE_CONFIG),
                                               ("toy/unet/config.json", train_common.UNET_CONFIG)])
def test_sd_components_match_the_recipe(relative, recipe):
    shipped = _shipped(relative)
    for key, value in recipe.items():
        assert shipped[key] == (list(value) if isinstance(value, tuple) else value), key


def test_sam_matches_the_recipe():
    from atelier.toyworld.train_sam import SAM_CONFIG

    shipped = _shipped("toy-sam/config.json")
    for section, name in (("vision", "vision_config"), ("prompt", "prompt_encoder_config"),
                          ("decoder", "mask_decoder_config")):
        for key, value in SAM_CONFIG[section].items():
            assert shipped[name][key] == value, f"{name}.{key}"
