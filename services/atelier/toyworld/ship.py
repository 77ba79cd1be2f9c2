"""Copy the trained models from the work folder into services/atelier/embedded/, each folder
in one rename, so the registry never sees a half-written model.

    python -m atelier.toyworld.ship
"""
from __future__ import annotations

import json
import shutil
import sys

from .train_common import EMBEDDED, WORK_DIR

SHIPPED = ("toy", "toy-sam", "toy-evaluator")
# Weight files stored in fp16 to keep the repository small (the UNet is 25 MiB in fp32).
# diffusers upcasts them to the requested dtype (fp32 on CPU) on load; the rounding is
# below 5e-4 absolute on weights of magnitude ~1.
HALF_PRECISION = {"toy": ("unet/diffusion_pytorch_model.safetensors",)}
# Serving settings read by the registry (atelier.json beside the model's configs). The toy
# over-saturates at SD's guidance 7.5 under negative-prompt-inversion editing; 2.5 is what the
# demo measured to work (docs/BENCHMARKS.md: background change 0.048-0.054 vs 0.15-0.17 at 7.5).
SERVING_SETTINGS = {"toy": {"default_guidance_scale": 2.5}}


def _store_half(path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, path,
              metadata={"format": "pt"})


def _drop_local_paths(folder) -> None:
    """Loaders record where a model was read from (``_name_or_path``): a path on the training
    machine that means nothing in the repository."""
    for config in folder.rglob("config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def ship(names=SHIPPED) -> None:
    EMBEDDED.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = WORK_DIR / name, EMBEDDED / name
        if not src.exists():
            sys.exit(f"missing {src}: train it first")
        tmp = EMBEDDED / f".{name}.incoming"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        _drop_local_paths(tmp)
        for relative in HALF_PRECISION.get(name, ()):
            _store_half(tmp / relative)
        if name in SERVING_SETTINGS:
            (tmp / "atelier.json").write_text(json.dumps(SERVING_SETTINGS[name], indent=2) + "\n")
        old = EMBEDDED / f".{name}.old"
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
        print(f"shipped {dst}")


if __name__ == "__main__":
    ship(sys.argv[1:] or SHIPPED)
