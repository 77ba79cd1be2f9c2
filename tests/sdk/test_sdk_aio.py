"""atelier.aio.Client against real loopback servers: the same requests, results, errors,
retries, deadlines and health as the sync client; cancellation by cancelling the task."""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sdk_fakes import FAST_RETRIES, abort_with, default_invert, latent_for, wait_until_terminated

import atelier
import atelier.aio
from atelier.sdk.inversion import edit_request, invert_request

IMAGE = np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_invert_and_edit_send_what_the_sync_client_sends(servers):
    fake, _, address = servers()
    events = []

    async def main():
        async with atelier.aio.Client(address, retries=FAST_RETRIES) as client:
            inversion = await client.inversion.invert(IMAGE, "a cat", num_inference_steps=3, return_chain=True,
                                                      max_rounds=7, progress=events.append)
            edited = await client.inversion.edit(inversion, "a dog", guidance_scale=5.0, mode="replace",
                                                 return_source=True)
            return inversion, edited

    inversion, edited = run(main())
    assert fake.requests[0] == invert_request(IMAGE, "a cat", num_inference_steps=3, return_chain=True, max_rounds=7)
    assert fake.requests[1] == edit_request(inversion, "a dog", guidance_scale=5.0, mode="replace", return_source=True)
    assert isinstance(inversion, atelier.Inversion) and np.array_equal(inversion.z_T, latent_for("a cat"))
    assert inversion.chain.shape == (4, 4, 2, 3) and inversion.num_inference_steps == 3
    assert isinstance(edited, atelier.EditResult) and edited.image.size == (24, 16) and edited.source_image is not None
    assert [(e.stage, e.step) for e in events] == [("invert", 1), ("invert", 2)]


def test_errors_are_typed_with_field_violations(servers):
    fake, _, address = servers()

    def reject(request, context, attempt):
        abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, "bad request",
                   violations=[("num_inference_steps", "must be between 1 and 1000, got 0")])
        yield  # pragma: no cover

    fake.invert_behaviour = reject

    async def main():
        async with atelier.aio.Client(address, retries=FAST_RETRIES) as client:
            await client.inversion.invert(IMAGE, "x", num_inference_steps=0)

    with pytest.raises(atelier.InvalidArgumentError) as caught:
        run(main())
    assert caught.value.field_violations == [("num_inference_steps", "must be between 1 and 1000, got 0")]
    assert fake.attempts == 1


def test_unavailable_and_resource_exhausted_with_retry_info_are_retried(servers):
    fake, _, address = servers()
    delay = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=20_000_000))
    seen = []

    def flaky(request, context, attempt):
        seen.append(time.monotonic())
        if attempt == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "loading")
        if attempt == 2:
            abort_with(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", extra_details=[delay])
        yield from default_invert(request, context, attempt)

    fake.invert_behaviour = flaky
    events = []

    async def main():
        async with atelier.aio.Client(address, retries=FAST_RETRIES) as client:
            return await client.inversion.invert(IMAGE, "x", num_inference_steps=2, progress=events.append)

    assert run(main()).num_inference_steps == 2 and fake.attempts == 3
    assert seen[2] - seen[1] >= 0.02
    assert [e.message.split(":")[0] for e in events if e.stage == "retry"] == [
        "retrying after UNAVAILABLE", "retrying after RESOURCE_EXHAUSTED"]


def test_the_deadline_covers_the_call(servers):
    fake, _, address = servers()

    def stall(request, context, attempt):
        wait_until_terminated(context)
        yield from ()

    fake.invert_behaviour = stall

    async def main():
        async with atelier.aio.Client(address, timeout=0.3) as client:
            await client.inversion.invert(IMAGE, "x")

    with pytest.raises(atelier.DeadlineExceededError):
        run(main())


def test_cancelling_the_task_cancels_the_rpc(servers):
    fake, _, address = servers()

    def stall(request, context, attempt):
        wait_until_terminated(context)
        yield from ()

    fake.invert_behaviour = stall

    async def main():
        async with atelier.aio.Client(address) as client:
            task = asyncio.ensure_future(client.inversion.invert(IMAGE, "x"))
            while not fake.started.is_set():
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())
    assert fake.ended_early.wait(10)  # the server saw the RPC end before its handler did


def test_health_and_ready():
    from concurrent import futures

    from atelier.sdk.client import SERVICES

    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("atelier.v1.Inversion", health_pb2.HealthCheckResponse.SERVING)
    others = {name: proto for name, (_, _, proto) in SERVICES.items() if name != "inversion"}

    async def main():
        async with atelier.aio.Client(f"127.0.0.1:{port}") as client:
            first, ready = await client.health(), await client.ready()
            for proto_service in others.values():
                servicer.set(proto_service, health_pb2.HealthCheckResponse.SERVING)
            return first, ready, await client.ready()

    try:
        expected = {"inversion": "SERVING", **{name: "SERVICE_UNKNOWN" for name in others}}
        assert run(main()) == (expected, False, True)
    finally:
        server.stop(grace=None)


def test_a_closed_client_refuses_calls(servers):
    _, _, address = servers()

    async def main():
        client = atelier.aio.Client(address)
        await client.close()
        await client.inversion.invert(IMAGE, "x")

    with pytest.raises(RuntimeError, match="closed"):
        run(main())


def test_a_cancel_token_cancels_from_another_thread(servers):
    import threading

    fake, _, address = servers()

    def stall(request, context, attempt):
        wait_until_terminated(context)
        yield from ()

    fake.invert_behaviour = stall
    token = atelier.CancelToken()
    threading.Thread(target=lambda: fake.started.wait(30) and token.cancel(), daemon=True).start()

    async def main():
        async with atelier.aio.Client(address) as client:
            await client.inversion.invert(IMAGE, "x", cancel=token)

    with pytest.raises(atelier.CancelledError, match="cancelled by the caller"):
        run(main())
    assert fake.ended_early.wait(10)

    async def again():  # a cancelled token fails later calls before sending
        async with atelier.aio.Client(address) as client:
            await client.segmentation.segment(IMAGE, points=[(1, 1)], cancel=token)

    with pytest.raises(atelier.CancelledError):
        run(again())
    assert fake.attempts == 1


def test_a_cancel_token_interrupts_the_retry_backoff(servers):
    fake, _, address = servers()

    def loading(request, context, attempt):
        context.abort(grpc.StatusCode.UNAVAILABLE, "loading")
        yield  # pragma: no cover

    fake.invert_behaviour = loading
    token = atelier.CancelToken()
    slow = atelier.RetryPolicy(max_attempts=3, initial_backoff=30.0, max_backoff=30.0, jitter=0.0)

    async def main():
        async with atelier.aio.Client(address, retries=slow) as client:
            def on_progress(event):
                if event.stage == "retry":
                    token.cancel()  # from inside the call, before its 30 s backoff
            await client.inversion.invert(IMAGE, "x", cancel=token, progress=on_progress)

    started = time.monotonic()
    with pytest.raises(atelier.CancelledError):
        run(main())
    assert fake.attempts == 1 and time.monotonic() - started < 30
