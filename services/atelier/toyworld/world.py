"""A seeded "shapes world": 64x64 RGB scenes with captions and per-object masks.

Scenes hold one or two shaded objects (circle, square, triangle in six colours) on a
background (solid, vertical gradient, diagonal stripes or dots in six pale colours).
Concept objects are fixed distinctive appearances (two-tone, patterned) that ordinary
scenes never contain: the world's analogue of DreamBooth subjects.
Everything is rendered from signed distance fields with anti-aliased edges.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (0.86, 0.13, 0.13),
    "green": (0.13, 0.62, 0.20),
    "blue": (0.14, 0.30, 0.86),
    "yellow": (0.95, 0.82, 0.10),
    "purple": (0.55, 0.18, 0.70),
    "orange": (0.96, 0.50, 0.08),
}
BACKGROUND_COLOURS = {
    "white": (0.95, 0.95, 0.93),
    "gray": (0.62, 0.62, 0.64),
    "yellow": (0.98, 0.93, 0.62),
    "green": (0.66, 0.86, 0.66),
    "blue": (0.66, 0.76, 0.96),
    "pink": (0.97, 0.72, 0.82),
}
BACKGROUND_KINDS = ("solid", "gradient", "striped", "dotted")
# 16 px = two latent cells of an f8 VAE. A period of 8 px (or a divisor of it) gives the
# same latent in every cell, and a decoder made of convolutions and nearest upsampling is
# translation-equivariant: from a constant latent it can only draw a constant colour, so such
# textures are erased by any f8 VAE of this kind (measured: stripes 20 dB, drawn flat).
TEXTURE_PERIOD = 16.0
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_COLOUR_NAMES = tuple(BACKGROUND_COLOURS)


@dataclass(frozen=True)
class Concept:
    """A fixed appearance: base shape plus a two-tone pattern (never in base scenes)."""
    name: str
    shape: str  # circle | square | triangle | ring
    colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    pattern: str  # checker | bands | split | ring
    noun: str  # the class word used in captions


CONCEPTS = {
    c.name: c
    for c in (
        Concept("checker_box", "square", ((0.80, 0.10, 0.10), (0.97, 0.97, 0.97)), "checker", "box"),
        Concept("striped_ball", "circle", ((0.12, 0.22, 0.75), (0.98, 0.85, 0.15)), "bands", "ball"),
        Concept("split_pyramid", "triangle", ((0.10, 0.60, 0.50), (0.60, 0.15, 0.60)), "split", "pyramid"),
        Concept("donut", "ring", ((0.92, 0.55, 0.15), (0.45, 0.25, 0.10)), "ring", "donut"),
    )
}
CONCEPT_NAMES = tuple(CONCEPTS)


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str  # a COLOURS name, or "concept:<name>"
    cx: float
    cy: float
    radius: float
    angle: float = 0.0  # radians
    light: tuple[float, float] = (-0.35, -0.35)  # highlight offset, in radii

    @property
    def concept(self) -> str | None:
        return self.colour.split(":", 1)[1] if self.colour.startswith("concept:") else None


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[ObjectSpec, ...]
    background_kind: str
    background_colour: str
    # Texture offset in pixels. Scenes keep (0, 0): a texture is a fixed pattern on the latent
    # grid (see TEXTURE_PERIOD); no caption names an offset.
    phase: tuple[float, float] = (0.0, 0.0)

    @property
    def caption(self) -> str:
        return caption_for(self)


@dataclass
class Scene:
    spec: SceneSpec
    image: np.ndarray  # (SIZE, SIZE, 3) uint8
    masks: list[np.ndarray] = field(default_factory=list)  # visible pixels, bool (SIZE, SIZE)

    @property
    def caption(self) -> str:
        return self.spec.caption


def _grid() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    return xs, ys


_XS, _YS = _grid()


def _local(obj: ObjectSpec) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in the object's frame (rotated by -angle)."""
    dx, dy = _XS - obj.cx, _YS - obj.cy
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    return c * dx + s * dy, -s * dx + c * dy


def signed_distance(obj: ObjectSpec) -> np.ndarray:
    """Approximate signed distance in pixels (negative inside)."""
    u, v = _local(obj)
    r = obj.radius
    if obj.shape == "circle":
        return np.hypot(u, v) - r
    if obj.shape == "ring":
        return np.abs(np.hypot(u, v) - 0.7 * r) - 0.3 * r
    if obj.shape == "square":
        h = 0.82 * r  # similar area to the circle
        return np.maximum(np.abs(u), np.abs(v)) - h
    if obj.shape == "triangle":  # equilateral, apex up, centroid at the centre
        k = np.sqrt(3.0) / 2.0
        d1 = v - 0.5 * r * 1.25
        d2 = -k * u - 0.5 * v - 0.5 * r * 1.25
        d3 = k * u - 0.5 * v - 0.5 * r * 1.25
        return np.maximum(np.maximum(d1, d2), d3)
    raise ValueError(f"unknown shape {obj.shape!r}")


