"""The inversion methods, ProxEdit options and presets through the raw gRPC API (real server on loopback)."""
from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image, ImageDraw

from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.server import start
from atelier.inversion.app import InversionApp
from atelier.sdk.codec import image_from_pil
from atelier.v1 import inversion_pb2, inversion_pb2_grpc


pytestmark = pytest.mark.timeout(300)
PROMPT = "a red circle on a blue background"
TARGET = "a green circle on a blue background"


def scene(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(210, 40, 40))
    return image


@pytest.fixture(scope="module")
def stub():
    config = ServerConfig(service="inversion", host="127.0.0.1", port=0, metrics_port=0, max_image_pixels=128 * 128)
    metrics = Metrics()
    running = start(InversionApp(config, metrics=metrics), config, metrics)
    assert running.wait_loaded(240), "the default model did not load"
    channel = grpc.insecure_channel(running.address)
    yield inversion_pb2_grpc.InversionStub(channel)
    channel.close()
    running.stop(0)


def result_of(events):
    return [e for e in events if e.WhichOneof("event") == "result"][-1].result


def invert(stub, **kwargs) -> inversion_pb2.InversionResult:
    request = inversion_pb2.InvertRequest(image=image_from_pil(scene()), prompt=PROMPT, num_inference_steps=3, **kwargs)
    return result_of(stub.Invert(request, timeout=120))


def violations(error: grpc.RpcError) -> list[str]:
    status: status_pb2.Status = rpc_status.from_call(error)
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


def test_null_text_inversion_returns_embeddings_that_edit_takes_back(stub):
    result = invert(stub, method=inversion_pb2.NULL_TEXT, return_chain=True)
    assert result.method == inversion_pb2.NULL_TEXT
    assert list(result.null_embeddings.shape)[0] == 3
    edited = result_of(stub.Edit(inversion_pb2.EditRequest(inversion=result, target_prompt=TARGET,
                                                           guidance_scale=2.5), timeout=120))
    assert edited.image.data
    result.ClearField("null_embeddings")
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Edit(inversion_pb2.EditRequest(inversion=result, target_prompt=TARGET), timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error.value) == ["source"]


@pytest.mark.parametrize("method", [inversion_pb2.NPI, inversion_pb2.PROXNPI, inversion_pb2.DIRECT_INVERSION,
                                    inversion_pb2.FIXED_POINT, inversion_pb2.DDIM])
def test_every_method_inverts_and_edits_with_its_chain(stub, method):
    result = invert(stub, method=method, return_chain=True)
    assert result.method == method and list(result.chain.shape) == [4, 4, 8, 8]
    edited = result_of(stub.Edit(inversion_pb2.EditRequest(inversion=result, target_prompt=TARGET,
                                                           preset=inversion_pb2.SPDINV_PIPELINE), timeout=120))
    assert edited.image.data


def test_directinversion_without_its_chain_is_refused(stub):
    result = invert(stub, method=inversion_pb2.DIRECT_INVERSION)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Edit(inversion_pb2.EditRequest(inversion=result, target_prompt=TARGET), timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(error.value) == ["source"]


def test_check_first_option_reaches_spdinv(stub):
    lenient = inversion_pb2.SPDInvOptions(loss_threshold=1.0)
    reference = invert(stub, method=inversion_pb2.SPDINV, spdinv=lenient)
    lenient.check_first = True
    check_first = invert(stub, method=inversion_pb2.SPDINV, spdinv=lenient)
    assert [d.rounds for d in reference.diagnostics] == [1, 1, 1]  # the reference always steps once
    assert [d.rounds for d in check_first.diagnostics] == [0, 0, 0]


@pytest.mark.parametrize("request_fields, field", [
    (dict(prox_edit=inversion_pb2.ProxEditOptions(inversion_guidance=True)), "source"),
    (dict(prox_edit=inversion_pb2.ProxEditOptions(quantile=1.5)), "quantile"),
    (dict(p2p=inversion_pb2.P2POptions(reweight={"green": 1e308})), "reweight"),
    (dict(masactrl=inversion_pb2.MasaCtrlOptions(end_step=-1), engine=inversion_pb2.MASACTRL), "end_step"),
    (dict(target_prompt="a green\x1ccircle on a blue background"), "target_prompt"),
    (dict(masactrl=inversion_pb2.MasaCtrlOptions(mask_source_words=["circle"], mask_threshold=2.0),
          engine=inversion_pb2.MASACTRL), None),
])
def test_bad_editing_options_name_the_field(stub, request_fields, field):
    result = invert(stub, method=inversion_pb2.SPDINV, spdinv=inversion_pb2.SPDInvOptions(max_rounds=0))
    request = inversion_pb2.EditRequest(inversion=result, target_prompt=TARGET)
    for name, value in request_fields.items():
        if isinstance(value, (str, int)):
            setattr(request, name, value)
        else:
            getattr(request, name).CopyFrom(value)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Edit(request, timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error.value) == ([field] if field else ["mask_target_words", "mask_threshold"])


def test_foreign_null_embeddings_and_chains_are_invalid_arguments(stub):
    import numpy as np
    from atelier.sdk.codec import tensor_from_numpy

    result = invert(stub, method=inversion_pb2.NULL_TEXT)
    result.null_embeddings.CopyFrom(tensor_from_numpy(np.zeros((3, 5, 7), np.float32)))
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Edit(inversion_pb2.EditRequest(inversion=result, target_prompt=TARGET), timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(error.value) == ["source"]
    chained = invert(stub, method=inversion_pb2.DIRECT_INVERSION)
    chained.chain.CopyFrom(tensor_from_numpy(np.full((4, 4, 8, 8), np.nan, np.float32)))
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Edit(inversion_pb2.EditRequest(inversion=chained, target_prompt=TARGET), timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(error.value) == ["source.chain"]


def test_masactrl_mask_auto_through_the_service(stub):
    result = invert(stub, method=inversion_pb2.DDIM)
    request = inversion_pb2.EditRequest(inversion=result, target_prompt="a red square on a blue background",
                                        engine=inversion_pb2.MASACTRL, guidance_scale=2.5,
                                        masactrl=inversion_pb2.MasaCtrlOptions(mask_source_words=["circle"],
                                                                               mask_target_words=["square"]))
    assert result_of(stub.Edit(request, timeout=120)).image.data
    request.masactrl.mask_target_words[:] = ["zebra"]
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Edit(request, timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(error.value) == ["mask_target_words"]
