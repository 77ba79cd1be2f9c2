"""DCA's image path: IP-Adapter weights loaded with diffusers' `load_ip_adapter`.

A model folder with `ip_adapter/<name>.safetensors` (+ `ip_adapter/image_encoder/`) has an
adapter. `load_ip_adapter` installs IPAdapterAttnProcessor2_0 on every attn2 (and re-creates the
attn1 processors, METHODS.md section 3); we take its to_k_ip/to_v_ip modules, the image
projection, image encoder and feature extractor, then `unload_ip_adapter()` so the shared UNet
serves plain calls again. ISA/DCA processors are installed afterwards, per call, by
`controlled_attention` - after loading, as the porting trap requires.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

SUBFOLDER = "ip_adapter"


@dataclass
class LoadedAdapter:
    weight_name: str
    processor_class: str  # what load_ip_adapter installed on attn2 (IPAdapterAttnProcessor2_0)
    image_encoder: torch.nn.Module
    feature_extractor: object
    projection: torch.nn.Module  # diffusers ImageProjection: image_embeds (B, D) -> (B, 4, cross_dim)
    layers: dict  # attn2 module name -> (to_k_ip, to_v_ip)

    @torch.no_grad()
    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [0, 1] -> (1, 4, cross_dim) image prompt tokens."""
        pixels = self.feature_extractor(images=image.float().clamp(0, 1), do_rescale=False,
                                        return_tensors="pt").pixel_values
        parameter = next(self.image_encoder.parameters())
        embeds = self.image_encoder(pixel_values=pixels.to(parameter.device, parameter.dtype)).image_embeds
        return self.projection(embeds.to(next(self.projection.parameters()).dtype))


def find_adapter(source: str) -> Optional[Path]:
    folder = Path(source) / SUBFOLDER
    if not folder.is_dir():
        return None
    weights = sorted(folder.glob("*.safetensors"))
    return weights[0] if weights else None


_lock = threading.Lock()
_cache: dict[int, Optional[LoadedAdapter]] = {}


def adapter_for(model) -> Optional[LoadedAdapter]:
    """The model's IP-Adapter (loaded once per model), or None when its folder has none."""
    with _lock:
        key = id(model.unet)
        if key not in _cache:
            path = find_adapter(model.source)
            _cache[key] = None if path is None else load_adapter(model, path)
        return _cache[key]


def load_adapter(model, path: Path) -> LoadedAdapter:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.new_scheduler(), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    root = path.parent.parent
    pipe.load_ip_adapter(str(root), subfolder=SUBFOLDER, weight_name=path.name, local_files_only=True)
    layers, classes = {}, set()
    for name, processor in model.unet.attn_processors.items():
        if hasattr(processor, "to_k_ip"):
            layers[name.removesuffix(".processor")] = (processor.to_k_ip[0], processor.to_v_ip[0])
            classes.add(type(processor).__name__)
    projection = model.unet.encoder_hid_proj.image_projection_layers[0]
    adapter = LoadedAdapter(weight_name=path.name, processor_class=",".join(sorted(classes)),
                            image_encoder=pipe.image_encoder.eval().requires_grad_(False),
                            feature_extractor=pipe.feature_extractor, projection=projection.eval().requires_grad_(False),
                            layers=layers)
    for to_k, to_v in layers.values():
        to_k.requires_grad_(False)
        to_v.requires_grad_(False)
    pipe.unload_ip_adapter()
    return adapter
