"""A small CNN that reads world attributes back out of any 64x64 image.

Heads: shape and colour (multi-label: which shapes / colours are present), object count
(1 or 2), background kind, background colour, and a concept-identity embedding (unit
vector; cosine similarity to learned concept prototypes, with a "none" prototype).
Trained on clean, blurred and VAE round-tripped scenes so it judges generated images fairly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import world

CONCEPT_CLASSES = world.CONCEPT_NAMES + ("none",)
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "embedded" / "toy-evaluator"


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.SiLU())


class WorldEvaluator(nn.Module):
    def __init__(self, width: int = 32, embedding_dim: int = 64):
        super().__init__()
        self.config = {"width": width, "embedding_dim": embedding_dim}
        w = width
        self.trunk = nn.Sequential(_block(3, w, 2), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2),
                                   _block(4 * w, 4 * w, 2))
        f = 8 * w  # average and max pooled: max keeps each object's evidence apart
        self.shape = nn.Linear(f, len(world.SHAPES))
        self.colour = nn.Linear(f, len(world.COLOURS))
        self.count = nn.Linear(f, 2)
        self.background_kind = nn.Linear(f, len(world.BACKGROUND_KINDS))
        self.background_colour = nn.Linear(f, len(world.BACKGROUND_COLOURS))
        self.embedding = nn.Sequential(nn.Linear(f, f), nn.SiLU(), nn.Linear(f, embedding_dim))
        self.prototypes = nn.Parameter(torch.randn(len(CONCEPT_CLASSES), embedding_dim))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B,3,64,64) in [-1,1]. Returns logits per head and the unit embedding."""
        t = self.trunk(x)
        h = torch.cat([t.mean((2, 3)), t.amax((2, 3))], 1)
        emb = F.normalize(self.embedding(h), dim=-1)
        concept = 16.0 * emb @ F.normalize(self.prototypes, dim=-1).T
        return {"shape": self.shape(h), "colour": self.colour(h), "count": self.count(h),
                "background_kind": self.background_kind(h),
                "background_colour": self.background_colour(h), "concept": concept, "embedding": emb}

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "model.safetensors")
        meta = {**self.config, "shapes": world.SHAPES, "colours": world.COLOUR_NAMES,
                "background_kinds": world.BACKGROUND_KINDS,
                "background_colours": world.BACKGROUND_COLOUR_NAMES, "concepts": CONCEPT_CLASSES}
        (path / "config.json").write_text(json.dumps(meta, indent=2))


def load_evaluator(path: str | Path = DEFAULT_PATH) -> WorldEvaluator:
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    model = WorldEvaluator(meta["width"], meta["embedding_dim"])
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model.eval()


@dataclass
class Reading:
    shapes: list[str]  # most likely first; one per counted object
    colours: list[str]
    count: int
    background_kind: str
    background_colour: str
    concept: str  # a concept name or "none"
    embedding: torch.Tensor


def predicted_sets(out: dict[str, torch.Tensor], head: str) -> torch.Tensor:
    """Multi-hot prediction for ``shape``/``colour``: the top class, plus the runner-up when
    the count head says two objects and its logit is positive (two objects may share one)."""
    logits = out[head]
    top2 = logits.topk(2, dim=1)
    pred = torch.zeros_like(logits, dtype=torch.bool)
    pred[torch.arange(len(logits)), top2.indices[:, 0]] = True
    second = (out["count"].argmax(1) == 1) & (top2.values[:, 1] > 0)
    pred[torch.arange(len(logits))[second], top2.indices[second, 1]] = True
    return pred


@torch.no_grad()
def read_images(model: WorldEvaluator, images: torch.Tensor) -> list[Reading]:
    """images: (B,3,64,64) in [-1,1]."""
    out = model(images)
    shapes, colours = predicted_sets(out, "shape"), predicted_sets(out, "colour")
    readings = []
    for i in range(images.shape[0]):
        readings.append(Reading(
            shapes=[world.SHAPES[j] for j in shapes[i].nonzero()[:, 0].tolist()],
            colours=[world.COLOUR_NAMES[j] for j in colours[i].nonzero()[:, 0].tolist()],
            count=int(out["count"][i].argmax()) + 1,
            background_kind=world.BACKGROUND_KINDS[int(out["background_kind"][i].argmax())],
            background_colour=world.BACKGROUND_COLOUR_NAMES[int(out["background_colour"][i].argmax())],
            concept=CONCEPT_CLASSES[int(out["concept"][i].argmax())], embedding=out["embedding"][i]))
    return readings


def head_accuracy(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracy as read: shape/colour sets and count on ordinary scenes, the rest on all."""
    ordinary = y["ordinary"].bool()
    acc = {h: (predicted_sets(out, h)[ordinary] == y[h][ordinary].bool()).all(1).float().mean().item()
           for h in ("shape", "colour")}
    acc["count"] = (out["count"][ordinary].argmax(1) == y["count"][ordinary]).float().mean().item()
    for h in ("background_kind", "background_colour", "concept"):
        acc[h] = (out[h].argmax(1) == y[h]).float().mean().item()
    return acc


def labels_for(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Training targets; ``ordinary`` marks scenes whose objects are all ordinary."""
    n = len(scenes)
    shape = torch.zeros(n, len(world.SHAPES))
    colour = torch.zeros(n, len(world.COLOURS))
    count, kind, bg, concept, ordinary = (torch.zeros(n, dtype=torch.long) for _ in range(5))
    for i, s in enumerate(scenes):
        concepts = [o.concept for o in s.spec.objects if o.concept]
        for o in s.spec.objects:
            if not o.concept:
                shape[i, world.SHAPES.index(o.shape)] = 1
                colour[i, world.COLOUR_NAMES.index(o.colour)] = 1
        count[i] = len(s.spec.objects) - 1
        kind[i] = world.BACKGROUND_KINDS.index(s.spec.background_kind)
        bg[i] = world.BACKGROUND_COLOUR_NAMES.index(s.spec.background_colour)
        concept[i] = CONCEPT_CLASSES.index(concepts[0] if concepts else "none")
        ordinary[i] = int(not concepts)
    return {"shape": shape, "colour": colour, "count": count, "background_kind": kind,
            "background_colour": bg, "concept": concept, "ordinary": ordinary}