def coverage(obj: ObjectSpec) -> np.ndarray:
    return np.clip(0.5 - signed_distance(obj), 0.0, 1.0)


def _shading(obj: ObjectSpec) -> np.ndarray:
    u, v = _local(obj)
    lx, ly = obj.light
    d2 = (u - lx * obj.radius) ** 2 + (v - ly * obj.radius) ** 2
    return 0.62 + 0.55 * np.exp(-d2 / (2 * (0.7 * obj.radius) ** 2))


def _albedo(obj: ObjectSpec) -> np.ndarray:
    name = obj.concept
    if name is None:
        return np.broadcast_to(np.array(COLOURS[obj.colour], np.float32), (SIZE, SIZE, 3))
    concept = CONCEPTS[name]
    u, v = _local(obj)
    r = obj.radius
    if concept.pattern == "checker":
        first = (np.floor(u / (0.41 * r)) + np.floor(v / (0.41 * r))) % 2 == 0
    elif concept.pattern == "bands":
        first = np.floor(v / (0.4 * r)) % 2 == 0
    elif concept.pattern == "split":
        first = u < 0
    else:  # ring: inner and outer halves of the band
        first = np.hypot(u, v) > 0.7 * r
    a, b = (np.array(c, np.float32) for c in concept.colours)
    return np.where(first[..., None], a, b)


def _background(spec: SceneSpec) -> np.ndarray:
    base = np.array(BACKGROUND_COLOURS[spec.background_colour], np.float32)
    dark = base * 0.72
    img = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    px, py = spec.phase
    if spec.background_kind == "gradient":
        t = (_YS / SIZE)[..., None]
        img = base * (1 - t) + dark * 0.85 * t
    elif spec.background_kind == "striped":
        w = (_XS + _YS + px) % TEXTURE_PERIOD
        on = np.clip(np.minimum(w - 0.5, TEXTURE_PERIOD / 2 + 0.5 - w), 0, 1)[..., None]
        img = base * (1 - on) + dark * on
    elif spec.background_kind == "dotted":
        dx = (_XS + px) % TEXTURE_PERIOD - TEXTURE_PERIOD / 2
        dy = (_YS + py) % TEXTURE_PERIOD - TEXTURE_PERIOD / 2
        on = np.clip(TEXTURE_PERIOD / 4 + 0.5 - np.hypot(dx, dy), 0, 1)[..., None]
        img = base * (1 - on) + dark * on
    return img


def render(spec: SceneSpec, flat: bool = False) -> Scene:
    """Render a scene; ``flat=True`` paints objects in flat albedo (a scribble)."""
    img = _background(spec)
    covers = []
    for obj in spec.objects:
        a = coverage(obj)[..., None]
        colour = _albedo(obj) if flat else np.clip(_albedo(obj) * _shading(obj)[..., None], 0, 1)
        img = img * (1 - a) + colour * a
        covers.append(a[..., 0])
    masks = []
    for i, a in enumerate(covers):  # later objects occlude earlier ones
        visible = a.copy()
        for b in covers[i + 1:]:
            visible = visible * (1 - b)
        masks.append(visible >= 0.5)
    image = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    return Scene(spec=spec, image=image, masks=masks)


def caption_for(spec: SceneSpec) -> str:
    parts = []
    for obj in spec.objects:
        name = obj.concept
        parts.append(f"a {CONCEPTS[name].noun}" if name else f"a {obj.colour} {obj.shape}")
    bg = spec.background_colour
    kind = spec.background_kind
    where = {
        "solid": f"on a {bg} background",
        "gradient": f"on a {bg} gradient background",
        "striped": f"on a striped {bg} background",
        "dotted": f"on a dotted {bg} background",
    }[kind]
    return " and ".join(parts) + " " + where


_OBJECT_RE = re.compile(r"a (\w+) (\w+)")
_BG_RE = re.compile(r"on a (?:(striped|dotted) )?(\w+)( gradient)? background$")


