"""Deadlines and cancels stop work inside one UNet or VAE evaluation, not only between them.

bench/bench_reliability.py measured a 1024^2 invert running 13.8 s and a 128x128-latent edit
23 s past a 1 s deadline: each was inside a single VAE encode / UNet evaluation when the
deadline passed. The executor makes the call's control active, and the ResNet/attention
blocks of the loaded UNet and VAE check it.
"""
import pytest
import torch
from prometheus_client import CollectorRegistry

from atelier.core.control import CallControl, active, check_active
from atelier.core.errors import Cancelled, DeadlineExceeded
from atelier.core.executor import ComputeExecutor
from atelier.core.metrics import Metrics
from atelier.core.models import ModelRegistry


@pytest.fixture(scope="module")
def model():
    return ModelRegistry().load_sd("toy")


class ExpiresAfterChecks(CallControl):
    """The deadline passes after ``allowed`` checks."""

    def __init__(self, allowed: int):
        super().__init__()
        self.allowed = allowed
        self.checks = 0

    def expired(self) -> bool:
        self.checks += 1
        return self.checks > self.allowed


def test_a_vae_encode_stops_at_the_first_block_after_a_cancel(model):
    checks = []
    control = CallControl(is_cancelled=lambda: checks.append(1) or len(checks) > 2)
    with active(control), pytest.raises(Cancelled):
        model.encode_image(torch.zeros(1, 3, 64, 64))
    assert len(checks) == 3, "the encode went on past the block that saw the cancel"


def test_a_unet_evaluation_stops_inside_when_the_deadline_passes(model):
    control = ExpiresAfterChecks(allowed=4)
    latents = torch.zeros(1, 4, 8, 8)
    text = model.encode_prompt(["a red circle"])
    with active(control), pytest.raises(DeadlineExceeded):
        model.unet(latents, torch.tensor([500]), encoder_hidden_states=text)
    assert control.checks == 5


def test_the_executor_makes_each_calls_control_active(model):
    executor = ComputeExecutor(max_queue=2, name="stop-points", metrics=Metrics(CollectorRegistry()))
    try:
        control = ExpiresAfterChecks(allowed=3)  # the executor's own check, then 2 blocks
        future = executor.submit(lambda: model.decode_latents(torch.zeros(1, 4, 8, 8)), control)
        with pytest.raises(DeadlineExceeded):
            future.result(timeout=60)
        assert control.checks == 4
        # The next call's blocks see only its own (live) control.
        fine = executor.submit(lambda: model.decode_latents(torch.zeros(1, 4, 8, 8)), CallControl())
        assert fine.result(timeout=60).shape == (1, 3, 64, 64)
    finally:
        executor.shutdown()


def test_outside_a_call_the_blocks_check_nothing(model):
    check_active()  # no active control: a no-op
    assert model.decode_latents(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 64, 64)
