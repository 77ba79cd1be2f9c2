"""GPU smoke: the inversion methods on CUDA in fp16 (skipped where no GPU is present, as in CI)."""
from __future__ import annotations

import pytest
import torch

from atelier.core.control import CallControl
from atelier.core.models import ModelRegistry
from atelier.inversion.editing import edit
from atelier.inversion.inversion import invert

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_invert_and_edit_on_cuda_fp16():
    registry = ModelRegistry(device=torch.device("cuda"), dtype=torch.float16)
    model = registry.load_sd("toy")
    assert model.unet.dtype == torch.float16 and model.unet.device.type == "cuda"
    image = torch.rand(1, 3, 64, 64, device="cuda") * 2 - 1
    for method in ("ddim", "spdinv"):
        out = invert(model, image, "a red circle", method=method, steps=10, control=CallControl())
        assert torch.isfinite(out.chain).all()
    result = edit(model, out.chain[-1:].cuda(), "a red circle", "a blue circle", 10, control=CallControl())
    assert result.image.shape == (1, 3, 64, 64) and torch.isfinite(result.image).all()
