"""Export SAM's image encoder to ONNX as a Triton model (onnxruntime backend, no torch in Triton).

    python -m atelier.models export-sam-onnx --sam /models/sam-vit-base --repository /models/triton-repository

writes ``<repository>/sam_image_encoder/config.pbtxt`` and ``.../1/model.onnx``: the same
interface as the Python-backend model in deploy/triton-repository (input ``pixel_values``
(B, 3, S, S) FP32 - SamProcessor's output -, output ``image_embeddings`` (B, C, s, s) FP32), so
the segmentation service's Triton backend works with either. ``--check`` (default on when
onnxruntime is installed) runs both the exported graph and the torch encoder on a random batch
and refuses the export when they differ beyond ``--tolerance`` (max abs difference relative to
the embeddings' scale).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["export_sam_image_encoder", "check_export", "ExportError"]

MODEL_NAME = "sam_image_encoder"


class ExportError(RuntimeError):
    pass


def _encoder_module(model):
    import torch

    class ImageEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model.get_image_embeddings(pixel_values)

    return ImageEncoder().eval()


def _config_pbtxt(name: str, size: int, channels: int, grid: int, max_batch_size: int, kind: str) -> str:
    return f"""# SAM image encoder exported to ONNX by `python -m atelier.models export-sam-onnx`.
# Same interface as deploy/triton-repository/sam_image_encoder (Python backend): the segmentation
# service's Triton backend sends SamProcessor's pixel_values and reads image_embeddings.
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "pixel_values"
    data_type: TYPE_FP32
    dims: [ 3, {size}, {size} ]
  }}
]
output [
  {{
    name: "image_embeddings"
    data_type: TYPE_FP32
    dims: [ {channels}, {grid}, {grid} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{
    count: 1
    kind: {kind}
  }}
]
"""


def export_sam_image_encoder(sam_folder: str, repository: str, model_name: str = MODEL_NAME,
                             max_batch_size: int = 8, instance_kind: str = "KIND_GPU", opset: int = 17) -> Path:
    """Write ``repository/model_name/{config.pbtxt,1/model.onnx}``; returns the model folder."""
    import torch
    from transformers import SamModel

    model = SamModel.from_pretrained(sam_folder, local_files_only=True).to(torch.float32).eval()
    model.requires_grad_(False)
    size = int(model.config.vision_config.image_size)
    channels = int(model.config.vision_config.output_channels)
    grid = int(model.config.prompt_encoder_config.image_embedding_size)
    folder = Path(repository) / model_name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    partial = folder / "1" / ".model.onnx.partial"
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        torch.onnx.export(
            _encoder_module(model), (example,), str(partial), input_names=["pixel_values"],
            output_names=["image_embeddings"], opset_version=opset, dynamo=False,
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeddings": {0: "batch"}})
    os.replace(partial, folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(_config_pbtxt(model_name, size, channels, grid, max_batch_size, instance_kind))
    return folder


def check_export(sam_folder: str, model_folder: Path, batch: int = 2, tolerance: float = 1e-3,
                 seed: int = 0) -> float:
    """Run the ONNX graph (onnxruntime, CPU) and the torch encoder on one random batch; return the
    max abs difference relative to the embeddings' max magnitude; ExportError beyond tolerance."""
    import onnxruntime
    import torch
    from transformers import SamModel

    model = SamModel.from_pretrained(sam_folder, local_files_only=True).to(torch.float32).eval()
    size = int(model.config.vision_config.image_size)
    pixels = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = model.get_image_embeddings(torch.from_numpy(pixels)).numpy()
    session = onnxruntime.InferenceSession(str(model_folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["image_embeddings"], {"pixel_values": pixels})
    if got.shape != expected.shape:
        raise ExportError(f"ONNX embeddings {got.shape} != torch {expected.shape}")
    error = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-12))
    if error > tolerance:
        raise ExportError(f"ONNX and torch encoders differ by {error:.2e} (relative), above {tolerance:.0e}")
    return error


def main_export(sam: str, repository: str, check: Optional[bool], tolerance: float, instance_kind: str) -> int:
    folder = export_sam_image_encoder(sam, repository, instance_kind=instance_kind)
    print(f"[models] wrote {folder}/config.pbtxt and {folder}/1/model.onnx", flush=True)
    if check is None:
        try:
            import onnxruntime  # noqa: F401
            check = True
        except ImportError:
            print("[models] onnxruntime not installed: export not checked (pip install onnxruntime)", flush=True)
            check = False
    if check:
        error = check_export(sam, folder, tolerance=tolerance)
        print(f"[models] ONNX vs torch image encoder: max relative difference {error:.2e}", flush=True)
    return 0
