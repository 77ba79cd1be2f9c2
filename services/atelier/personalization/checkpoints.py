"""Job checkpoints as artifacts: a run's ``state_dict`` in one ``torch.save`` file, except the
entries the run names in ``checkpoint_parts`` (large tensors that stay the same over many
checkpoints, e.g. EqDiff's class images), each stored as its own artifact and referred to from
the checkpoint by hash.

Artifacts are content-addressed and ``ArtifactStore.put`` skips bytes already stored, so a part
that did not change since the last checkpoint costs a hash, not a write. A part carries its job
id, so no two jobs share one and a job's parts can be deleted with its checkpoint (the store
tracks them, ``JobStore.set_checkpoint(parts=)``). Everything is read back with
``torch.load(weights_only=True)``: a checkpoint on the shared volume is data, never code.
"""
from __future__ import annotations

import io
from typing import Any

import torch

from atelier.personalization.artifacts import ArtifactStore
from atelier.personalization.training import TrainingRun

__all__ = ["write_checkpoint", "read_checkpoint", "PARTS_KEY"]

PARTS_KEY = "artifact_parts"  # in a checkpoint file: {state_dict key: part artifact hash}


def write_checkpoint(artifacts: ArtifactStore, job_id: str, run: TrainingRun) -> tuple[str, list[str]]:
    """Store ``run.state_dict()``; returns (the checkpoint's hash, the hashes of its parts)."""
    state = dict(run.state_dict())
    parts = {}
    for key in getattr(run, "checkpoint_parts", ()):
        if key in state:
            parts[key] = artifacts.put(_saved({"job_id": job_id, "key": key, "tensor": state.pop(key)}))
    if parts:
        state[PARTS_KEY] = parts
    return artifacts.put(_saved(state)), sorted(set(parts.values()))


def read_checkpoint(artifacts: ArtifactStore, digest: str) -> dict[str, Any]:
    """The ``state_dict`` that ``write_checkpoint`` stored under ``digest``, parts filled back in
    (a checkpoint written before parts existed loads as it is)."""
    state = _loaded(artifacts.get(digest))
    for key, part in state.pop(PARTS_KEY, {}).items():
        state[key] = _loaded(artifacts.get(part))["tensor"]
    return state


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loaded(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
