"""EqDiff through the whole service: segmentation masks, a short job on the embedded toy model via
the SDK, generation with the concept, export/import; the concept's metadata carries the
training parameters, so the paper's ablation switches survive the round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest

import atelier
from pers_helpers import concept_image

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from prometheus_client import CollectorRegistry

    from atelier.core.config import ServerConfig
    from atelier.core.metrics import Metrics
    from atelier.core.server import start
    from atelier.personalization.app import PersonalizationApp
    from atelier.segmentation.app import SegmentationApp

    seg_config = ServerConfig(service="segmentation", host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1)
    seg_metrics = Metrics(CollectorRegistry())
    segmentation = start(SegmentationApp(seg_config, metrics=seg_metrics), seg_config, seg_metrics)
    assert segmentation.wait_loaded(120) and segmentation.load_error is None
    config = ServerConfig(service="personalization", host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1,
                          max_image_pixels=256 * 256, extras=dict(
                              data_dir=str(tmp_path_factory.mktemp("eqdiff")), checkpoint_every=2,
                              segmentation_address=segmentation.address, job_poll_seconds=0.1))
    metrics = Metrics(CollectorRegistry())
    app = PersonalizationApp(config, metrics=metrics)  # the build's own methods: EqDiff
    running = start(app, config, metrics)
    app.attach(running)
    assert running.wait_loaded(240) and running.load_error is None
    client = atelier.Client(personalization=running.address, timeout=600)
    yield running, client
    client.close()
    running.stop(1)
    segmentation.stop(1)


def test_eqdiff_job_end_to_end(servers):
    running, client = servers
    assert "eqdiff" in running.app.methods
    pers = client.personalization
    phases = []
    job = pers.train_eqdiff([concept_image(0), concept_image(1)], class_word="box", steps=4,
                            num_class_images=4, batch_size=1, seed=3)
    concept = job.wait(progress=lambda p: phases.append((p.stage, p.step)))
    assert phases == [("class_images", 1), ("train", 2), ("train", 3), ("train", 4), ("train", 5)]
    assert job.state == "SUCCEEDED" and job.step == 5
    assert concept.method == "eqdiff" and concept.token == "<new2>" and concept.model == "toy"
    params = json.loads(concept.metadata["params"])
    assert params["steps"] == 4 and params["rra"] is True and params["class_word"] == "box"
    prompt = f"a {concept.token} on a blue background"
    first = pers.generate(concept, prompt, seed=0, num_inference_steps=4)
    again = pers.generate(concept, prompt, seed=0, num_inference_steps=4)
    assert first.image.size == (64, 64)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    imported = pers.import_(pers.export(concept))
    assert imported.token == concept.token and imported.metadata["params"] == concept.metadata["params"]
    assert np.array_equal(np.asarray(pers.generate(imported, prompt, seed=0, num_inference_steps=4).image),
                          np.asarray(first.image))

    # a file Generate could not use is refused at import, naming the argument (it was stored, and
    # Generate then failed with KeyError: INTERNAL)
    from safetensors.torch import load as load_tensors, save as save_tensors

    from atelier.personalization.concepts import read_metadata
    exported = pers.export(concept)
    metadata = read_metadata(exported)
    for broken in ({k: v for k, v in metadata.items() if k != "params"}, {**metadata, "height": "tall"}):
        with pytest.raises(atelier.InvalidArgumentError) as error:
            pers.import_(save_tensors(load_tensors(exported), metadata=broken))
        assert "safetensors" in str(error.value)

    # 1000 steps (the servicer's maximum) start at t=999, inside the alphas table: the call runs
    # until its deadline (before core.diffusion.set_timesteps its first step indexed t=1000: INTERNAL)
    import grpc

    from atelier.v1 import personalization_pb2, personalization_pb2_grpc
    with grpc.insecure_channel(running.address) as channel:
        stub = personalization_pb2_grpc.PersonalizationStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(personalization_pb2.GenerateConceptRequest(
                concept_id=concept.id, prompt=prompt, num_inference_steps=1000), timeout=3))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.value


def test_eqdiff_ablation_switches_and_bad_parameters(servers):
    _, client = servers
    pers = client.personalization
    job = pers.train_eqdiff([concept_image(0)], class_word="box", steps=2, prior_preservation=False, rra=False,
                            fdte=False, mgdp=False, masks=[np.ones((64, 64), bool)])
    concept = job.wait()
    params = json.loads(concept.metadata["params"])
    assert (params["rra"], params["fdte"], params["mgdp"], params["prior_preservation"]) == (False,) * 4
    for kwargs, field in [(dict(p_low=0.5), "p_original"), (dict(learning_rate=0.0), "learning_rate"),
                          (dict(steps=0), "steps"), (dict(batch_size=0), "batch_size")]:
        with pytest.raises(atelier.InvalidArgumentError) as error:
            pers.train_eqdiff([concept_image(0)], class_word="box", masks=[np.ones((64, 64), bool)], **kwargs)
        assert field in [f for f, _ in error.value.field_violations], (kwargs, error.value)


def test_proto_options_mirror_every_eqdiff_parameter():
    import dataclasses

    from atelier.personalization.eqdiff import EqDiffParams
    from atelier.v1 import personalization_pb2

    on_request = {"class_word", "placeholder_token", "initializer_token"}  # CreateJobRequest fields
    params = {f.name for f in dataclasses.fields(EqDiffParams)}
    options = {f.name for f in personalization_pb2.EqDiffOptions.DESCRIPTOR.fields}
    assert options == params - on_request
    assert on_request <= {f.name for f in personalization_pb2.CreateJobRequest.DESCRIPTOR.fields}
