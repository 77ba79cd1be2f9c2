"""Edits with a personalization concept: real segmentation, personalization and inversion servers
on loopback; two very short EqDiff jobs on the embedded toy model give the concepts."""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import atelier
from atelier.sdk.errors import AtelierError

sys.path.insert(0, str(Path(__file__).parents[1] / "personalization"))
from pers_helpers import concept_image  # noqa: E402

pytestmark = pytest.mark.timeout(600)
SOURCE = "a red circle on a blue background"
STEPS = 6


def scene(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(210, 40, 40))
    return image


def _start(app_class, config, **kwargs):
    from prometheus_client import CollectorRegistry

    from atelier.core.metrics import Metrics
    from atelier.core.server import start

    metrics = Metrics(CollectorRegistry())
    app = app_class(config, metrics=metrics, **kwargs)
    running = start(app, config, metrics)
    return app, running


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from atelier.core.config import ServerConfig
    from atelier.inversion.app import InversionApp
    from atelier.personalization.app import PersonalizationApp
    from atelier.segmentation.app import SegmentationApp

    seg_config = ServerConfig(service="segmentation", host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1)
    _, segmentation = _start(SegmentationApp, seg_config)
    assert segmentation.wait_loaded(120) and segmentation.load_error is None
    config = ServerConfig(service="personalization", host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1,
                          max_image_pixels=256 * 256, extras=dict(
                              data_dir=str(tmp_path_factory.mktemp("concepts")), checkpoint_every=100,
                              segmentation_address=segmentation.address, job_poll_seconds=0.1))
    app, personalization = _start(PersonalizationApp, config)
    app.attach(personalization)
    assert personalization.wait_loaded(240) and personalization.load_error is None
    inv_config = ServerConfig(service="inversion", host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1,
                              max_image_pixels=128 * 128,
                              extras=dict(personalization_address=personalization.address))
    inv_app, inversion = _start(InversionApp, inv_config)
    assert inversion.wait_loaded(240) and inversion.load_error is None
    client = atelier.Client(personalization=personalization.address, inversion=inversion.address, timeout=600)
    pers = client.personalization
    # Two concepts: the segmented subject with RRA (not used by edits) and a second one without.
    first = pers.train_eqdiff([concept_image(0), concept_image(1)], class_word="box", steps=4,
                              num_class_images=2, batch_size=1, seed=3, learning_rate=0.05).wait()
    second = pers.train_eqdiff([concept_image(2)], class_word="box", steps=3, prior_preservation=False,
                               rra=False, masks=[np.ones((64, 64), bool)], seed=5, learning_rate=0.05).wait()
    yield dict(client=client, personalization=personalization, inversion=inversion, inv_app=inv_app,
               concepts=(first, second))
    client.close()
    inversion.stop(1)
    personalization.stop(1)
    segmentation.stop(1)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def _edit(client, inv, concept, token: str, **kwargs):
    return client.inversion.edit(inv, f"a red {token} on a blue background", concept=concept, **kwargs)


@pytest.fixture(scope="module")
def inverted(servers):
    return servers["client"].inversion.invert(scene(), SOURCE, num_inference_steps=STEPS)