def parse_caption(caption: str) -> dict:
    """Inverse of caption_for for ordinary objects: {'objects': [(colour, shape)],
    'background_kind', 'background_colour'}. Raises ValueError when it does not parse."""
    head, sep, _ = caption.partition(" on a ")
    m = _BG_RE.search(caption)
    if not sep or m is None:
        raise ValueError(f"not a world caption: {caption!r}")
    objects = []
    for part in head.split(" and "):
        om = _OBJECT_RE.fullmatch(part.strip())
        if om is None or om.group(1) not in COLOURS or om.group(2) not in SHAPES:
            raise ValueError(f"not a world object: {part!r}")
        objects.append((om.group(1), om.group(2)))
    texture, colour, gradient = m.groups()
    if colour not in BACKGROUND_COLOURS:
        raise ValueError(f"unknown background colour {colour!r}")
    kind = texture or ("gradient" if gradient else "solid")
    return {"objects": objects, "background_kind": kind, "background_colour": colour}


def _place(rng: np.random.Generator, radii: list[float]) -> list[tuple[float, float]] | None:
    centres: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(30):
            m = r + 2
            cx, cy = rng.uniform(m, SIZE - m, size=2)
            if all(np.hypot(cx - x, cy - y) > r + q + 2 for (x, y), q in zip(centres, radii)):
                centres.append((float(cx), float(cy)))
                break
        else:
            return None
    return centres


def sample_spec(
    rng: np.random.Generator,
    num_objects: int | None = None,
    shapes: list[str] | None = None,
    colours: list[str] | None = None,
    background_kind: str | None = None,
    background_colour: str | None = None,
    concept: str | None = None,
) -> SceneSpec:
    """Draw a random scene. Given attributes are kept; ``concept`` makes the first object
    that concept (in a random pose) and any second object ordinary."""
    n = num_objects or (1 if rng.random() < 0.6 else 2)
    bg_colour = background_colour or str(rng.choice(BACKGROUND_COLOUR_NAMES))
    kind = background_kind or str(rng.choice(BACKGROUND_KINDS))
    while True:
        hi = 17.0 if n == 1 else 13.0
        radii = [float(rng.uniform(8.0, hi)) for _ in range(n)]
        centres = _place(rng, radii)
        if centres is not None:
            break
    objects = []
    for i, ((cx, cy), r) in enumerate(zip(centres, radii)):
        if i == 0 and concept is not None:
            shape, colour = CONCEPTS[concept].shape, f"concept:{concept}"
            angle = float(rng.uniform(-np.pi / 4, np.pi / 4))
        else:
            shape = shapes[i] if shapes and i < len(shapes) else str(rng.choice(SHAPES))
            allowed = [c for c in COLOUR_NAMES if c != bg_colour]
            colour = colours[i] if colours and i < len(colours) else str(rng.choice(allowed))
            angle = float(rng.uniform(-0.2, 0.2)) if shape != "circle" else 0.0
        light = (float(rng.uniform(-0.5, 0.1)), float(rng.uniform(-0.5, 0.1)))
        objects.append(ObjectSpec(shape, colour, cx, cy, r, angle, light))
    return SceneSpec(tuple(objects), kind, bg_colour)


def scene_from_seed(seed: int, **kwargs) -> Scene:
    return render(sample_spec(np.random.default_rng(seed), **kwargs))


def draw_concept(name: str, seed: int, with_distractor: bool = False, **kwargs) -> Scene:
    """The concept ``name`` in a random pose and scene, with its mask first."""
    if name not in CONCEPTS:
        raise KeyError(f"unknown concept {name!r}; known: {', '.join(CONCEPT_NAMES)}")
    rng = np.random.default_rng(seed)
    return render(sample_spec(rng, num_objects=2 if with_distractor else 1, concept=name, **kwargs))


def scribble_of(scene: Scene) -> np.ndarray:
    """The scene as a flat-colour painting (no shading) on a solid background."""
    spec = replace(scene.spec, background_kind="solid")
    return render(spec, flat=True).image


def batch(seed: int, n: int, concept_fraction: float = 0.0, **kwargs) -> list[Scene]:
    """``n`` scenes from one seed; a fraction of them show a random concept."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        if concept_fraction and rng.random() < concept_fraction:
            name = str(rng.choice(CONCEPT_NAMES))
            spec = sample_spec(rng, concept=name, **kwargs)
        else:
            spec = sample_spec(rng, **kwargs)
        scenes.append(render(spec))
    return scenes


def to_tensor_batch(scenes: list[Scene]):
    """(B,3,64,64) float tensor in [-1,1]."""
    import torch

    arr = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
