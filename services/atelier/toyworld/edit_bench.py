"""A fixed set of toy-world edits with ground truth, and the metrics of SPDInv's Table 1 on it.

Each edit is a (source scene, target scene) pair drawn from one seed: the target spec changes
one thing -- an object's colour, its shape, the background colour, an object added, or one of
two removed -- so the edit region is known exactly: the union of the objects' masks that
change (or, for a background edit, the background), dilated by 2 px (anti-aliased edges).

Metrics (PIE-Bench's, as SPDInv's Table 1 reports them, with toy-world stand-ins where the
paper uses a pretrained network):
- background preservation outside the edit region: PSNR, MSE and SSIM against the source image;
- structure distance: the MSE between the self-similarity (cosine) matrices of the source's and
  the edit's 16x16 features of the world evaluator's trunk (PIE-Bench uses DINO-ViT keys);
- edit success: the evaluator reads the target scene's attributes (every object's colour and
  shape, the object count, the background colour) off the edited image;
- alignment (the CLIP-score stand-in): the evaluator's mean probability of the target's attributes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .evaluator import WorldEvaluator, read_images

KINDS = ("colour", "shape", "background", "add", "remove")



@dataclass
class Edit:
    kind: str
    source_id: int  # edits of one source scene share its inversion
    source: world.Scene
    target: world.Scene
    edit_mask: np.ndarray  # (64, 64) bool, True where the edit may change pixels

    @property
    def source_prompt(self) -> str:
        return self.source.caption

    @property
    def target_prompt(self) -> str:
        return self.target.caption

    def source_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.source.image).permute(2, 0, 1)[None].float() / 127.5 - 1


def _dilate(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(tensor, 2 * radius + 1, 1, radius)[0, 0].numpy() > 0


def edit_set(one_object_sources: int = 8, add_edits: int = 4, remove_edits: int = 4, seed: int = 2024) -> list[Edit]:
    """The fixed edit set. Each one-object source scene gets a colour, a shape and a background
    edit, the first ``add_edits`` of them also an added object; ``remove_edits`` two-object
    scenes lose their second object. Default: 8 * 3 + 4 + 4 = 32 edits of 12 source scenes."""
    rng = np.random.default_rng(seed)
    edits: list[Edit] = []
    for index in range(one_object_sources):
        spec = world.sample_spec(rng, num_objects=1, background_kind="solid")
        kinds = ("colour", "shape", "background") + (("add",) if index < add_edits else ())
        edits += [_edit(kind, index, spec, rng) for kind in kinds]
    for index in range(remove_edits):
        spec = world.sample_spec(rng, num_objects=2, background_kind="solid")
        edits.append(_edit("remove", one_object_sources + index, spec, rng))
    return edits


def _edit(kind: str, source_id: int, spec: world.SceneSpec, rng: np.random.Generator) -> Edit:
    obj = spec.objects[0]
    if kind == "colour":
        allowed = [c for c in world.COLOUR_NAMES if c not in (obj.colour, spec.background_colour)]
        target = replace(spec, objects=(replace(obj, colour=str(rng.choice(allowed))),))
    elif kind == "shape":
        shape = str(rng.choice([s for s in world.SHAPES if s != obj.shape]))
        target = replace(spec, objects=(replace(obj, shape=shape, angle=0.0),))
    elif kind == "background":
        allowed = [c for c in world.BACKGROUND_COLOUR_NAMES if c not in (spec.background_colour, obj.colour)]
        target = replace(spec, background_colour=str(rng.choice(allowed)))
    elif kind == "add":
        target = _with_second_object(spec, rng)
    else:  # remove the second object
        target = replace(spec, objects=spec.objects[:1])
    source, target_scene = world.render(spec), world.render(target)
    if kind == "background":
        region = _dilate(~np.any(np.stack(source.masks), axis=0))  # the background and the objects' 2 px rim
    elif kind == "add":
        region = _dilate(target_scene.masks[1])
    elif kind == "remove":
        region = _dilate(source.masks[1])
    else:
        region = _dilate(source.masks[0] | target_scene.masks[0])
    return Edit(kind, source_id, source, target_scene, region)


def _with_second_object(spec: world.SceneSpec, rng: np.random.Generator) -> world.SceneSpec:
    """``spec`` plus a second object that does not overlap the first (nor share the background's colour name)."""
    first = spec.objects[0]
    while True:
        radius = float(rng.uniform(8.0, 12.0))
        cx, cy = (float(v) for v in rng.uniform(radius + 2, world.SIZE - radius - 2, size=2))
        if np.hypot(cx - first.cx, cy - first.cy) > radius + first.radius + 2:
            colour = str(rng.choice([c for c in world.COLOUR_NAMES if c != spec.background_colour]))
            second = replace(first, shape=str(rng.choice(world.SHAPES)), colour=colour, cx=cx, cy=cy,
                             radius=radius, angle=0.0)
            return replace(spec, objects=(first, second))


# ---------------------------------------------------------------- metrics

def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of (1,3,H,W) images in [0, 1],
    averaged over channels: (H, W)."""
    window = _gaussian_window().to(a).expand(3, 1, -1, -1)
    blur = lambda x: F.conv2d(F.pad(x, (5, 5, 5, 5), mode="reflect"), window, groups=3)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.mean(1)[0]


def background_metrics(edited: torch.Tensor, source: torch.Tensor, edit_mask: np.ndarray) -> dict[str, float]:
    """PSNR, MSE and SSIM outside the edit region; images (1,3,H,W) in [0, 1]."""
    keep = torch.from_numpy(~edit_mask)
    diff = ((edited - source) ** 2).mean(1)[0]
    mse = float(diff[keep].mean())
    return {"psnr": 10 * float(np.log10(1.0 / max(mse, 1e-12))), "mse": mse,
            "ssim": float(ssim_map(edited, source)[keep].mean())}


@torch.no_grad()
def structure_distance(evaluator: WorldEvaluator, edited: torch.Tensor, source: torch.Tensor) -> float:
    """MSE of the cosine self-similarity of the evaluator's 16x16 trunk features (images in [0, 1])."""
    def self_similarity(image: torch.Tensor) -> torch.Tensor:
        features = evaluator.trunk[:2](image * 2 - 1).flatten(2)[0]  # (C, 256)
        features = F.normalize(features, dim=0)
        return features.T @ features
    return float(F.mse_loss(self_similarity(edited), self_similarity(source)))


@torch.no_grad()
def edit_success(evaluator: WorldEvaluator, edited: torch.Tensor, target: world.Scene) -> tuple[bool, float]:
    """(the evaluator reads every target attribute, its mean probability of them); image in [0, 1]."""
    image = edited * 2 - 1
    reading = read_images(evaluator, image)[0]
    spec = target.spec
    shapes = sorted({o.shape for o in spec.objects})
    colours = sorted({o.colour for o in spec.objects})
    success = (sorted(set(reading.shapes)) == shapes and sorted(set(reading.colours)) == colours
               and reading.count == len(spec.objects) and reading.background_colour == spec.background_colour)
    out = evaluator(image)
    probabilities = [torch.sigmoid(out["shape"][0, world.SHAPES.index(s)]) for s in shapes]
    probabilities += [torch.sigmoid(out["colour"][0, world.COLOUR_NAMES.index(c)]) for c in colours]
    probabilities.append(out["count"][0].softmax(0)[len(spec.objects) - 1])
    probabilities.append(out["background_colour"][0].softmax(0)[
        world.BACKGROUND_COLOUR_NAMES.index(spec.background_colour)])
    return bool(success), float(torch.stack(probabilities).mean())