def test_concept_changes_the_edit_and_leaves_the_source_branch(servers, inverted):
    client, (concept, _) = servers["client"], servers["concepts"]
    with_concept = _edit(client, inverted, concept, concept.token, return_source=True)
    # Without it: the concept's class word where its token stands (the embedding's starting point).
    plain = client.inversion.edit(inverted, "a red box on a blue background", return_source=True)
    assert with_concept.image.size == (64, 64)
    assert np.abs(_pixels(with_concept) - _pixels(plain)).max() > 0
    # Nor the token left to the tokenizer (what a server that ignored the concept would draw).
    ignored = client.inversion.edit(inverted, f"a red {concept.token} on a blue background")
    assert np.abs(_pixels(with_concept) - _pixels(ignored)).max() > 0
    # The concept acts on the target branch only: the source branch reconstructs as without it.
    assert np.array_equal(np.asarray(with_concept.source_image), np.asarray(plain.source_image))
    # MasaCtrl composes the same way (its mutual self-attention; the concept on cross-attention).
    masactrl = _edit(client, inverted, concept, concept.token, engine="masactrl", return_source=True)
    masactrl_plain = client.inversion.edit(inverted, "a red box on a blue background", engine="masactrl",
                                           return_source=True)
    assert np.abs(_pixels(masactrl) - _pixels(masactrl_plain)).max() > 0
    assert np.array_equal(np.asarray(masactrl.source_image), np.asarray(masactrl_plain.source_image))
    # By id, and again (from the cache, keyed by content hash): the same image.
    again = _edit(client, inverted, concept.id, concept.token)
    assert np.array_equal(_pixels(again), _pixels(with_concept))
    assert concept.content_hash in servers["inv_app"].concepts.cached_hashes()


