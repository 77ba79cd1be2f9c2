"""client.inversion against a real loopback server: requests, decoding, progress, edit."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from sdk_fakes import LATENT_SHAPE, latent_for
from PIL import Image

import atelier
from atelier.sdk import codec
from atelier.v1 import inversion_pb2, tensor_pb2


def scene() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)


def test_invert_sends_the_request_and_decodes_the_result(fake_and_client):
    fake, client = fake_and_client
    inversion = client.inversion.invert(
        Image.fromarray(scene()), "a cat", method="spdinv", num_inference_steps=4, return_chain=True,
        max_rounds=7, learning_rate=2e-3, loss_threshold=1e-5, weight_decay=0.0, model="toy",
    )

    request = fake.requests[0]
    assert np.array_equal(codec.image_to_array(request.image), scene())
    assert (request.prompt, request.method, request.num_inference_steps, request.return_chain) == ("a cat", inversion_pb2.SPDINV, 4, True)
    assert request.model.name == "toy"
    assert request.spdinv.max_rounds == 7 and request.spdinv.learning_rate == 2e-3
    assert request.spdinv.loss_threshold == 1e-5
    assert request.spdinv.HasField("weight_decay") and request.spdinv.weight_decay == 0.0

    assert isinstance(inversion.z_T, np.ndarray) and inversion.z_T.dtype == np.float32
    assert np.array_equal(inversion.z_T, latent_for("a cat"))
    assert inversion.chain.shape == (5,) + LATENT_SHAPE[1:]
    assert np.array_equal(inversion.chain[2], latent_for("a cat")[0] * 2)
    assert [d.index for d in inversion.diagnostics] == [1, 2, 3, 4]
    assert inversion.diagnostics[1] == atelier.StepDiagnostics(index=2, timestep=40, residual=5e-4, rounds=2)
    assert inversion.usage == atelier.Usage(7, 5, 1.5, 0.0)
    assert (inversion.prompt, inversion.method, inversion.num_inference_steps) == ("a cat", "spdinv", 4)
    assert (inversion.width, inversion.height, inversion.model) == (24, 16, "toy")


def test_invert_defaults_leave_spdinv_options_to_the_server(fake_and_client):
    fake, client = fake_and_client
    inversion = client.inversion.invert(scene(), "a dog", method="DDIM")
    request = fake.requests[0]
    assert request.method == inversion_pb2.DDIM and request.num_inference_steps == 50 and not request.return_chain
    assert not any(request.spdinv.HasField(name) for name in ("max_rounds", "learning_rate", "loss_threshold", "weight_decay"))
    assert inversion.chain is None and inversion.method == "ddim"


def test_float_images_in_unit_range_are_quantised(fake_and_client):
    fake, client = fake_and_client
    pixels = scene()
    client.inversion.invert(pixels.astype(np.float64) / 255.0, "x", num_inference_steps=1)
    assert np.array_equal(codec.image_to_array(fake.requests[0].image), pixels)


@pytest.mark.parametrize(
    "image, complaint",
    [
        (np.full((16, 24, 3), 1.5), "in \\[0, 1\\]"),
        (np.zeros((16, 24), np.uint8), "\\(H, W, 3\\)"),
        (np.zeros((16, 24, 3), np.int32), "dtype int32"),
        ("no-such-cat.png", "image: cannot read 'no-such-cat.png'"),
        (b"GIF89a-but-not-really", "image: not an image file"),
        (3.5, "a PIL image, a numpy array, a path or the bytes"),
    ],
)
def test_unusable_images_fail_before_sending(fake_and_client, image, complaint):
    fake, client = fake_and_client
    with pytest.raises((ValueError, TypeError), match=complaint):
        client.inversion.invert(image, "x")
    with pytest.raises(ValueError, match="unknown inversion method"):
        client.inversion.invert(scene(), "x", method="null-text")
    assert fake.attempts == 0


def test_progress_callback_receives_every_event_in_order(fake_and_client):
    _, client = fake_and_client
    events = []
    client.inversion.invert(scene(), "x", num_inference_steps=3, progress=events.append)
    assert events == [
        atelier.Progress("invert", 1, 3, "", 0.5),
        atelier.Progress("invert", 2, 3, "", 1.0),
    ]


def test_progress_true_draws_a_tqdm_bar(fake_and_client, capsys):
    pytest.importorskip("tqdm")
    _, client = fake_and_client
    client.inversion.invert(scene(), "x", num_inference_steps=3, progress=True)
    assert "invert" in capsys.readouterr().err


def test_progress_true_without_tqdm_is_a_clear_error_before_sending(fake_and_client, monkeypatch):
    fake, client = fake_and_client
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="atelier-client\\[progress\\]"):
        client.inversion.invert(scene(), "x", progress=True)
    assert fake.attempts == 0


def test_edit_sends_the_inversion_back_unchanged_and_returns_an_edit_result(fake_and_client):
    fake, client = fake_and_client
    inversion = client.inversion.invert(scene(), "a cat", num_inference_steps=4)
    edited = client.inversion.edit(
        inversion, "a dog", guidance_scale=5.0, mode="replace", cross_replace_fraction=0.7, self_replace_fraction=0.5,
        reweight={"dog": 2.0}, blend_words=["cat", "dog"], blend_threshold=0.4,
    )
    assert isinstance(edited, atelier.EditResult) and isinstance(edited.image, Image.Image)
    assert edited.image.size == (24, 16) and edited.image.getpixel((0, 0)) == (200, 10, 10)
    assert edited.source_image is None and edited.usage.unet_forward_evaluations == 3

    request = fake.requests[1]
    assert request.WhichOneof("source") == "inversion" and request.inversion == inversion.proto
    assert (request.target_prompt, request.engine, request.guidance_scale) == ("a dog", inversion_pb2.P2P, 5.0)
    p2p = request.p2p
    assert (p2p.mode, p2p.cross_replace_fraction, p2p.self_replace_fraction) == (inversion_pb2.P2POptions.REPLACE, 0.7, 0.5)
    assert dict(p2p.reweight) == {"dog": 2.0} and list(p2p.blend_words) == ["cat", "dog"]
    assert p2p.blend_threshold == pytest.approx(0.4)
    assert not request.HasField("masactrl")


def test_edit_an_image_inverts_it_in_the_same_call(fake_and_client):
    fake, client = fake_and_client
    result = client.inversion.edit(
        scene(), "a dog", engine="masactrl", source_prompt="a cat", method="ddim", num_inference_steps=10,
        start_step=2, start_layer=5, return_source=True, model="toy",
    )
    request = fake.requests[0]
    assert request.WhichOneof("source") == "invert"
    assert (request.invert.prompt, request.invert.method, request.invert.num_inference_steps) == ("a cat", inversion_pb2.DDIM, 10)
    assert np.array_equal(codec.image_to_array(request.invert.image), scene())
    assert request.model.name == request.invert.model.name == "toy"
    assert request.engine == inversion_pb2.MASACTRL and request.return_source
    assert (request.masactrl.start_step, request.masactrl.start_layer) == (2, 5)
    assert isinstance(result.image, Image.Image) and isinstance(result.source_image, Image.Image)
    assert result.usage.unet_forward_evaluations == 3


def test_edit_without_return_source_has_no_source_image(fake_and_client):
    _, client = fake_and_client
    result = client.inversion.edit(scene(), "a dog", source_prompt="a cat")
    assert result.source_image is None


def test_edit_rejects_contradictory_arguments_before_sending(fake_and_client):
    fake, client = fake_and_client
    inversion = client.inversion.invert(scene(), "a cat", num_inference_steps=4)
    with pytest.raises(ValueError, match="source_prompt is required"):
        client.inversion.edit(scene(), "a dog")
    with pytest.raises(ValueError, match="start_step do not apply to engine='p2p'"):
        client.inversion.edit(inversion, "a dog", start_step=0)
    with pytest.raises(ValueError, match="blend_words do not apply to engine='masactrl'"):
        client.inversion.edit(inversion, "a dog", engine="masactrl", blend_words=["dog"])
    with pytest.raises(ValueError, match="num_inference_steps 8 \\(inverted with 4\\)"):
        client.inversion.edit(inversion, "a dog", num_inference_steps=8)
    with pytest.raises(ValueError, match="unknown editing engine"):
        client.inversion.edit(inversion, "a dog", engine="instructpix2pix")
    assert fake.attempts == 1


def test_an_inversion_survives_serialisation(fake_and_client):
    fake, client = fake_and_client
    inversion = client.inversion.invert(scene(), "a cat", num_inference_steps=3, return_chain=True)
    restored = atelier.Inversion.from_bytes(inversion.to_bytes())
    assert np.array_equal(restored.z_T, inversion.z_T) and np.array_equal(restored.chain, inversion.chain)
    assert restored.diagnostics == inversion.diagnostics
    client.inversion.edit(restored, "a dog")
    assert fake.requests[-1].inversion == inversion.proto


def test_images_are_accepted_as_paths_and_file_bytes(fake_and_client, tmp_path):
    fake, client = fake_and_client
    pixels = scene()
    png, jpeg, rgba = tmp_path / "scene.png", tmp_path / "scene.jpg", tmp_path / "scene-rgba.png"
    Image.fromarray(pixels).save(png)
    Image.fromarray(pixels).save(jpeg, quality=90)
    Image.fromarray(pixels).convert("RGBA").save(rgba)
    client.inversion.invert(png, "x")
    client.inversion.invert(str(jpeg), "x")
    client.inversion.invert(png.read_bytes(), "x")
    client.inversion.invert(rgba, "x")
    client.inversion.edit(jpeg.read_bytes(), "y", source_prompt="x")
    sent = [fake.requests[i].image for i in range(4)] + [fake.requests[4].invert.image]
    assert sent[0].data == png.read_bytes() and sent[0].encoding == tensor_pb2.Image.PNG  # sent as is
    assert sent[1].data == jpeg.read_bytes() and sent[1].encoding == tensor_pb2.Image.JPEG
    assert (sent[1].width, sent[1].height) == (24, 16)
    assert sent[2].data == png.read_bytes()
    assert np.array_equal(codec.image_to_array(sent[3]), pixels)  # RGBA -> RGB PNG
    assert sent[4].data == jpeg.read_bytes()


def test_results_have_short_readable_reprs(fake_and_client):
    _, client = fake_and_client
    inversion = client.inversion.invert(scene(), "a cat", num_inference_steps=3, return_chain=True)
    text = repr(inversion)
    assert text.startswith("Inversion(model='toy', method='spdinv', prompt='a cat', num_inference_steps=3, size=24x16")
    assert "z_T=float32[1, 4, 2, 3]" in text and "chain=float32[4, 4, 2, 3]" in text and "usage=Usage(" in text
    assert len(text) < 400  # shapes, not values
    edited = client.inversion.edit(inversion, "a dog")
    assert repr(edited) == ("EditResult(image=<PIL RGB 24x16>, source_image=None, usage=Usage(unet_forward_evaluations=3, "
                            "unet_backward_evaluations=0, wall_seconds=0.000, queue_seconds=0.000))")


def test_every_inversion_option_lands_in_its_request_field():
    from atelier.sdk.inversion import invert_request

    fixed = invert_request(scene(), "a cat", method="fixed_point", max_rounds=4, loss_threshold=1e-4, anderson_memory=0)
    assert fixed.method == inversion_pb2.FIXED_POINT and not fixed.HasField("spdinv")
    assert (fixed.fixed_point.max_rounds, fixed.fixed_point.loss_threshold) == (4, 1e-4)
    assert fixed.fixed_point.HasField("anderson_memory") and fixed.fixed_point.anderson_memory == 0
    spd = invert_request(scene(), "a cat", max_rounds=4, check_first=False)
    assert spd.spdinv.max_rounds == 4 and spd.spdinv.HasField("check_first") and not spd.spdinv.check_first
    assert not spd.HasField("fixed_point") and not spd.HasField("null_text")
    nti = invert_request(scene(), "a cat", method="Null_Text", null_text_guidance_scale=5.0)
    assert nti.method == inversion_pb2.NULL_TEXT and nti.null_text.guidance_scale == 5.0
    for name, value in [("npi", inversion_pb2.NPI), ("proxnpi", inversion_pb2.PROXNPI),
                        ("direct_inversion", inversion_pb2.DIRECT_INVERSION), ("ddim", inversion_pb2.DDIM)]:
        assert invert_request(scene(), "a cat", method=name).method == value


def test_every_edit_option_lands_in_its_request_field():
    from atelier.sdk.inversion import edit_request

    p2p = edit_request(scene(), "a dog", source_prompt="a cat", method="fixed_point", anderson_memory=2,
                       preset="SPDInv", proximal_guidance=False, quantile=0.5, inversion_guidance=True,
                       inversion_guidance_timestep=300)
    assert p2p.invert.method == inversion_pb2.FIXED_POINT and p2p.invert.fixed_point.anderson_memory == 2
    assert p2p.preset == inversion_pb2.SPDINV_PIPELINE
    prox = p2p.prox_edit
    assert (prox.HasField("proximal_guidance"), prox.proximal_guidance, prox.quantile) == (True, False, 0.5)
    assert (prox.inversion_guidance, prox.inversion_guidance_timestep) == (True, 300)
    assert not p2p.HasField("masactrl")
    masa = edit_request(scene(), "a dog", "masactrl", source_prompt="a cat", end_step=30,
                        mask_source_words=("cat",), mask_target_words=["dog"], mask_threshold=0.2)
    assert (masa.masactrl.end_step, list(masa.masactrl.mask_source_words), list(masa.masactrl.mask_target_words)) == \
        (30, ["cat"], ["dog"])
    assert masa.masactrl.mask_threshold == pytest.approx(0.2)
    assert masa.preset == inversion_pb2.EDIT_PRESET_UNSPECIFIED and not masa.HasField("prox_edit")


def test_null_text_embeddings_are_decoded_and_sent_back(fake_and_client):
    from atelier.sdk.codec import tensor_from_numpy

    fake, client = fake_and_client
    inversion = client.inversion.invert(scene(), "a cat", num_inference_steps=3)
    assert inversion.null_embeddings is None and "null_embeddings=None" in repr(inversion)
    result = inversion_pb2.InversionResult()
    result.CopyFrom(inversion.proto)
    embeddings = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)
    result.null_embeddings.CopyFrom(tensor_from_numpy(embeddings))
    restored = atelier.Inversion.from_bytes(atelier.Inversion.from_proto(result).to_bytes())
    assert np.array_equal(restored.null_embeddings, embeddings) and "null_embeddings=float32[3, 5, 7]" in repr(restored)
    client.inversion.edit(restored, "a dog")
    assert fake.requests[-1].inversion.null_embeddings == result.null_embeddings
