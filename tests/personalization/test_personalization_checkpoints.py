"""Job checkpoints as artifacts (the worker's format), with a real EqDiff run on the toy model:
the class images are stored once, as their own artifact, not inside every checkpoint, and a
run resumed from that format continues bit for bit."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from atelier.core.control import CallControl
from atelier.core.models import ModelRegistry
from atelier.personalization.artifacts import ArtifactStore
from atelier.personalization.checkpoints import PARTS_KEY, read_checkpoint, write_checkpoint
from atelier.personalization.eqdiff.params import EqDiffParams
from atelier.personalization.eqdiff.run import EqDiffRun
from atelier.toyworld import world

# one "class_images" step (3 images from the base model), then 3 training steps
PARAMS = EqDiffParams(class_word="box", steps=3, num_class_images=3, class_image_steps=2)


@pytest.fixture(scope="module")
def model():
    return ModelRegistry().load_sd("toy")


def _concept_data():
    scenes = [world.draw_concept("checker_box", i) for i in range(3)]
    masks = torch.from_numpy(np.stack([scene.masks[0] for scene in scenes]))[:, None]
    return world.to_tensor_batch(scenes), masks


def _steps(run, count):
    return [run.step(CallControl()) for _ in range(count)]


def _stored_bytes(artifacts: ArtifactStore) -> int:
    return sum(path.stat().st_size for path in artifacts.root.rglob("*") if path.is_file())


def test_class_images_are_stored_once_and_resume_is_bit_exact(model, tmp_path):
    images, masks = _concept_data()
    straight = EqDiffRun(model, images, masks, PARAMS, seed=5)
    reports = _steps(straight, 4)
    artifacts = ArtifactStore(tmp_path)

    run = EqDiffRun(model, images, masks, PARAMS, seed=5)
    _steps(run, 2)  # the class phase is done
    class_u8 = run.state_dict()["class_images_u8"]
    assert class_u8.shape == (3, 3, 64, 64) and class_u8.dtype == torch.uint8
    image_bytes = bytes(class_u8.untyped_storage())  # what torch.save writes, in its memory layout
    first, first_parts = write_checkpoint(artifacts, "job-1", run)
    assert len(first_parts) == 1 and image_bytes in artifacts.get(first_parts[0])
    stored = _stored_bytes(artifacts)

    _steps(run, 1)
    second, second_parts = write_checkpoint(artifacts, "job-1", run)
    checkpoint = artifacts.get(second)
    assert second != first and second_parts == first_parts
    # the checkpoint names the class images by hash instead of carrying them ...
    assert image_bytes not in checkpoint
    assert torch.load(io.BytesIO(checkpoint), weights_only=True)[PARTS_KEY] == {"class_images_u8": first_parts[0]}
    # ... and the only new bytes stored are the checkpoint's own
    assert _stored_bytes(artifacts) == stored + len(checkpoint)
    # another job's identical images are its own file (deleted with its own checkpoint)
    assert write_checkpoint(artifacts, "job-2", run)[1] != first_parts

    resumed = EqDiffRun(model, images, masks, PARAMS, seed=5)
    resumed.load_state_dict(read_checkpoint(artifacts, second))
    assert resumed.step_index == 3 and torch.equal(resumed.state_dict()["class_images_u8"], class_u8)
    assert write_checkpoint(artifacts, "job-1", resumed)[1] == first_parts  # a resumed job reuses its part
    assert [r.losses for r in _steps(resumed, 1)] == [reports[3].losses]
    a, b = straight.finish(), resumed.finish()
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_a_checkpoint_from_before_parts_still_loads(model, tmp_path):
    images, masks = _concept_data()
    run = EqDiffRun(model, images, masks, PARAMS, seed=5)
    _steps(run, 1)
    artifacts = ArtifactStore(tmp_path)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)  # the single-file format earlier workers wrote
    assert bytes(run.state_dict()["class_images_u8"].untyped_storage()) in buffer.getvalue()  # carried inline
    state = read_checkpoint(artifacts, artifacts.put(buffer.getvalue()))
    assert PARTS_KEY not in state and torch.equal(state["class_images_u8"], run.state_dict()["class_images_u8"])
