"""Segmentation service throughput and latency, side by side in one run.

Real gRPC on loopback through the SDK; one server per configuration (local encoder or
Triton, micro-batching on or off), each driven by 1, 4 and 16 concurrent clients, with
fresh images (embedding-cache miss: the encoder runs) and one repeated image (cache hit:
prompt encoder + mask decoder only). Triton rows need .venv-triton (make triton-venv).

    .venv/bin/python bench/bench_segmentation.py [--requests 48] [--size 256] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_images(count: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(count)]


def drive(client, images: list[np.ndarray], concurrency: int) -> dict:
    """Send one request per image from ``concurrency`` threads; latency per request."""
    latencies, batch_sizes, cached = [], [], []
    lock, next_index = threading.Lock(), iter(range(len(images)))

    def worker():
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            started = time.perf_counter()
            result = client.segmentation.segment(images[index], points=[(images[index].shape[1] // 2, 10)],
                                                 multimask=True)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                batch_sizes.append(result.encoder_batch_size)
                cached.append(result.embedding_cached)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    encoded = [b for b in batch_sizes if b > 0]
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))],
        "mean_encoder_batch": statistics.mean(encoded) if encoded else 0.0,
        "cache_hit_rate": sum(cached) / len(cached),
    }


def start_service(stack: ExitStack, backend: str, max_batch_size: int, triton_url: str | None, max_queue: int):
    import atelier
    from prometheus_client import CollectorRegistry

    from atelier.core.config import ServerConfig
    from atelier.core.metrics import Metrics
    from atelier.core.server import start
    from atelier.segmentation.app import SegmentationApp, SegmentationSettings
    from atelier.segmentation.segmenter import BatchingOptions

    config = ServerConfig(service="segmentation", host="127.0.0.1", port=0, metrics_port=-1, max_queue=max_queue,
                          grace_seconds=2)
    settings = SegmentationSettings(backend=backend, triton_url=triton_url or "127.0.0.1:8001",
                                    batching=BatchingOptions(max_batch_size=max_batch_size, max_wait_seconds=0.005,
                                                             max_queue=256))
    metrics = Metrics(CollectorRegistry())
    app = SegmentationApp(config, settings, metrics)
    running = start(app, config, metrics)
    stack.callback(running.stop, 2)
    if not running.wait_loaded(300) or running.load_error is not None:
        raise RuntimeError(f"segmentation service failed to load: {running.load_error}")
    client = atelier.Client(running.address, timeout=120, retries=0)
    stack.callback(client.close)
    return client


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per cell")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--triton-venv", default=str(ROOT / ".venv-triton"))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    configs = [("local", 8), ("local", 1)]
    have_triton = (Path(args.triton_venv) / ".installed").exists()
    if have_triton:
        configs += [("triton", 8), ("triton", 1)]
    else:
        print(f"(no Triton rows: {args.triton_venv} is absent; run `make triton-venv`)")

    rows = []
    seed = 0
    with ExitStack() as outer:
        triton_url = None
        if have_triton:
            from atelier.core.models import ModelRegistry
            from atelier.segmentation.triton_launcher import TritonServer

            triton = TritonServer(args.triton_venv, sam_path=ModelRegistry().resolve("toy-sam"))
            outer.enter_context(triton)
            triton_url = triton.grpc_url
        for backend, max_batch in configs:
            with ExitStack() as stack:
                client = start_service(stack, backend, max_batch, triton_url, max_queue=max(args.concurrency) + 4)
                hot = make_images(1, args.size, seed=10_000)
                drive(client, hot * 4, 1)  # warm the connection, the model and the cache entry
                for concurrency in args.concurrency:
                    for workload in ("miss", "hit"):
                        seed += 1
                        images = make_images(args.requests, args.size, seed) if workload == "miss" \
                            else hot * args.requests
                        row = {"backend": backend, "batching": "on" if max_batch > 1 else "off",
                               "clients": concurrency, "cache": workload, **drive(client, images, concurrency)}
                        rows.append(row)
                        print(f"{backend:6} batching {row['batching']:3}  {concurrency:2} clients  {workload:4}  "
                              f"{row['rps']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  "
                              f"batch {row['mean_encoder_batch']:.2f}", flush=True)

    print()
    print("| backend | batching | clients | cache | req/s | p50 ms | p95 ms | mean encoder batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['batching']} | {r['clients']} | {r['cache']} | {r['rps']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['mean_encoder_batch']:.2f} |")
    ratios = []
    index = {(r["backend"], r["batching"], r["clients"], r["cache"]): r for r in rows}
    for c in args.concurrency:
        for backend in {b for b, _ in configs}:
            on, off = index.get((backend, "on", c, "miss")), index.get((backend, "off", c, "miss"))
            hit = index.get((backend, "on", c, "hit"))
            if on and off and hit:
                ratios.append(f"{backend} {c:2} clients: batching on/off {on['rps'] / off['rps']:.2f}x req/s; "
                              f"cache hit/miss {hit['rps'] / on['rps']:.2f}x req/s")
        if have_triton and ("triton", "on", c, "miss") in index:
            ratios.append(f"triton/local {c:2} clients (miss, batching on): "
                          f"{index[('triton', 'on', c, 'miss')]['rps'] / index[('local', 'on', c, 'miss')]['rps']:.2f}x req/s")
    print("\n" + "\n".join(ratios))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
