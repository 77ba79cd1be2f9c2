"""ComputeExecutor and CallControl, in process (no gRPC)."""
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from atelier.core.control import CallControl
from atelier.core.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from atelier.core.executor import ComputeExecutor
from atelier.core.metrics import Metrics

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry())


def _sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


class Blocker:
    """A work function that signals when it starts and waits to be released."""

    def __init__(self, result=None):
        self.started = threading.Event()
        self.release = threading.Event()
        self.result = result

    def __call__(self):
        self.started.set()
        assert self.release.wait(10)
        return self.result


def test_runs_in_order_one_at_a_time(metrics):
    executor = ComputeExecutor(max_queue=10, name="t", metrics=metrics)
    running, peak, order = [0], [0], []
    lock = threading.Lock()

    def job(index):
        def run():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.002)
            with lock:
                running[0] -= 1
                order.append(index)
            return index
        return run

    futures = [executor.submit(job(i), CallControl(metrics=metrics)) for i in range(8)]
    assert [f.result(10) for f in futures] == list(range(8))
    assert order == list(range(8)) and peak[0] == 1
    executor.shutdown()


def test_full_queue_is_resource_exhausted_and_gauges_follow(metrics):
    executor = ComputeExecutor(max_queue=2, name="svc", metrics=metrics)
    first = Blocker("first")
    running = executor.submit(first, CallControl())
    assert first.started.wait(10)
    queued = [executor.submit(lambda i=i: i, CallControl()) for i in range(2)]
    assert _sample(metrics, "atelier_queue_depth", service="svc") == 2
    assert _sample(metrics, "atelier_in_flight", service="svc") == 1
    with pytest.raises(ResourceExhausted, match="2 calls are already waiting"):
        executor.submit(lambda: None, CallControl())
    first.release.set()
    assert running.result(10) == "first" and [f.result(10) for f in queued] == [0, 1]
    executor.shutdown()
    assert _sample(metrics, "atelier_queue_depth", service="svc") == 0
    assert _sample(metrics, "atelier_in_flight", service="svc") == 0


def test_zero_queue_admits_only_an_idle_executor(metrics):
    executor = ComputeExecutor(max_queue=0, name="t", metrics=metrics)
    blocker = Blocker()
    future = executor.submit(blocker, CallControl())
    assert blocker.started.wait(10)
    with pytest.raises(ResourceExhausted):
        executor.submit(lambda: None, CallControl())
    blocker.release.set()
    future.result(10)
    assert executor.submit(lambda: 7, CallControl()).result(10) == 7
    executor.shutdown()


def test_calls_cancelled_or_expired_while_queued_never_run(metrics):
    executor = ComputeExecutor(max_queue=4, name="t", metrics=metrics)
    blocker = Blocker()
    executor.submit(blocker, CallControl())
    assert blocker.started.wait(10)
    ran = []
    cancel_flag = threading.Event()
    cancelled = executor.submit(lambda: ran.append("cancelled"), CallControl(is_cancelled=cancel_flag.is_set))
    expired = executor.submit(lambda: ran.append("expired"), CallControl(deadline=time.monotonic() - 1))
    withdrawn = executor.submit(lambda: ran.append("withdrawn"), CallControl())
    assert withdrawn.cancel()
    survivor = executor.submit(lambda: ran.append("survivor"), CallControl())
    cancel_flag.set()
    blocker.release.set()
    assert survivor.result(10) is None
    with pytest.raises(Cancelled):
        cancelled.result(10)
    with pytest.raises(DeadlineExceeded):
        expired.result(10)
    assert ran == ["survivor"]
    executor.shutdown()


def test_a_withdrawn_call_frees_its_slot_at_once(metrics):
    executor = ComputeExecutor(max_queue=1, name="svc", metrics=metrics)
    blocker = Blocker()
    executor.submit(blocker, CallControl())
    assert blocker.started.wait(10)
    withdrawn = executor.submit(lambda: "never", CallControl())
    with pytest.raises(ResourceExhausted):
        executor.submit(lambda: None, CallControl())
    assert withdrawn.cancel()
    assert executor.queue_depth() == 0 and _sample(metrics, "atelier_queue_depth", service="svc") == 0
    replacement = executor.submit(lambda: "ran", CallControl())
    blocker.release.set()
    assert replacement.result(10) == "ran" and withdrawn.cancelled()
    executor.shutdown()


