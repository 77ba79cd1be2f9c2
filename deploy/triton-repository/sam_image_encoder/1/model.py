"""Triton Python-backend model: the SAM image encoder (transformers SamModel).

Runs inside Triton's Python backend stub, in the Triton venv (numpy<2, torch, transformers);
it must not import atelier. The SamModel folder comes from the ``sam_path`` model-config
parameter, else the ATELIER_TRITON_SAM_PATH environment variable. The device is
ATELIER_TRITON_DEVICE, else CUDA when present, else CPU.
"""
import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = config.get("parameters", {}).get("sam_path", {}).get("string_value") or os.environ.get(
            "ATELIER_TRITON_SAM_PATH", ""
        )
        if not path or not os.path.isdir(path):
            raise pb_utils.TritonModelException(
                f"sam_image_encoder: no SamModel folder (parameter sam_path / env ATELIER_TRITON_SAM_PATH is {path!r})"
            )
        from transformers import SamModel

        device = os.environ.get("ATELIER_TRITON_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.device = torch.device(device)
        self.model = SamModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)

    def execute(self, requests):
        # The dynamic batcher hands over several requests: run each group of equally shaped
        # inputs as one encoder batch, then split the embeddings back per request.
        arrays = [pb_utils.get_input_tensor_by_name(r, "pixel_values").as_numpy() for r in requests]
        outputs = [None] * len(requests)
        groups = {}
        for index, array in enumerate(arrays):
            groups.setdefault(array.shape[1:], []).append(index)
        for indices in groups.values():
            batch = torch.from_numpy(np.concatenate([arrays[i] for i in indices])).to(self.device)
            with torch.no_grad():
                embeddings = self.model.get_image_embeddings(batch).float().cpu().numpy()
            offset = 0
            for i in indices:
                count = arrays[i].shape[0]
                outputs[i] = embeddings[offset:offset + count]
                offset += count
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image_embeddings", np.ascontiguousarray(out))])
            for out in outputs
        ]

    def finalize(self):
        self.model = None
