"""Job-system overhead and Generate latency under training (personalization service).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_jobs.py [--steps 60] [--checkpoint-every 10]

Side by side in one run, on the embedded toy model:
  1. job wall / bare loop wall: the same TrainingRun (same method, parameters, inputs) driven by
     a plain loop in-process versus as a job through the service (SQLite store, lease renewal,
     one event per step, checkpoints every N steps, concept write). Job wall is the job's
     start_time -> end_time in the store; bare wall covers the same work (run construction,
     steps, finish). Goal <= 1.02.
  2. Generate latency (median of --generate-calls calls) with the service idle versus while a
     job trains: a Generate waits for at most the training step in progress.
  3. checkpoint write seconds (mean, from atelier_checkpoint_write_seconds).
The method is EqDiff when this build has it (app.default_methods()), else the textual-inversion
test method (tests/personalization/ti_method.py), and the output says which.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "personalization"))


def pick_method(name: str):
    from atelier.personalization.app import default_methods

    methods = default_methods()
    if name == "eqdiff" and "eqdiff" in methods:
        return methods["eqdiff"], "EqDiff"
    from ti_method import TextualInversionMethod

    return TextualInversionMethod(), "textual inversion (test method; EqDiff not in this build)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--generate-calls", type=int, default=5)
    parser.add_argument("--generate-steps", type=int, default=10)
    parser.add_argument("--method", default="eqdiff")
    parser.add_argument("--repeats", type=int, default=2, help="job/bare pairs (alternated); the median ratio")
    args = parser.parse_args(argv)

    import torch
    from prometheus_client import CollectorRegistry

    import atelier
    from atelier.core.config import ServerConfig
    from atelier.core.control import CallControl
    from atelier.core.metrics import Metrics
    from atelier.core.server import start
    from atelier.personalization.app import PersonalizationApp
    from atelier.personalization.inputs import decode_inputs
    from atelier.v1 import personalization_pb2
    from pers_helpers import concept_image, square_mask

    torch.set_num_threads(1)
    method, method_label = pick_method(args.method)
    images = [concept_image(0), concept_image(1)]
    masks = [square_mask(), square_mask()]
    options = dict(steps=args.steps)
    if method_label == "EqDiff":
        options.update(prior_preservation=False)  # class-image generation is not job-system work

    with tempfile.TemporaryDirectory() as data_dir:
        config = ServerConfig(service="personalization", host="127.0.0.1", port=0, metrics_port=-1,
                              grace_seconds=1, max_image_pixels=256 * 256, extras=dict(
                                  data_dir=data_dir, checkpoint_every=args.checkpoint_every, job_poll_seconds=1.0))
        metrics = Metrics(CollectorRegistry())
        app = PersonalizationApp(config, metrics=metrics, methods={"eqdiff": method})
        running = start(app, config, metrics)
        assert running.wait_loaded(300) and running.load_error is None
        client = atelier.Client(personalization=running.address, timeout=3600)
        pers = client.personalization
        model = app.registry.load_sd("toy")

        stored = {}

        def bare() -> float:
            """The same work as a job, as a plain loop: build the run, step it, finish."""
            request = stored["request"]
            params = method.parse(request.eqdiff, "box", "", "")
            started = time.perf_counter()
            control = CallControl()
            run = method.create_run(model, decode_inputs(request, 256 * 256), params, control)
            while run.step_index < run.total_steps:
                run.step(control)
            run.finish()
            return time.perf_counter() - started

        def as_job() -> float:
            job = pers.train_eqdiff(images, class_word="box", masks=masks, **options)
            job.wait()
            row = app.store.get_job(job.id)
            stored["request"] = personalization_pb2.CreateJobRequest.FromString(app.artifacts.get(row.inputs_hash))
            return row.end_time - row.start_time

        as_job()  # warm-up (allocator, kernels, SQLite file)
        bare()
        ratios, jobs, bares = [], [], []
        for _ in range(args.repeats):
            j, b = as_job(), bare()
            jobs.append(j)
            bares.append(b)
            ratios.append(j / b)
        print(f"method: {method_label}; {args.steps} steps, checkpoint every {args.checkpoint_every}")
        print(f"job wall {statistics.median(jobs):.2f} s, bare loop {statistics.median(bares):.2f} s, "
              f"ratio {statistics.median(ratios):.3f} (runs: {', '.join(f'{r:.3f}' for r in ratios)})")

        concept = pers.concepts()[0]
        prompt = f"a {concept.token} on a blue background"

        def generate_latencies() -> list[float]:
            out = []
            for i in range(args.generate_calls):
                started = time.perf_counter()
                pers.generate(concept, prompt, seed=i, num_inference_steps=args.generate_steps)
                out.append(time.perf_counter() - started)
            return out

        idle = generate_latencies()
        long_job = pers.train_eqdiff(images, class_word="box", masks=masks, **dict(options, steps=20000))
        while long_job.refresh().step < 2:
            time.sleep(0.05)
        step_before = long_job.step
        busy = generate_latencies()
        steps_during = long_job.refresh().step - step_before
        long_job.cancel()
        try:
            long_job.wait(timeout=120)
        except atelier.CancelledError:
            pass
        step_seconds = statistics.median(bares) / args.steps
        print(f"Generate ({args.generate_steps} DDIM steps): idle median {statistics.median(idle) * 1000:.0f} ms, "
              f"while training {statistics.median(busy) * 1000:.0f} ms "
              f"(+{(statistics.median(busy) - statistics.median(idle)) * 1000:.0f} ms; one training step "
              f"~{step_seconds * 1000:.0f} ms; {steps_during} training steps ran between the calls)")
        histogram = {s.name: s.value for family in metrics.registry.collect()
                     if family.name == "atelier_checkpoint_write_seconds" for s in family.samples}
        count = histogram.get("atelier_checkpoint_write_seconds_count", 0)
        if count:
            mean = histogram["atelier_checkpoint_write_seconds_sum"] / count
            print(f"checkpoint write: mean {mean * 1000:.1f} ms over {int(count)} checkpoints")
        client.close()
        running.stop(1)

        # The store's own cost per training step (one event + lease check), in isolation.
        from atelier.personalization.store import JobStore

        store = JobStore(f"sqlite:///{data_dir}/bench-store.db")
        job, _ = store.create_job(idempotency_key=None, body_hash="b", inputs_hash="0" * 64, method="eqdiff",
                                  base_model="toy", placeholder_token="<c>", class_word="box", total_steps=10**6,
                                  max_pending=10)
        store.claim("bench", 60)
        started = time.perf_counter()
        for i in range(200):
            store.record_step(job.id, "bench", i + 1, 10**6, "train", {"loss": 0.1})
        per_step = (time.perf_counter() - started) / 200
        store.close()
        print(f"store cost per step (SQLite, synchronous=FULL): {per_step * 1000:.2f} ms "
              f"= {per_step / step_seconds:.1%} of a bare training step here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
