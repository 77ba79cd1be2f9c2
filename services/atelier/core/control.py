"""Per-call control: deadline, cancellation, progress, UNet-evaluation accounting.

Method code calls ``control.unet()`` exactly once immediately before every UNet
call, ``control.vae()`` before every VAE encode/decode and ``control.decoder()`` before
every VAE-decoder forward+backward, so a deadline or a client cancel stops the work after
at most one more heavy evaluation. Inside an evaluation, the executor makes the call's control
the *active* one (``active``) and the UNet's and VAE's ResNet and attention blocks check it
(``check_active``, hooks installed by ``atelier.core.sd_model.add_stop_points``): at 1024^2 one
VAE encode or one UNet evaluation takes seconds on a CPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass
from typing import Callable, Optional

from atelier.core.errors import Cancelled, DeadlineExceeded
from atelier.core.metrics import Metrics, default_metrics

__all__ = ["CallControl", "ProgressEvent", "active", "check_active", "remaining_seconds"]

# gRPC reports "no deadline" as a far-future instant.
_NO_DEADLINE_SECONDS = 10 * 365 * 24 * 3600


def remaining_seconds(context) -> Optional[float]:
    """Seconds left before the RPC's deadline, or None when it has none."""
    remaining = context.time_remaining()
    if remaining is None or remaining >= _NO_DEADLINE_SECONDS:
        return None
    return remaining


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    step: int
    total: int
    message: str
    elapsed_seconds: float


class CallControl:
    """Deadline (a ``time.monotonic()`` instant), cancel flag and progress sink of one call."""

    def __init__(
        self,
        deadline: Optional[float] = None,
        is_cancelled: Optional[Callable[[], bool]] = None,
        on_progress: Optional[Callable[[ProgressEvent], None]] = None,
        metrics: Optional[Metrics] = None,
    ):
        self.deadline = deadline
        self._is_cancelled = is_cancelled
        self._on_progress = on_progress
        self._metrics = metrics
        self.forward_evaluations = 0
        self.backward_evaluations = 0
        self.vae_evaluations = 0
        self.decoder_backward_evaluations = 0
        self.created_at = time.monotonic()
        self.started_at: Optional[float] = None

    # ---- lifecycle (the executor marks the start of compute)
    def mark_started(self) -> None:
        self.started_at = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since compute started (since creation if never queued)."""
        return time.monotonic() - (self.started_at if self.started_at is not None else self.created_at)

    def queue_seconds(self) -> float:
        return (self.started_at - self.created_at) if self.started_at is not None else 0.0

    # ---- cancellation
    def is_cancelled(self) -> bool:
        return bool(self._is_cancelled and self._is_cancelled())

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def check(self) -> None:
        """Raise ``DeadlineExceeded`` or ``Cancelled`` when the call should stop.

        The deadline is checked first: gRPC also cancels a call whose deadline
        passed, and the deadline is the more useful reason to report."""
        if self.expired():
            raise DeadlineExceeded("the deadline expired before the work finished")
        if self.is_cancelled():
            raise Cancelled("the call was cancelled")

    def unet(self, backward: bool = False) -> None:
        """Check, then count one UNet evaluation (``backward``: a forward+backward pass)."""
        self.check()
        if backward:
            self.backward_evaluations += 1
        else:
            self.forward_evaluations += 1
        metrics = self._metrics if self._metrics is not None else default_metrics()
        metrics.unet_evaluations.labels(kind="backward" if backward else "forward").inc()

    def vae(self) -> None:
        """Check, then count one VAE encode or decode (a 1024^2 image takes seconds on a CPU:
        without this a call past its deadline still ran its decode)."""
        self.check()
        self.vae_evaluations += 1

    def decoder(self) -> None:
        """Check, then count one VAE-decoder forward+backward pass (GradOP+'s optimisation)."""
        self.check()
        self.decoder_backward_evaluations += 1
        metrics = self._metrics if self._metrics is not None else default_metrics()
        metrics.decoder_evaluations.inc()

    # ---- progress
    def progress(self, stage: str, step: int, total: int, message: str = "") -> ProgressEvent:
        event = ProgressEvent(stage, int(step), int(total), message, self.elapsed())
        if self._on_progress is not None:
            self._on_progress(event)
        return event


_active: contextvars.ContextVar[Optional[CallControl]] = contextvars.ContextVar("atelier_active_control", default=None)


@contextlib.contextmanager
def active(control: CallControl):
    """Make ``control`` the one ``check_active`` checks while the block runs (the compute worker
    wraps each call's work in this)."""
    token = _active.set(control)
    try:
        yield control
    finally:
        _active.reset(token)


def check_active() -> None:
    """``check()`` the active call's control, if any (a no-op outside a call: in-process use)."""
    control = _active.get()
    if control is not None:
        control.check()
