"""Model registry: names -> diffusers/transformers folders (or hub ids), and loaded SD models.

Sources: a local folder, a hub id (used only with ATELIER_ALLOW_DOWNLOADS=1; otherwise looked
up in the local HF cache only), or ``builtin:toy`` / ``builtin:toy-sam``, which resolve to the
trained folders shipped under services/atelier/embedded/ when present, else to tiny seeded
models built from configs and cached on disk (see tiny_models).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import tiny_models
from .device import pick_device
from .errors import NotFound, quoted

_LOG = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
DEFAULT_ENTRIES = {"toy": "builtin:toy", "toy-sam": "builtin:toy-sam"}


def downloads_allowed() -> bool:
    return os.environ.get("ATELIER_ALLOW_DOWNLOADS", "") == "1"


def parse_model_entries(text: str) -> dict[str, str]:
    """``"a=/p;b=/q"`` -> ``{"a": "/p", "b": "/q"}`` (the ATELIER_MODELS format)."""
    entries = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ValueError(f"bad model entry {item!r}: expected NAME=SOURCE")
        entries[name.strip()] = source.strip()
    return entries


@dataclass
class SDModel:
    """A loaded Stable Diffusion v1.x model. Components are shared; schedulers are per call."""

    name: str
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    scheduler_config: dict = field(default_factory=dict)
    source: str = ""
    load_seconds: float = 0.0

    def new_scheduler(self):
        """A fresh DDIMScheduler: schedulers hold per-call state (timesteps), never share one."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) text embeddings, as StableDiffusionPipeline computes them (no attention mask)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        return self.text_encoder(ids, attention_mask=mask)[0].to(self.dtype)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> scaled latents (posterior mean, deterministic)."""
        posterior = self.vae.encode(image.to(self.device, self.dtype)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B,3,H,W) float32 in [0,1]."""
        image = self.vae.decode(latents.to(self.device, self.dtype) / self.vae.config.scaling_factor).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)


def load_sd_folder(source: str, name: str = "", device=None, dtype=None, local_files_only=True) -> SDModel:
    """Load an SD v1.x folder (or hub id) into an SDModel on (device, dtype)."""
    from diffusers import StableDiffusionPipeline

    if device is None or dtype is None:
        picked_device, picked_dtype = pick_device()
        device, dtype = device or picked_device, dtype or picked_dtype
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        source, dtype=dtype, safety_checker=None, requires_safety_checker=False,
        local_files_only=local_files_only)
    pipe.to(device)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)
    return SDModel(
        name=name or str(source), vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        unet=pipe.unet, device=torch.device(device), dtype=dtype, scheduler_config=dict(pipe.scheduler.config),
        source=str(source), load_seconds=time.perf_counter() - started)


class ModelRegistry:
    """Maps names to model sources; loads SD models once per name (thread-safe)."""

    def __init__(self, entries: dict[str, str] | None = None, device=None, dtype=None):
        self.entries = {**DEFAULT_ENTRIES, **(entries or {})}
        self.device, self.dtype = device, dtype
        self.load_seconds: dict[str, float] = {}
        self._loaded: dict[str, SDModel] = {}
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}

    @classmethod
    def from_config(cls, entries: dict[str, str] | None = None, models_file: str | None = None,
                    environ=None, **kwargs) -> "ModelRegistry":
        """Merge, later winning: ATELIER_MODELS env, a JSON file ``{name: source}``, explicit entries."""
        environ = os.environ if environ is None else environ
        merged = parse_model_entries(environ.get("ATELIER_MODELS", ""))
        if models_file:
            with open(models_file) as handle:
                loaded = json.load(handle)
            if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
                raise ValueError(f"{models_file}: expected a JSON object of name -> source")
            merged.update(loaded)
        merged.update(entries or {})
        return cls(merged, **kwargs)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def resolve(self, name: str) -> str:
        """A loadable source for ``name``: a local folder path, or a hub id. NotFound if unknown."""
        if name not in self.entries:
            # Only the caller's own (shortened) name: the model list and sources stay on the server.
            raise NotFound(f"model {quoted(name)} not found")
        source = self.entries[name]
        if source == "builtin:toy":
            shipped = EMBEDDED_DIR / "toy"
            return str(shipped if (shipped / "model_index.json").exists() else tiny_models.ensure_tiny_sd())
        if source == "builtin:toy-sam":
            shipped = EMBEDDED_DIR / "toy-sam"
            return str(shipped if (shipped / "config.json").exists() else tiny_models.ensure_tiny_sam())
        path = Path(source).expanduser()
        if path.exists():
            return str(path)
        if source.startswith(("/", ".", "~")) or source.count("/") != 1:
            _LOG.error("model %r: folder %r does not exist", name, source)
            raise NotFound(f"model {quoted(name)} is not available on this server")
        return source  # a hub id; loading honours ATELIER_ALLOW_DOWNLOADS

    def load_sd(self, name: str) -> SDModel:
        """The loaded SDModel for ``name`` (loaded once; concurrent callers wait for one load)."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            name_lock = self._name_locks.setdefault(name, threading.Lock())
        with name_lock:
            with self._lock:
                if name in self._loaded:
                    return self._loaded[name]
            started = time.perf_counter()
            source = self.resolve(name)
            is_local = Path(source).exists()
            try:
                model = load_sd_folder(source, name=name, device=self.device, dtype=self.dtype,
                                       local_files_only=is_local or not downloads_allowed())
            except OSError as error:
                if is_local:
                    raise
                _LOG.error("model %r: hub id %r is not in the local cache and downloads are disabled "
                           "(set ATELIER_ALLOW_DOWNLOADS=1)", name, source)
                raise NotFound(f"model {quoted(name)} is not available on this server") from error
            model.load_seconds = time.perf_counter() - started  # includes building the tiny fallback
            with self._lock:
                self._loaded[name] = model
                self.load_seconds[name] = model.load_seconds
            return model
