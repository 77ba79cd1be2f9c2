"""The ONNX export of SAM's image encoder (Triton's onnxruntime backend) matches the torch
encoder the segmentation service runs locally, and its config matches the graph."""
from __future__ import annotations

import re

import numpy as np
import pytest

from atelier.core.models import EMBEDDED_DIR
from atelier.models.pull import main

onnxruntime = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.timeout(300)


def test_export_matches_the_local_encoder(tmp_path, capsys):
    sam = EMBEDDED_DIR / "toy-sam"
    if not (sam / "config.json").exists():
        pytest.skip("embedded toy-sam not built")
    repository = tmp_path / "triton-repository"
    assert main(["export-sam-onnx", "--sam", str(sam), "--repository", str(repository), "--check"]) == 0
    assert "max relative difference" in capsys.readouterr().out
    folder = repository / "sam_image_encoder"
    config = (folder / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config

    # The encoder the segmentation service runs (SamPredictor's model), on a real prepared image.
    import torch
    from PIL import Image

    from atelier.segmentation.sam import SamPredictor

    predictor = SamPredictor.load(str(sam), device="cpu")
    image = Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8))
    pixels = torch.stack([predictor.pixel_values(predictor.prepare(image))] * 3).numpy()
    with torch.no_grad():
        expected = predictor.model.get_image_embeddings(torch.from_numpy(pixels)).numpy()
    session = onnxruntime.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["image_embeddings"], {"pixel_values": pixels})
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * float(np.abs(expected).max()))

    # config.pbtxt's dims are the graph's (batch is Triton's max_batch_size dimension).
    dims = [list(map(int, d.split(","))) for d in re.findall(r"dims: \[ ([\d, ]+) \]", config)]
    assert dims == [list(pixels.shape[1:]), list(expected.shape[1:])]
    assert session.get_inputs()[0].name == "pixel_values"


def test_check_refuses_a_wrong_export(tmp_path):
    sam = EMBEDDED_DIR / "toy-sam"
    if not (sam / "config.json").exists():
        pytest.skip("embedded toy-sam not built")
    from atelier.models.onnx_export import ExportError, check_export, export_sam_image_encoder

    folder = export_sam_image_encoder(str(sam), str(tmp_path / "repo"))
    import onnx

    graph = onnx.load(str(folder / "1" / "model.onnx"))
    initializer = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = onnx.numpy_helper.to_array(initializer).copy()
    # A corrupted weight (noise, not a scale: LayerNorms would undo a scale).
    values += np.random.default_rng(0).standard_normal(values.shape).astype(values.dtype) * values.std()
    initializer.CopyFrom(onnx.numpy_helper.from_array(values, initializer.name))
    onnx.save(graph, str(folder / "1" / "model.onnx"))
    with pytest.raises(ExportError):
        check_export(str(sam), folder)
