"""Segmentation service throughput and latency, side by side in one run.

Real gRPC on loopback through the SDK; one server process per configuration (local encoder or
Triton, micro-batching on or off), each driven by 1, 4 and 16 concurrent clients, with
fresh images (embedding-cache miss: the encoder runs) and one repeated image (cache hit:
prompt encoder + mask decoder only). Triton rows need .venv-triton (make triton-venv).

    .venv/bin/python bench/bench_segmentation.py [--requests 48] [--size 256] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_images(count: int, size: int, seed: int) -> list:
    """Distinct random images, pre-encoded as raw RGB8 so the timed loop measures the
    service, not the client's PNG compression."""
    from atelier.sdk import codec

    rng = np.random.default_rng(seed)
    return [codec.image_from_array((rng.random((size, size, 3)) * 255).astype(np.uint8), "raw")
            for _ in range(count)]


def drive(client, images: list[np.ndarray], concurrency: int) -> dict:
    """Send one request per image from ``concurrency`` threads; latency per request."""
    latencies, batch_sizes = [], []
    lock, next_index = threading.Lock(), iter(range(len(images)))

    def worker():
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            started = time.perf_counter()
            result = client.segmentation.segment(images[index], points=[(images[index].width // 2, 10)],
                                                 multimask=True)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                batch_sizes.append(result.encoder_batch_size)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"rps": len(latencies) / wall, "latencies": latencies, "batch_sizes": batch_sizes}


def start_service(stack: ExitStack, backend: str, max_batch_size: int, triton_url: str | None, sam_source: str,
                  max_queue: int, torch_threads: int):
    """``python -m atelier.segmentation`` in its own process (so the load generator's GIL
    does not slow the server), on a free loopback port; an SDK client once it is SERVING."""
    import atelier
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from atelier.segmentation.triton_launcher import free_port

    port = free_port()
    command = [sys.executable, "-m", "atelier.segmentation", "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", "-1", "--max-queue", str(max_queue), "--grace-seconds", "2",
               "--model", f"toy-sam={sam_source}", "--backend", backend, "--max-batch-size", str(max_batch_size),
               "--encoder-queue", "256"]
    if triton_url:
        command += ["--triton-url", triton_url]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch_threads)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop():
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    stack.callback(stop)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited:\n{process.stderr.read().decode()[-3000:]}")
            try:
                if check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address} not SERVING after 300 s")
            time.sleep(0.2)
    client = atelier.Client(address, timeout=120, retries=0)
    stack.callback(client.close)
    return client


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per cell and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (medians reported)")
    parser.add_argument("--sam", help="SamModel folder (default: the registry's toy-sam)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--triton-venv", default=str(ROOT / ".venv-triton"))
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads for the service and the Triton stub (torch's default spins "
                             "badly on a shared 2-core machine: 400 ms instead of 6 ms per encoder call)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    configs = [("local", 8), ("local", 1)]
    have_triton = (Path(args.triton_venv) / ".installed").exists()
    if have_triton:
        configs += [("triton", 8), ("triton", 1)]
    else:
        print(f"(no Triton rows: {args.triton_venv} is absent; run `make triton-venv`)")

    from atelier.core.models import ModelRegistry

    sam_source = args.sam or ModelRegistry().resolve("toy-sam")
    rows = []
    cells: dict[tuple, list[dict]] = {}
    with ExitStack() as stack:
        triton_url = None
        if have_triton:
            from atelier.segmentation.triton_launcher import TritonServer

            triton = TritonServer(args.triton_venv, sam_path=sam_source,
                                  extra_env={"OMP_NUM_THREADS": str(args.torch_threads)})
            stack.enter_context(triton)
            triton_url = triton.grpc_url
        # All servers up at once; cells interleave across configurations and repeat, so slow
        # drift of a shared machine's load hits every configuration alike.
        clients = {config: start_service(stack, config[0], config[1], triton_url, sam_source,
                                         max_queue=max(args.concurrency) + 4, torch_threads=args.torch_threads)
                   for config in configs}
        hot = make_images(1, args.size, seed=10_000)
        for client in clients.values():
            drive(client, hot * 4, 1)  # warm the connection, the model and the cache entry
        seed = 0
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                for workload in ("miss", "hit"):
                    for (backend, max_batch), client in clients.items():
                        seed += 1
                        images = make_images(args.requests, args.size, seed) if workload == "miss" \
                            else hot * args.requests
                        key = (backend, "on" if max_batch > 1 else "off", concurrency, workload)
                        cells.setdefault(key, []).append(drive(client, images, concurrency))
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    for (backend, batching, concurrency, workload), runs in cells.items():
        latencies = sorted(v for run in runs for v in run["latencies"])
        encoded = [b for run in runs for b in run["batch_sizes"] if b > 0]
        rows.append({
            "backend": backend, "batching": batching, "clients": concurrency, "cache": workload,
            "rps": statistics.median(run["rps"] for run in runs),
            "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
            "mean_encoder_batch": statistics.mean(encoded) if encoded else 0.0,
        })
    rows.sort(key=lambda r: (r["backend"], r["batching"] == "off", r["clients"], r["cache"] == "hit"))

    print()
    print("| backend | batching | clients | cache | req/s | p50 ms | p95 ms | mean encoder batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['batching']} | {r['clients']} | {r['cache']} | {r['rps']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['mean_encoder_batch']:.2f} |")
    ratios = []
    index = {(r["backend"], r["batching"], r["clients"], r["cache"]): r for r in rows}
    for c in args.concurrency:
        for backend in sorted({b for b, _ in configs}):
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