def test_errors_reach_the_caller_and_the_worker_survives(metrics):
    executor = ComputeExecutor(max_queue=2, name="t", metrics=metrics)

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        executor.submit(broken, CallControl()).result(10)
    assert executor.submit(lambda: "still alive", CallControl()).result(10) == "still alive"
    executor.shutdown()
    with pytest.raises(ResourceExhausted, match="shutting down"):
        executor.submit(lambda: None, CallControl())


def test_control_counts_and_stops_before_the_next_evaluation(metrics):
    cancel = threading.Event()
    events = []
    control = CallControl(is_cancelled=cancel.is_set, on_progress=events.append, metrics=metrics)
    control.unet()
    control.unet(backward=True)
    event = control.progress("invert", 1, 3, "ok")
    assert events == [event] and (event.stage, event.step, event.total) == ("invert", 1, 3)
    cancel.set()
    with pytest.raises(Cancelled):
        control.unet()
    assert (control.forward_evaluations, control.backward_evaluations) == (1, 1)
    assert _sample(metrics, "atelier_unet_evaluations_total", kind="forward") == 1
    assert _sample(metrics, "atelier_unet_evaluations_total", kind="backward") == 1

    expired = CallControl(deadline=time.monotonic() - 0.001, metrics=metrics)
    with pytest.raises(DeadlineExceeded):
        expired.unet(backward=True)
    assert expired.backward_evaluations == 0
    assert _sample(metrics, "atelier_unet_evaluations_total", kind="backward") == 1


def test_queue_time_is_separate_from_compute_time(metrics):
    executor = ComputeExecutor(max_queue=2, name="t", metrics=metrics)
    blocker = Blocker()
    executor.submit(blocker, CallControl())
    assert blocker.started.wait(10)
    control = CallControl()
    future = executor.submit(lambda: control.elapsed(), control)
    time.sleep(0.05)  # only makes the queue wait non-zero; no threshold asserted on it
    blocker.release.set()
    compute_elapsed = future.result(10)
    finished = time.monotonic()
    assert control.started_at > control.created_at
    assert control.queue_seconds() == control.started_at - control.created_at
    # elapsed() counts from the start of compute: it cannot exceed the time since then.
    assert compute_elapsed <= finished - control.started_at
    executor.shutdown()


def test_device_memory_is_exported_only_with_cuda(metrics):
    import torch

    if not torch.cuda.is_available():
        assert metrics.registry.get_sample_value("atelier_device_memory_bytes",
                                                 {"device": "cuda:0", "kind": "allocated"}) is None
        pytest.skip("no CUDA device: nothing to export (process memory is process_resident_memory_bytes)")
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")
    allocated = metrics.registry.get_sample_value("atelier_device_memory_bytes", {"device": "cuda:0", "kind": "allocated"})
    reserved = metrics.registry.get_sample_value("atelier_device_memory_bytes", {"device": "cuda:0", "kind": "reserved"})
    assert allocated >= block.numel() and reserved >= allocated


def test_the_worker_drops_a_finished_call_and_shutdown_joins_it(metrics):
    """An idle worker must not keep the last call's tensors (memory), and close() joins it: a
    daemon thread still freeing tensors at interpreter exit aborts the process."""
    import gc
    import weakref

    class Payload:
        pass

    executor = ComputeExecutor(max_queue=1, name="t", metrics=metrics)
    payload = Payload()
    alive = weakref.ref(payload)
    future = executor.submit(lambda held=payload: held is not None, CallControl())
    assert future.result(timeout=10) is True
    del payload, future
    for _ in range(100):  # the worker clears the call right after resolving its future
        gc.collect()
        if alive() is None:
            break
        time.sleep(0.05)
    assert alive() is None
    worker = executor._worker
    executor.shutdown()
    assert not worker.is_alive()
