"""Reliability measurements of issue 9, re-run: fuzz codes, overload, memory, work past a deadline.

Every service runs as its own process on loopback (``python -m atelier.<service>``, embedded
toy models, OMP_NUM_THREADS=1), so its RSS (/proc/PID/status: VmRSS, VmHWM after a reset
through /proc/PID/clear_refs) is the server's alone, and its metrics endpoint says when its
compute worker is busy (``atelier_in_flight``) and how many UNet evaluations it ran.

1. fuzz: every RPC of every service in tests/fuzz/fuzz_services.TARGETS gets requests from
   the shared per-message strategies (tests/fuzz/fuzz_strategies.message_strategy, imported,
   not copied) plus garbled bytes; the status codes they got, per service.
2. overload: 2x and 5x the compute queue (--max-queue) of concurrent calls, at once: codes,
   p50/p95 latency, how many RESOURCE_EXHAUSTED carried RetryInfo; then the same burst
   through the SDK with its default RetryPolicy (how many eventually succeeded).
3. memory: server RSS before / peak / after under the largest legal requests (a 1024^2
   invert, a SegmentBatch just under the message limit) and refused ones (issue 9's
   1024^2 x 256 sets x multimask, one refused by the in-flight byte budget, one over the
   message size).
4. deadline: a 1 s deadline on a 1024^2 invert and on a 128x128-latent edit; how long after
   the deadline the server's worker was still busy (metrics polled every ~20 ms).

    .venv/bin/python bench/bench_reliability.py [--fuzz-examples 100] [--queue 4] [--json out.json]

One full run (the defaults) took 217 s wall and 133 CPU-s on the shared 2-core machine.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The fuzz strategies are the suite's own (one strategy per message type), reused as they are.
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))

GIB = 1 << 30
MIB = 1 << 20


# ---------------------------------------------------------------- servers as processes


class Server:
    """``python -m atelier.<service>`` on free loopback ports, SERVING before returning."""

    def __init__(self, stack: ExitStack, service: str, *flags: str):
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from atelier.segmentation.triton_launcher import free_port

        self.service = service
        self.port, self.metrics_port = free_port(), free_port()
        command = [sys.executable, "-m", f"atelier.{service}", "--host", "127.0.0.1", "--port", str(self.port),
                   "--metrics-port", str(self.metrics_port), "--grace-seconds", "2", "--threads", "1", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stack.callback(self.stop)
        self.address = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        with grpc.insecure_channel(self.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{' '.join(command)} exited:\n{self.process.stderr.read().decode()[-3000:]}")
                try:
                    if check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{service} not SERVING after 300 s")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    # memory
    def _status(self) -> dict[str, int]:
        values = {}
        with open(f"/proc/{self.process.pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def rss(self) -> int:
        return self._status()["VmRSS"]

    def reset_peak(self) -> None:
        with open(f"/proc/{self.process.pid}/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def peak(self) -> int:
        return self._status()["VmHWM"]

    # metrics
    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("atelier_in_flight", "atelier_queue_depth"):
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
                elif sample.name == "atelier_unet_evaluations_total":
                    values["unet"] = values.get("unet", 0.0) + sample.value
        return values

    def wait_idle(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            values = self.metrics()
            if not values.get("atelier_in_flight") and not values.get("atelier_queue_depth"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.service}: the compute worker stayed busy for {timeout} s")


def _fmt_gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _image(size: int, seed: int = 0):
    from atelier.sdk import codec

    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    return codec.image_from_array(pixels, "raw")


# ---------------------------------------------------------------- 1. fuzz


def bench_fuzz(stack: ExitStack, examples: int) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from hypothesis import HealthCheck, Phase, given, settings

    from atelier.sdk import channel_options
    from fuzz_services import TARGETS
    from fuzz_strategies import message_strategy

    rows = {}
    for target in TARGETS:
        server = Server(stack, target.name, "--max-queue", "4", "--max-image-pixels", str(128 * 128))
        channel = grpc.insecure_channel(server.address, options=channel_options.client_options())
        stack.callback(channel.close)
        codes: collections.Counter = collections.Counter()
        per_rpc = {}
        started = time.perf_counter()
        for service, method in target.methods():
            path = f"/{service.full_name}/{method.name}"
            kind = (method.client_streaming, method.server_streaming)
            make = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                    (True, False): channel.stream_unary, (True, True): channel.stream_stream}[kind]
            call = make(path, request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                        response_deserializer=lambda b: b)
            rpc_codes: collections.Counter = collections.Counter()

            def invoke(request) -> str:
                try:
                    result = call(iter([request]) if method.client_streaming else request, timeout=1.0)
                    if method.server_streaming:
                        for _ in result:
                            pass
                except grpc.RpcError as error:
                    return error.code().name
                return "OK"

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
            @given(request=message_strategy(method.input_type))
            def fuzz(request):
                rpc_codes[invoke(request)] += 1

            fuzz()
            for garbage in (b"\xff\xff\xff\xff", b"\x0a\x7fshort", b"\x12\x02\x08"):
                rpc_codes["garbled:" + invoke(garbage)] += 1
            per_rpc[method.name] = dict(rpc_codes)
            codes.update(rpc_codes)
        server.wait_idle()
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        rows[target.name] = {
            "requests": sum(codes.values()), "codes": dict(codes), "per_rpc": per_rpc,
            "serving_after": status == health_pb2.HealthCheckResponse.SERVING, "seconds": time.perf_counter() - started,
        }
        server.stop()
    return rows


# ---------------------------------------------------------------- 2. overload


def _burst(make_call, count: int) -> dict:
    """``count`` calls released at once from their own threads; code, latency, RetryInfo each."""
    from atelier.sdk.errors import AtelierError

    barrier = threading.Barrier(count)
    results: list[tuple[str, float, bool]] = []
    lock = threading.Lock()

    def worker(index: int):
        barrier.wait()
        started = time.perf_counter()
        code, retry_info = "OK", False
        try:
            make_call(index)
        except AtelierError as error:
            code, retry_info = error.code.name, error.retry_delay is not None
        elapsed = time.perf_counter() - started
        with lock:
            results.append((code, elapsed, retry_info))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = collections.Counter(code for code, _, _ in results)
    exhausted = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]
    latencies = [elapsed for _, elapsed, _ in results]
    ok_latencies = [elapsed for code, elapsed, _ in results if code == "OK"]
    return {"calls": count, "codes": dict(codes), "exhausted_with_retry_info": sum(r[2] for r in exhausted),
            "exhausted": len(exhausted), "p50_ms": 1e3 * _percentile(latencies, 50),
            "p95_ms": 1e3 * _percentile(latencies, 95), "ok_p50_ms": 1e3 * _percentile(ok_latencies, 50),
            "ok_p95_ms": 1e3 * _percentile(ok_latencies, 95)}


def bench_overload(stack: ExitStack, queue: int) -> dict:
    import atelier
    from atelier.sdk.transport import RetryPolicy

    rows = {}
    segmentation = Server(stack, "segmentation", "--max-queue", str(queue), "--max-batch-size", "1")
    inversion = Server(stack, "inversion", "--max-queue", str(queue))
    seg_images = [_image(256, seed) for seed in range(5 * queue)]
    inv_images = [_image(64, seed) for seed in range(5 * queue)]

    calls = {
        "segmentation.segment 256^2": (segmentation, lambda client, i: client.segmentation.segment(
            seg_images[i], points=[(128, 128)], multimask=True)),
        "inversion.invert 64^2 ddim 10 steps": (inversion, lambda client, i: client.inversion.invert(
            inv_images[i], "a red circle", method="ddim", num_inference_steps=10)),
    }
    for name, (server, call) in calls.items():
        for factor in (2, 5):
            count = factor * queue
            for mode, retries in (("raw", 0), ("sdk-retry", RetryPolicy())):
                client = atelier.Client(server.address, timeout=120, retries=retries)
                try:
                    row = _burst(lambda i: call(client, i), count)
                finally:
                    client.close()
                server.wait_idle()
                rows[f"{name} | {factor}x queue ({count}) | {mode}"] = row
    segmentation.stop()
    inversion.stop()
    return rows


# ---------------------------------------------------------------- 3. memory


def _measure_rss(server: Server, action) -> dict:
    import gc

    gc.collect()
    server.wait_idle()
    time.sleep(0.5)
    before = server.rss()
    server.reset_peak()
    started = time.perf_counter()
    outcome = action()
    seconds = time.perf_counter() - started
    server.wait_idle()
    peak = server.peak()
    time.sleep(2.0)  # let the allocator return what it will
    after = server.rss()
    return {"outcome": outcome, "seconds": seconds, "before": before, "peak": peak, "after": after}


def _outcome(fn) -> str:
    from atelier.sdk.errors import AtelierError

    try:
        fn()
    except AtelierError as error:
        return error.code.name + (" +RetryInfo" if error.retry_delay is not None else "")
    return "OK"


def bench_memory(stack: ExitStack) -> dict:
    import atelier
    import grpc

    from atelier.sdk import channel_options
    from atelier.segmentation.servicer import answer_bytes
    from atelier.v1 import segmentation_pb2, segmentation_pb2_grpc

    rows = {}
    inversion = Server(stack, "inversion", "--max-queue", "4")
    client = atelier.Client(inversion.address, timeout=300, retries=0)
    big = _image(1024, 1)
    rows["invert 1024^2, ddim, 4 steps (largest legal image)"] = _measure_rss(
        inversion, lambda: _outcome(lambda: client.inversion.invert(big, "a red circle", method="ddim",
                                                                     num_inference_steps=4)))
    client.close()
    inversion.stop()

    # Segmentation: one server with the default byte budget (1 GiB), one with a budget that fits
    # a single big batch, so the second of two concurrent ones is refused by the budget.
    limit = channel_options.DEFAULT_MAX_MESSAGE_BYTES
    segmentation = Server(stack, "segmentation", "--max-queue", "4")
    client = atelier.Client(segmentation.address, timeout=300, retries=0, max_message_bytes=limit)
    low_res = client.segmentation.segment(_image(64), points=[(32, 32)]).low_res_logits.shape[-1]

    class _Size:
        width = height = 1024

    sets = max(n for n in range(1, 257) if answer_bytes(_Size, n, True, low_res) <= limit)
    prompt_sets = [{"points": [(8 + 4 * i, 512)]} for i in range(256)]
    rows[f"SegmentBatch 1024^2 x {sets} sets x multimask (answer just under {limit // MIB} MiB)"] = _measure_rss(
        segmentation, lambda: _outcome(lambda: client.segmentation.segment_many(big, prompt_sets[:sets], multimask=True)))
    rows["SegmentBatch 1024^2 x 256 sets x multimask (issue 9's request: answer ~818 MB)"] = _measure_rss(
        segmentation, lambda: _outcome(lambda: client.segmentation.segment_many(big, prompt_sets, multimask=True)))

    # A request over the message limit (the 300 MB request), through a raw channel
    # whose own send limit is lifted.
    oversized = segmentation_pb2.SegmentRequest(image=_image(10_000, 2), prompt=segmentation_pb2.PromptSet(
        points=[segmentation_pb2.Point(x=5, y=5, label=1)]))
    channel = grpc.insecure_channel(segmentation.address, options=[("grpc.max_send_message_length", -1)])

    def send_oversized() -> str:
        try:
            segmentation_pb2_grpc.SegmentationStub(channel).Segment(oversized, timeout=120)
        except grpc.RpcError as error:
            return error.code().name
        return "OK"

    rows[f"Segment with a {oversized.ByteSize() / 1e6:.0f} MB request (over the message limit)"] = _measure_rss(
        segmentation, send_oversized)
    channel.close()
    del oversized
    client.close()
    segmentation.stop()

    one_answer = answer_bytes(_Size, sets, True, low_res) + 4 * MIB
    budget = Server(stack, "segmentation", "--max-queue", "4", "--max-inflight-bytes", str(int(1.5 * one_answer)))
    client = atelier.Client(budget.address, timeout=300, retries=0, max_message_bytes=limit)

    def two_concurrent() -> str:
        outcomes = [None, None]

        def one(index):
            outcomes[index] = _outcome(lambda: client.segmentation.segment_many(big, prompt_sets[:sets], multimask=True))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(0.3)  # the first is admitted before the second arrives
        for thread in threads:
            thread.join()
        return " / ".join(outcomes)

    rows[f"2 concurrent SegmentBatch x {sets} sets, byte budget {1.5 * one_answer / MIB:.0f} MiB "
         f"(second refused by the budget)"] = _measure_rss(budget, two_concurrent)
    client.close()
    budget.stop()
    return rows


# ---------------------------------------------------------------- 4. deadline


def _work_past_deadline(server: Server, call, deadline_s: float) -> dict:
    """Start ``call`` with ``deadline_s``; poll the metrics until the worker is idle."""
    from atelier.sdk.errors import AtelierError

    server.wait_idle()
    unet_before = server.metrics().get("unet", 0.0)
    outcome = {}

    def run():
        try:
            call(deadline_s)
            outcome["code"] = "OK"
        except AtelierError as error:
            outcome["code"] = error.code.name

    started = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    busy_seen, last_busy, last_unet, unet = False, started, started, unet_before
    while True:
        now = time.monotonic()
        values = server.metrics()
        if values.get("unet", 0.0) != unet:
            unet, last_unet = values.get("unet", 0.0), now
        if values.get("atelier_in_flight") or values.get("atelier_queue_depth"):
            busy_seen, last_busy = True, now
        elif busy_seen or now - started > deadline_s + 5:
            break
        time.sleep(0.02)
    thread.join()
    deadline_at = started + deadline_s
    return {"code": outcome.get("code"), "worker_busy_past_deadline_ms": 1e3 * max(0.0, last_busy - deadline_at),
            "last_unet_past_deadline_ms": 1e3 * (last_unet - deadline_at) if unet != unet_before else None,
            "unet_evaluations": unet - unet_before}


def bench_deadline(stack: ExitStack, repeats: int) -> dict:
    import atelier
    from atelier.v1 import common_pb2, inversion_pb2

    server = Server(stack, "inversion", "--max-queue", "4")
    client = atelier.Client(server.address, retries=0)
    big = _image(1024, 3)
    z_t = np.random.default_rng(0).standard_normal((1, 4, 128, 128)).astype(np.float32)
    inversion = inversion_pb2.InversionResult(model=common_pb2.ModelRef(name=""), prompt="a red circle",
                                              method=inversion_pb2.DDIM, num_inference_steps=50, width=1024,
                                              height=1024)
    inversion.z_t.datatype, inversion.z_t.raw = "FP32", z_t.tobytes()
    inversion.z_t.shape.extend(z_t.shape)
    calls = {
        "invert 1024^2, ddim, 50 steps": lambda timeout: client.inversion.invert(
            big, "a red circle", method="ddim", num_inference_steps=50, timeout=timeout),
        "edit 128x128 latent (1024^2), p2p, 50 steps": lambda timeout: client.inversion.edit(
            inversion, "a blue circle", timeout=timeout),
    }
    rows = {}
    for name, call in calls.items():
        runs = [_work_past_deadline(server, call, 1.0) for _ in range(repeats)]
        rows[name] = {"runs": runs, "median_busy_past_deadline_ms": statistics.median(
            r["worker_busy_past_deadline_ms"] for r in runs)}
    client.close()
    server.stop()
    return rows


# ---------------------------------------------------------------- report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz-examples", type=int, default=100, help="hypothesis examples per RPC")
    parser.add_argument("--queue", type=int, default=4, help="--max-queue of the overload servers")
    parser.add_argument("--deadline-repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=["fuzz", "overload", "memory", "deadline"],
                        default=["fuzz", "overload", "memory", "deadline"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    results: dict = {}
    started = time.perf_counter()
    cpu_started = os.times()
    with ExitStack() as stack:
        if "fuzz" in args.only:
            results["fuzz"] = bench_fuzz(stack, args.fuzz_examples)
            print("\n## fuzz (codes per service; 'garbled:' = undecodable request bytes)")
            for name, row in results["fuzz"].items():
                print(f"{name}: {row['requests']} requests in {row['seconds']:.0f} s, SERVING after: "
                      f"{row['serving_after']}, codes {dict(sorted(row['codes'].items()))}")
        if "overload" in args.only:
            results["overload"] = bench_overload(stack, args.queue)
            print(f"\n## overload (--max-queue {args.queue}; raw = retries off, sdk-retry = default RetryPolicy)")
            print("| calls | codes | RESOURCE_EXHAUSTED with RetryInfo | p50 ms | p95 ms | OK p50 / p95 ms |")
            for name, row in results["overload"].items():
                print(f"| {name} | {row['codes']} | {row['exhausted_with_retry_info']}/{row['exhausted']} | "
                      f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['ok_p50_ms']:.0f} / {row['ok_p95_ms']:.0f} |")
        if "memory" in args.only:
            results["memory"] = bench_memory(stack)
            print("\n## server RSS")
            print("| request | outcome | wall s | RSS before | peak | after |")
            for name, row in results["memory"].items():
                print(f"| {name} | {row['outcome']} | {row['seconds']:.1f} | {_fmt_gib(row['before'])} | "
                      f"{_fmt_gib(row['peak'])} | {_fmt_gib(row['after'])} |")
        if "deadline" in args.only:
            results["deadline"] = bench_deadline(stack, args.deadline_repeats)
            print("\n## work past a 1 s deadline (worker busy after the deadline, per run)")
            for name, row in results["deadline"].items():
                runs = ", ".join(f"{r['worker_busy_past_deadline_ms']:.0f} ms ({r['code']}, {r['unet_evaluations']:.0f} "
                                 f"UNet)" for r in row["runs"])
                print(f"{name}: median {row['median_busy_past_deadline_ms']:.0f} ms; runs: {runs}")
    cpu = os.times()  # after the servers stopped: their CPU is counted in children_*
    children = (cpu.children_user + cpu.children_system) - (cpu_started.children_user + cpu_started.children_system)
    own = (cpu.user + cpu.system) - (cpu_started.user + cpu_started.system)
    print(f"\nwall {time.perf_counter() - started:.0f} s, CPU {own + children:.0f} s (bench {own:.0f} s, servers {children:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
