"""The interface between the personalization job system and its training methods.

The job system (store, leases, checkpoints, gRPC) knows nothing about EqDiff or
LayerDiffusion; a method knows nothing about jobs. A method is a ``TrainingRun``:
a resumable sequence of optimisation steps whose whole state fits in one
``state_dict`` (trainable tensors, optimiser state, RNG states, step index), so a
job that lost its pod resumes from its last checkpoint on any replica and gives
the same result as an uninterrupted run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from atelier.core.control import CallControl

__all__ = ["Concept", "TrainingRun", "StepReport"]


@dataclass
class Concept:
    """What a finished training leaves behind: named tensors plus string metadata.

    Stored as one safetensors file (tensors, and the metadata in its header):
    ``metadata`` holds at least ``base_model``, ``method``, ``placeholder_token``
    and the training parameters (JSON-encoded where not plain strings).
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class StepReport:
    """One optimisation step: its index (1-based, after the step), phase and losses."""

    step: int
    phase: str
    losses: dict[str, float]
    preview: torch.Tensor | None = None  # optional (3,H,W) image in [0,1]


class TrainingRun(Protocol):
    """A resumable training method. Pure: tensors in, tensors out, no gRPC, no SQL."""

    total_steps: int  # over all phases
    step_index: int  # steps completed so far (0 before the first)
    # Optional: ``state_dict`` keys of large tensors that stay the same over many checkpoints
    # (e.g. generated class images). The job worker stores each as its own content-addressed
    # artifact that the checkpoint refers to by hash, so unchanged bytes are written once.
    checkpoint_parts: tuple[str, ...] = ()

    def step(self, control: CallControl) -> StepReport:
        """Run exactly one optimisation step. Calls ``control.unet(backward=...)``
        before every UNet call (so cancel/deadline stop it within one evaluation)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (torch.save-able): trainables, optimiser, RNG, step."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def finish(self) -> Concept:
        """The trained artifact; only valid once ``step_index == total_steps``."""
        ...
