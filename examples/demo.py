"""Atelier's whole tour through the SDK: invert -> edit (P2P, MasaCtrl), scribble -> image
(GradOP+ vs SDEdit), ISA-DCA variations, SAM segmentation, a short EqDiff job and a generation
with its concept, a short LayerDiffusion edit (a layer_edit job).

Writes PNGs and a labelled contact sheet (contact_sheet.png) to out/demo/ (or --out) and prints
each stage's wall time. Any failed stage ends the script with a non-zero status. Service
addresses come from the launcher (ATELIER_<SERVICE>_ADDRESS) or default to the local ports:

    python -m atelier.launcher -- python examples/demo.py      # what `make demo` runs
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

import atelier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contact_sheet import Row, contact_sheet  # noqa: E402

SOURCE_PROMPT = "a red circle on a blue background"
# The toy world's light blue background and red (examples/scene.png), so scribbles match its palette.
BLUE, RED = (168, 194, 245), (220, 30, 30)
DEFAULT_ADDRESSES = {"inversion": "127.0.0.1:50051", "segmentation": "127.0.0.1:50052",
                     "personalization": "127.0.0.1:50053", "synthesis": "127.0.0.1:50054"}
STAGES = ("invert", "edit", "scribble", "variations", "segment", "eqdiff_train", "eqdiff_generate", "layer_edit")
NEEDS = {"edit": "invert", "eqdiff_generate": "eqdiff_train"}  # stages that use an earlier one's result


class StageFailed(RuntimeError):
    pass


class Tour:
    """Runs the stages in order against one client, saving each output as a PNG in ``out`` and
    collecting the contact sheet's rows and each stage's wall time."""

    def __init__(self, client: atelier.Client, out: Path, steps: int, train_steps: int,
                 guidance_scale: Optional[float] = None, progress: bool = True):
        self.client, self.out, self.steps, self.train_steps = client, out, steps, train_steps
        self.guidance_scale, self.progress = guidance_scale, progress
        self.rows: list[Row] = []
        self.timings: dict[str, float] = {}
        self.inversions: dict[str, atelier.sdk.inversion.Inversion] = {}
        self.concept = None
        self.out.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            yield
        except Exception as error:
            raise StageFailed(f"stage {name!r} failed after {time.perf_counter() - start:.1f} s: "
                              f"{type(error).__name__}: {error}") from error
        self.timings[name] = time.perf_counter() - start
        print(f"[demo] {name}: {self.timings[name]:.1f} s", flush=True)

    def save(self, image: Image.Image, name: str) -> Image.Image:
        image.save(self.out / f"{name}.png")
        return image

    def run(self, stages=STAGES) -> None:
        for name in stages:
            with self.stage(name):
                getattr(self, name)()

    # ------------------------------------------------------------------ stages

    def invert(self) -> None:
        image = self.save(scene(), "source")
        for method in ("ddim", "spdinv"):
            inversion = self.client.inversion.invert(image, SOURCE_PROMPT, method=method,
                                                     num_inference_steps=self.steps, progress=self.progress)
            residual = float(np.mean([d.residual for d in inversion.diagnostics]))
            print(f"  {method}: z_T {inversion.z_T.shape}, mean fixed-point residual {residual:.3e}, "
                  f"UNet evaluations {inversion.usage.unet_forward_evaluations}"
                  f"+{inversion.usage.unet_backward_evaluations} backward, server wall {inversion.usage.wall_seconds:.1f} s")
            self.inversions[method] = inversion

    def edit(self) -> None:
        row = Row("Invert -> edit (inversion service)",
                  "DDIM and SPDInv inversions of the source; reconstruction, P2P red->green, MasaCtrl circle->square",
                  [("source", scene())])
        for method, inversion in self.inversions.items():
            for label, target, engine in (("reconstruction", SOURCE_PROMPT, "p2p"),
                                          ("P2P", "a green circle on a blue background", "p2p"),
                                          ("MasaCtrl", "a red square on a blue background", "masactrl")):
                edited = self.client.inversion.edit(inversion, target, engine=engine,
                                                    guidance_scale=self.guidance_scale, progress=self.progress)
                name = f"{method}_{label.lower()}"
                row.tiles.append((f"{method} {label}", self.save(edited.image, name)))
                print(f"  {method} {engine}: {target!r} -> {self.out / (name + '.png')}")
        self.rows.append(row)

    def scribble(self) -> None:
        sketch = self.save(scribble(), "scribble")
        row = Row("Scribble -> image (synthesis service)",
                  "the same scribble, prompt and seed: GradOP+ (latent optimised toward the strokes) vs SDEdit",
                  [("scribble", sketch)])
        for label, call in (("GradOP+", self.client.synthesis.gradop_result),
                            ("SDEdit", self.client.synthesis.sdedit_result)):
            result = call(sketch, SOURCE_PROMPT, strength=0.8, num_inference_steps=self.steps, seed=7,
                          progress=self.progress)
            name = label.lower().replace("+", "_plus")
            row.tiles.append((f"{label} stroke {result.stroke_loss:.3f}", self.save(result.image, name)))
            print(f"  {label}: stroke loss {result.stroke_loss:.4f}, UNet evaluations "
                  f"{result.usage.unet_forward_evaluations}")
        self.rows.append(row)

    def variations(self) -> None:
        result = self.client.synthesis.variations_result(scene(), SOURCE_PROMPT, n=3, lam=0.7,
                                                         num_inference_steps=self.steps, seed=2,
                                                         progress=self.progress)
        row = Row("Variations (synthesis service, ISA-DCA over a DDIM chain from the inversion service)",
                  "three variations of the source at lambda 0.7", [("source", scene())])
        for index, image in enumerate(result.images):
            row.tiles.append((f"variation {index + 1}", self.save(image, f"variation_{index + 1}")))
        print(f"  {len(result.images)} variations, inversion usage {result.inversion_usage.unet_forward_evaluations}"
              " UNet evaluations")
        self.rows.append(row)

    def segment(self) -> None:
        image = scene()
        result = self.client.segmentation.segment(image, points=[(32, 32)], labels=[1])
        mask = np.asarray(result.mask, dtype=bool)
        if not mask.any():
            raise RuntimeError("segmentation returned an empty mask for a click on the circle")
        mask_image = self.save(Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB"), "segmentation_mask")
        overlay = np.asarray(image).copy()
        overlay[mask] = (0.5 * overlay[mask] + 0.5 * np.array((255, 230, 0))).astype(np.uint8)
        overlay_image = self.save(Image.fromarray(overlay), "segmentation_overlay")
        print(f"  mask of {mask.sum()} pixels, score {result.score:.3f}")
        self.rows.append(Row("Segment (segmentation service, SAM)", "one click at the centre of the circle",
                             [("source", image), (f"mask (score {result.score:.2f})", mask_image),
                              ("overlay", overlay_image)]))

    def eqdiff_train(self) -> None:
        images = [checker_box(offset) for offset in (-4, 0, 4)]
        for index, image in enumerate(images):
            self.save(image, f"concept_input_{index + 1}")
        # No masks sent: personalization asks the segmentation service, one click per image.
        job = self.client.personalization.train_eqdiff(
            images, class_word="box", steps=self.train_steps, mask_prompts=[{"points": [(32, 32)]}] * len(images),
            batch_size=1, num_class_images=2, class_image_steps=self.steps, seed=0)
        self.concept = job.wait(progress=self.progress)
        print(f"  job {job.id}: {job.state} after {job.step} steps; concept {self.concept.id} "
              f"token {self.concept.token!r}")
        self.rows.append(Row("EqDiff training (personalization service, a job)",
                             f"the subject's images (masks from the segmentation service); "
                             f"{self.train_steps} steps: a pipeline check, not a learned concept",
                             [(f"input {i + 1}", image) for i, image in enumerate(images)]))

    def eqdiff_generate(self) -> None:
        prompt = f"a {self.concept.token} {self.concept.class_word} on a blue background"
        result = self.client.personalization.generate(self.concept, prompt, num_inference_steps=self.steps,
                                                      seed=0, num_images=2, progress=self.progress)
        row = self.rows[-1]
        for index, image in enumerate(result.images):
            row.tiles.append((f"generated {index + 1}", self.save(image, f"concept_generated_{index + 1}")))
        row.caption += f"; then Generate '{prompt}'"

    def layer_edit(self) -> None:
        image = scene()
        background = "on a striped blue background"
        # No reference and no masks sent: the job draws a reference background from the text and
        # the personalization service asks the segmentation service for both object masks.
        job = self.client.personalization.layer_edit(
            image, "a red circle", background, embedding_steps=self.train_steps, finetune_steps=self.train_steps,
            num_inference_steps=self.steps, reference_steps=self.steps, num_images=2,
            mask_prompt={"points": [(32, 32)]}, seed=5)
        result = job.wait(progress=self.progress)
        print(f"  job {job.id}: {job.state} after {job.step} steps; concept {result.concept.id}")
        row = Row("LayerDiffusion edit (personalization service, a layer_edit job)",
                  f"the scene's red circle asked to be '{background}'; {self.train_steps}+{self.train_steps} "
                  "steps (the reference trains 500+250): a pipeline check", [("source", image)])
        for index, edited in enumerate(result.images):
            row.tiles.append((f"edited {index + 1}", self.save(edited, f"layer_edit_{index + 1}")))
        self.rows.append(row)

    # ------------------------------------------------------------------ results

    def sheet(self) -> Image.Image:
        return contact_sheet(self.rows)

    def report(self) -> str:
        width = max(len(name) for name in self.timings)
        lines = [f"  {name:<{width}}  {seconds:7.1f} s" for name, seconds in self.timings.items()]
        lines.append(f"  {'total':<{width}}  {sum(self.timings.values()):7.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- inputs

def scene() -> Image.Image:
    """A toy-world scene (rendered by atelier.toyworld.world): a red circle on a blue background."""
    return Image.open(Path(__file__).with_name("scene.png")).convert("RGB")


def scribble(size: int = 64) -> Image.Image:
    """Flat colour strokes: a red disc on blue, what a user would paint."""
    image = Image.new("RGB", (size, size), BLUE)
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=RED)
    return image


def checker_box(offset: int, size: int = 64) -> Image.Image:
    """The toy world's "checker box" subject (red and white checks) on blue, shifted by ``offset``."""
    pixels = np.empty((size, size, 3), np.uint8)
    pixels[:] = BLUE
    lo, hi = size // 4 + offset, 3 * size // 4 + offset
    y, x = np.mgrid[lo:hi, lo:hi]
    checks = ((y - lo) // 8 + (x - lo) // 8) % 2 == 0
    pixels[lo:hi, lo:hi] = np.where(checks[..., None], RED, (245, 245, 245))
    return Image.fromarray(pixels)


def client_from_environment(timeout: float = 600) -> atelier.Client:
    addresses = {name: os.environ.get(f"ATELIER_{name.upper()}_ADDRESS", default)
                 for name, default in DEFAULT_ADDRESSES.items()}
    return atelier.Client(**addresses, timeout=timeout)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--num-inference-steps", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=6, help="EqDiff optimiser steps")
    # Default: the model's own guidance (ListModels' default_guidance_scale). The embedded toy
    # says 2.5 in its atelier.json: it over-saturates at SD's 7.5 under negative-prompt-inversion
    # guidance (measured in docs/BENCHMARKS.md); real SD 1.x folders get 7.5.
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--contact-sheet", default=None, help="path of the sheet (default: OUT/contact_sheet.png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset, run in the tour's order (default: all: {','.join(STAGES)})")
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown or not wanted:
        parser.error(f"--stages: unknown {unknown}; known: {', '.join(STAGES)}")
    for name, needs in NEEDS.items():
        if name in wanted and needs not in wanted:
            parser.error(f"--stages: {name} needs {needs}")
    out = Path(args.out)
    started = time.perf_counter()
    with client_from_environment() as client:
        if not client.ready(timeout=30):
            print(f"[demo] services not ready: {client.health()}", file=sys.stderr)
            return 1
        tour = Tour(client, out, args.num_inference_steps, args.train_steps, args.guidance_scale,
                    progress=not args.no_progress)
        try:
            tour.run([name for name in STAGES if name in wanted])
        except StageFailed as failure:
            traceback.print_exception(failure.__cause__)
            print(f"[demo] FAILED: {failure}", file=sys.stderr, flush=True)
            return 1
    print(f"[demo] wrote {len(list(out.glob('*.png')))} PNGs to {out}/")
    if tour.rows:  # (a --stages subset may have produced none)
        sheet_path = Path(args.contact_sheet) if args.contact_sheet else out / "contact_sheet.png"
        sheet_path.parent.mkdir(parents=True, exist_ok=True)
        tour.sheet().save(sheet_path)
        print(f"[demo] contact sheet: {sheet_path}")
    print(f"[demo] stage timings:\n{tour.report()}")
    print(f"[demo] done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
