"""What a model folder holds, read from its configs without loading weights.

The registry validates every entry at start-up with ``inspect_folder``: the kind (a Stable
Diffusion pipeline folder or a transformers SAM folder), that weights exist for the configured
variant (e.g. ``fp16``: ``diffusion_pytorch_model.fp16.safetensors``), what the service needs
to know before it runs anything (the VAE's downsampling factor, latent channels) and the
folder's own serving settings (``atelier.json``, e.g. ``{"default_guidance_scale": 2.5}``).

Messages of ``BadModelFolder`` reach clients (as FAILED_PRECONDITION): they never name paths.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["SD", "SAM", "KIND_NAMES", "SETTINGS_FILE", "BadModelFolder", "FolderFacts", "inspect_folder"]

SD = "stable-diffusion"
SAM = "sam"
KIND_NAMES = {SD: "Stable Diffusion", SAM: "SAM"}
SETTINGS_FILE = "atelier.json"

# Pipelines whose folders StableDiffusionPipeline loads as they are (SD 1.x/2.x layout).
_SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# The DDIM inversion/editing math (core.diffusion, SPDInv's fixed point) is written for
# epsilon prediction; a v- or sample-predicting model would give wrong results silently.
_SUPPORTED_PREDICTION = "epsilon"


class BadModelFolder(ValueError):
    """The folder cannot be served; the message is safe to show a client."""


@dataclass(frozen=True)
class FolderFacts:
    kind: str
    weight_bytes: int  # on disk, for the configured variant: the loader's memory estimate
    vae_scale_factor: Optional[int] = None  # SD: 2 ** (len(vae.block_out_channels) - 1)
    latent_channels: Optional[int] = None  # SD: the UNet's input channels
    default_guidance_scale: Optional[float] = None  # from atelier.json; None: the service's default


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadModelFolder(f"{what} is missing") from None
    except (OSError, ValueError) as error:
        raise BadModelFolder(f"{what} is not readable JSON ({type(error).__name__})") from None
    if not isinstance(data, dict):
        raise BadModelFolder(f"{what} is not a JSON object")
    return data


def _variant_of(filename: str) -> Optional[str]:
    """``diffusion_pytorch_model.fp16.safetensors`` -> "fp16"; sharded
    ``model.fp16-00001-of-00002.safetensors`` -> "fp16"; no variant -> None."""
    stem = filename
    for suffix in _WEIGHT_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    _, dot, rest = stem.partition(".")
    return rest.split("-")[0] if dot and rest else None


def _weights(folder: Path, variant: Optional[str], what: str) -> int:
    """Bytes of the weight files for ``variant`` in ``folder``; BadModelFolder when none."""
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)] \
        if folder.is_dir() else []
    chosen = [p for p in files if _variant_of(p.name) == variant]
    if not chosen:
        found = sorted({_variant_of(p.name) or "default" for p in files})
        wanted = f"variant {variant!r}" if variant else "the default variant (no variant suffix)"
        hint = f"; found: {', '.join(found)}" if found else "; found no weight files"
        if variant is None and found:
            hint += f" - set the variant (--model-variant or 'variant' in the models file), e.g. {found[0]!r}"
        raise BadModelFolder(f"{what} has no weights for {wanted}{hint}")
    return sum(p.stat().st_size for p in chosen)


def _settings(folder: Path) -> Optional[float]:
    path = folder / SETTINGS_FILE
    if not path.exists():
        return None
    settings = _read_json(path, SETTINGS_FILE)
    unknown = sorted(set(settings) - {"default_guidance_scale"})
    if unknown:
        raise BadModelFolder(f"{SETTINGS_FILE}: unknown settings {unknown}")
    value = settings.get("default_guidance_scale")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 50:
        raise BadModelFolder(f"{SETTINGS_FILE}: default_guidance_scale must be a number in [0, 50]")
    return float(value)


def _inspect_sd(folder: Path, variant: Optional[str]) -> FolderFacts:
    index = _read_json(folder / "model_index.json", "model_index.json")
    pipeline = index.get("_class_name")
    if pipeline not in _SD_PIPELINES:
        raise BadModelFolder(f"pipeline {str(pipeline)[:60]!r} is not a Stable Diffusion 1.x/2.x pipeline "
                             f"(expected one of {', '.join(_SD_PIPELINES)})")
    missing = [c for c in _SD_COMPONENTS if not isinstance(index.get(c), list) or index[c][0] is None]
    if missing:
        raise BadModelFolder(f"model_index.json lacks the components {missing}")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json", "scheduler/scheduler_config.json")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction != _SUPPORTED_PREDICTION:
        raise BadModelFolder(f"{str(prediction)[:30]} not supported: scheduler prediction_type is "
                             f"{str(prediction)[:30]!r}; the inversion and editing math here needs 'epsilon'")
    vae = _read_json(folder / "vae" / "config.json", "vae/config.json")
    unet = _read_json(folder / "unet" / "config.json", "unet/config.json")
    blocks = vae.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        raise BadModelFolder("vae/config.json has no block_out_channels")
    weight_bytes = sum(_weights(folder / c, variant, c) for c in _WEIGHT_COMPONENTS)
    return FolderFacts(kind=SD, weight_bytes=weight_bytes, vae_scale_factor=2 ** (len(blocks) - 1),
                       latent_channels=int(unet.get("in_channels", 4)),
                       default_guidance_scale=_settings(folder))


def _inspect_sam(folder: Path, variant: Optional[str]) -> FolderFacts:
    if not any((folder / name).exists() for name in ("processor_config.json", "preprocessor_config.json")):
        raise BadModelFolder("the SAM folder has no processor_config.json / preprocessor_config.json")
    return FolderFacts(kind=SAM, weight_bytes=_weights(folder, variant, "the SAM folder"),
                       default_guidance_scale=_settings(folder))


def inspect_folder(folder: Path, variant: Optional[str] = None, declared_kind: Optional[str] = None) -> FolderFacts:
    """The facts of a model folder; BadModelFolder when it cannot be served (as declared)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadModelFolder("the model folder does not exist")
    if (folder / "model_index.json").exists():
        kind = SD
    elif (folder / "config.json").exists() and _read_json(folder / "config.json", "config.json") \
            .get("model_type") == "sam":
        kind = SAM
    else:
        raise BadModelFolder("neither a Stable Diffusion folder (model_index.json) nor a SAM folder "
                             "(config.json with model_type 'sam')")
    if declared_kind is not None and declared_kind != kind:
        raise BadModelFolder(f"declared {KIND_NAMES.get(declared_kind, declared_kind)} but the folder holds "
                             f"a {KIND_NAMES[kind]} model")
    return _inspect_sd(folder, variant) if kind == SD else _inspect_sam(folder, variant)
