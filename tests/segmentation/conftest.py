"""Fixtures for the segmentation tests: a tiny SAM, test images, a loopback service."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from segmentation_helpers import make_image  # noqa: E402


@pytest.fixture(scope="session")
def sam_source(tmp_path_factory) -> str:
    """A tiny random SAM whose masks depend on the image.

    The registry's fallback toy-sam keeps SamVisionConfig's default initializer_range (1e-10),
    which makes every image embedding ~1e-21, i.e. identical masks for all images: useless for
    telling images apart. Same builder, vision init at 0.02; served under the name toy-sam.
    """
    from atelier.core.tiny_models import SAM_CONFIG, build_tiny_sam

    configs = copy.deepcopy(SAM_CONFIG)
    configs["vision"]["initializer_range"] = 0.02
    model, processor = build_tiny_sam(seed=0, configs=configs)
    folder = tmp_path_factory.mktemp("toy-sam")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def predictor(sam_source):
    from atelier.segmentation.sam import SamPredictor

    return SamPredictor.load(sam_source, name="toy-sam", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def image() -> np.ndarray:
    return make_image(0)