def test_concurrent_edits_each_get_their_own_concept(servers, inverted):
    client, concepts = servers["client"], servers["concepts"]
    alone = [_pixels(_edit(client, inverted, c, c.token)) for c in concepts]
    assert not np.array_equal(alone[0], alone[1])
    base = _pixels(client.inversion.edit(inverted, f"a red {concepts[0].token} on a blue background"))
    results: dict = {}

    def run(index: int, concept) -> None:
        results[index] = _pixels(_edit(client, inverted, concept, concept.token)) if concept is not None else \
            _pixels(client.inversion.edit(inverted, f"a red {concepts[0].token} on a blue background"))

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate([*concepts, None] * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(len(threads)):
        expected = (alone + [base])[i % 3]
        assert np.array_equal(results[i], expected), f"call {i} saw another call's concept"


def test_edit_with_concept_inverts_and_edits_sync_and_asyncio(servers, inverted):
    client, (concept, _) = servers["client"], servers["concepts"]
    target = f"a red {concept.token} on a blue background"
    one_call = client.edit_with_concept(scene(), SOURCE, target, concept, num_inference_steps=STEPS)
    # Inverting inside Edit keeps the chain (SPDInv's inversion guidance uses it): send it back to compare.
    with_chain = client.inversion.invert(scene(), SOURCE, num_inference_steps=STEPS, return_chain=True)
    two_calls = _edit(client, with_chain, concept, concept.token)
    assert np.array_equal(_pixels(one_call), _pixels(two_calls))

    async def run_async():
        async with atelier.aio.Client(inversion=servers["inversion"].address, timeout=600) as aclient:
            via_edit = await aclient.inversion.edit(with_chain, target, concept=concept.id)
            via_helper = await aclient.edit_with_concept(scene(), SOURCE, target, concept, num_inference_steps=STEPS)
            return via_edit, via_helper

    via_edit, via_helper = asyncio.run(run_async())
    assert np.array_equal(_pixels(via_edit), _pixels(two_calls))
    assert np.array_equal(_pixels(via_helper), _pixels(one_call))


def test_bad_concepts_and_prompts(servers, inverted):
    client, (concept, _) = servers["client"], servers["concepts"]
    with pytest.raises(AtelierError) as info:
        _edit(client, inverted, "no-such-concept", concept.token)
    assert info.value.code.name == "NOT_FOUND"
    with pytest.raises(AtelierError) as info:
        client.inversion.edit(inverted, "a red box on a blue background", concept=concept)
    assert info.value.code.name == "INVALID_ARGUMENT" and "target_prompt" in str(info.value)
    with pytest.raises(TypeError):
        client.inversion.edit(inverted, "a red box", concept=3)


@pytest.mark.parametrize("down", ["refused", "silent"])
def test_personalization_down_or_hung_names_it_within_the_deadline(down, monkeypatch):
    """Refused: UNAVAILABLE. Hung (a socket that accepts and never speaks): DEADLINE_EXCEEDED when
    the caller's deadline (less the margin) bounded the fetch, UNAVAILABLE when our own cap did."""
    import socket
    import time

    from atelier.core.config import ServerConfig
    from atelier.inversion import concept_source
    from atelier.inversion.app import InversionApp

    silent = socket.socket()  # accepts connections (backlog) and never speaks: a hung dependency
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    address = "127.0.0.1:1" if down == "refused" else f"127.0.0.1:{silent.getsockname()[1]}"
    config = ServerConfig(service="inversion", host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1,
                          max_image_pixels=128 * 128, extras=dict(personalization_address=address))
    _, running = _start(InversionApp, config)

    def edit(timeout: float) -> AtelierError:
        started = time.monotonic()
        with pytest.raises(AtelierError) as info:
            client.inversion.edit(inv, "a red <new2> on a blue background", concept="any", timeout=timeout)
        assert time.monotonic() - started < timeout
        assert "personalization" in str(info.value), info.value
        return info.value

    try:
        assert running.wait_loaded(240) and running.load_error is None
        with atelier.Client(inversion=running.address, timeout=30, retries=0) as client:
            inv = client.inversion.invert(scene(), SOURCE, num_inference_steps=2)
            if down == "refused":
                assert edit(timeout=4).code.name == "UNAVAILABLE"
            else:
                # The fetch's cap (60 s) is past the caller's 4 s: the caller's budget ran out.
                assert edit(timeout=4).code.name == "DEADLINE_EXCEEDED"
                # A cap shorter than the caller's deadline: the dependency did not answer in time.
                monkeypatch.setattr(concept_source, "FETCH_TIMEOUT_SECONDS", 1.0)
                assert edit(timeout=10).code.name == "UNAVAILABLE"
    finally:
        running.stop(0)
        silent.close()


def test_concept_cache_is_bounded_in_bytes():
    from atelier.inversion.concept_source import ConceptSource
    from atelier.personalization.training import Concept

    source = ConceptSource(None, cache_bytes=100)
    for name, size in (("a", 40), ("b", 40), ("c", 40), ("huge", 101)):
        source._put(name, Concept(tensors={}), size)
    assert source.cached_hashes() == ["b", "c"]
    assert source._get("b") is not None  # used: "c" is now the oldest
    source._put("d", Concept(tensors={}), 40)
    assert source.cached_hashes() == ["b", "d"]


@pytest.mark.parametrize("metadata, words", [
    (dict(method="layer_edit", base_model="toy"), "layer_edit concepts cannot be used in Edit"),
    (dict(method="eqdiff", base_model="other-sd"), "base model 'other-sd'"),
    (dict(method="textual_inversion", base_model="toy"), "eqdiff only"),
])
def test_concepts_of_another_kind_or_model_are_failed_precondition(metadata, words):
    from atelier.core.errors import FailedPrecondition
    from atelier.inversion.concept_edit import check_concept_kind

    with pytest.raises(FailedPrecondition, match=words):
        check_concept_kind(metadata, "toy")
    check_concept_kind(dict(method="eqdiff", base_model="toy"), "toy")


def test_request_id_reaches_personalization(servers, inverted, caplog):
    import grpc

    from atelier.v1 import inversion_pb2, inversion_pb2_grpc

    caplog.set_level("INFO")
    concept = servers["concepts"][0]
    request = inversion_pb2.EditRequest(inversion=inverted.proto, concept_id=concept.id,
                                        target_prompt=f"a red {concept.token} on a blue background")
    with grpc.insecure_channel(servers["inversion"].address) as channel:
        events = list(inversion_pb2_grpc.InversionStub(channel).Edit(
            request, timeout=120, metadata=(("x-request-id", "concept-edit-rid-7"),)))
    assert events[-1].HasField("result")
    logged = [r.getMessage() for r in caplog.records if "concept-edit-rid-7" in r.getMessage()]
    assert any("Personalization/GetConcept" in m for m in logged), logged
