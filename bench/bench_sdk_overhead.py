"""SDK end-to-end time vs in-process time for a 25-step invert + edit, side by side.

Runs the same work (DDIM and SPDInv inversion + P2P edit, 64x64 on the default
model) alternately through the SDK against a real loopback server and directly in
process, several rounds, and prints the median ratio (goal <= 1.03).

    .venv/bin/python bench/bench_sdk_overhead.py [--rounds 5] [--steps 25] [--method ddim]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image, ImageDraw

import atelier
from atelier.core import codecs
from atelier.core.config import ServerConfig
from atelier.core.control import CallControl
from atelier.core.metrics import Metrics
from atelier.core.server import start
from atelier.inversion.app import InversionApp
from atelier.inversion.editing import edit
from atelier.inversion.inversion import invert
from atelier.sdk import codec

SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


def scene() -> Image.Image:
    image = Image.new("RGB", (64, 64), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(210, 40, 40))
    return image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--method", default="ddim", choices=("ddim", "spdinv"))
    args = parser.parse_args()

    config = ServerConfig(service="inversion", host="127.0.0.1", port=0, metrics_port=-1)
    metrics = Metrics()
    app = InversionApp(config, metrics=metrics)
    running = start(app, config, metrics)
    assert running.wait_loaded(300)
    model = app.registry.load_sd(app.default_model)
    client = atelier.Client(inversion=running.address, timeout=600)
    image = scene()
    pixels = codecs.image_to_torch(codec.image_from_pil(image))

    def in_process() -> None:
        out = invert(model, pixels, SOURCE, method=args.method, steps=args.steps, control=CallControl())
        result = edit(model, out.chain[-1:], SOURCE, TARGET, args.steps, control=CallControl())
        codecs.image_from_torch(result.image)  # the server encodes the PNG too

    def through_sdk() -> None:
        inv = client.inversion.invert(image, SOURCE, method=args.method, num_inference_steps=args.steps)
        client.inversion.edit(inv, TARGET)

    in_process(), through_sdk()  # warm-up
    ratios, sdk_times, local_times = [], [], []
    for _ in range(args.rounds):
        started = time.perf_counter(); in_process(); local = time.perf_counter() - started
        started = time.perf_counter(); through_sdk(); remote = time.perf_counter() - started
        local_times.append(local); sdk_times.append(remote); ratios.append(remote / local)
    print(f"{args.method}, {args.steps} steps, {args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print(f"in-process median {statistics.median(local_times):.3f} s, SDK median {statistics.median(sdk_times):.3f} s")
    print(f"SDK / in-process: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    client.close()
    running.stop(0)


if __name__ == "__main__":
    main()
