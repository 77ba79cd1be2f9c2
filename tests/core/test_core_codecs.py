"""Codecs (SDK numpy/PIL and server torch wrappers), error statuses, config parsing."""
import struct
import zlib

import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2

from atelier.core import codecs
from atelier.core.config import ServerConfig
from atelier.core.control import CallControl
from atelier.core.errors import InvalidArgument, NotFound, to_grpc_status
from atelier.sdk import codec
from atelier.sdk.codec import CodecError
from atelier.v1 import tensor_pb2

pytestmark = pytest.mark.timeout(60)

RNG = np.random.default_rng(0)
ARRAYS = {
    "FP32": RNG.standard_normal((2, 3, 4)).astype(np.float32),
    "FP16": RNG.standard_normal((5,)).astype(np.float16),
    "INT64": RNG.integers(-(2**40), 2**40, (3, 2)),
    "UINT8": RNG.integers(0, 256, (4, 4), dtype=np.uint8),
    "BOOL": RNG.random((3, 1, 2)) > 0.5,
}


@pytest.mark.parametrize("datatype", sorted(ARRAYS))
def test_numpy_round_trip(datatype):
    original = ARRAYS[datatype]
    message = tensor_pb2.Tensor.FromString(codec.tensor_from_numpy(original, "x").SerializeToString())
    assert message.datatype == datatype and list(message.shape) == list(original.shape)
    decoded = codec.tensor_to_numpy(message, "x")
    assert decoded.dtype == original.dtype and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, original)


def test_bf16_bits_match_torch_and_round_trip():
    values = np.concatenate([RNG.standard_normal(1000).astype(np.float32) * 1e3, [0.0, -0.0, np.inf, -np.inf]])
    ours = codec.float32_to_bf16_bits(values.astype(np.float32))
    theirs = torch.from_numpy(values.astype(np.float32)).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    message = codec.tensor_from_numpy(values.astype(np.float32), datatype="BF16")
    assert message.datatype == "BF16" and len(message.raw) == 2 * values.size
    np.testing.assert_array_equal(codec.bf16_bits_to_float32(codec.tensor_to_numpy(message)),
                                  torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16).float().numpy())
    assert np.isnan(codec.bf16_bits_to_float32(codec.float32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_torch_round_trip(dtype):
    original = (torch.randn(2, 4, 3, 3) * 10).to(dtype)
    message = codecs.tensor_from_torch(original, "z")
    decoded = codecs.tensor_to_torch(message, "z")
    assert decoded.dtype == dtype
    assert torch.equal(decoded, original)


def test_torch_conversion_and_shape_check():
    message = codecs.tensor_from_torch(torch.ones(1, 4, 2, 2, dtype=torch.float16))
    assert codecs.tensor_to_torch(message, dtype=torch.float32, shape=(1, 4, None, None)).dtype == torch.float32
    with pytest.raises(InvalidArgument) as caught:
        codecs.tensor_to_torch(message, "request.z_t", shape=(1, 3, None, None))
    assert caught.value.violations[0][0] == "request.z_t.shape"
    with pytest.raises(TypeError):
        codecs.tensor_from_torch(torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("message, field, words", [
    (tensor_pb2.Tensor(datatype="FP32", shape=[2, 3], raw=b"\0" * 20), "req.z.raw", "needs 24"),
    (tensor_pb2.Tensor(datatype="FP64", shape=[2], raw=b"\0" * 16), "req.z.datatype", "unknown datatype"),
    (tensor_pb2.Tensor(datatype="", shape=[2], raw=b"\0" * 8), "req.z.datatype", "empty"),
    (tensor_pb2.Tensor(datatype="FP32", shape=[2, -3], raw=b""), "req.z.shape", "positive"),
    (tensor_pb2.Tensor(datatype="UINT8", shape=[0], raw=b""), "req.z.shape", "positive"),
    (tensor_pb2.Tensor(datatype="BOOL", shape=[2], raw=b"\x01\x02"), "req.z.raw", "0 or 1"),
])
def test_malformed_tensors_name_the_field(message, field, words):
    with pytest.raises(CodecError) as caught:
        codec.tensor_to_numpy(message, "req.z")
    assert caught.value.field == field and words in caught.value.description
    with pytest.raises(InvalidArgument) as mapped:
        codecs.tensor_to_torch(message, "req.z")
    assert mapped.value.violations == [(field, caught.value.description)]


def test_unsupported_numpy_dtype_is_rejected():
    with pytest.raises(CodecError, match="float64"):
        codec.tensor_from_numpy(np.zeros(3))


def _pixels(width=16, height=8):
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_lossless_image_round_trip(encoding):
    pixels = _pixels()
    message = codec.image_from_array(pixels, encoding)
    assert (message.width, message.height) == (16, 8)
    np.testing.assert_array_equal(codec.image_to_array(message, multiple_of=8), pixels)


def test_jpeg_and_sniffing():
    pixels = np.full((8, 8, 3), 120, np.uint8)
    message = codec.image_from_array(pixels, "jpeg")
    message.encoding = tensor_pb2.Image.ENCODING_UNSPECIFIED
    assert np.abs(codec.image_to_array(message).astype(int) - 120).max() <= 3
    tensor = codecs.image_to_torch(message)
    assert tensor.shape == (1, 3, 8, 8) and -1.0 <= tensor.min() and tensor.max() <= 1.0
    back = codec.image_to_array(codecs.image_from_torch((tensor + 1) / 2))
    assert np.abs(back.astype(int) - 120).max() <= 3


def _huge_png_header(width, height):
    """A PNG whose IHDR claims width x height, with one tiny IDAT: decoding it fully
    would allocate gigabytes, reading its header costs nothing."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_from_header():
    # Below PIL's own limit: our max_pixels check rejects it before decoding.
    message = tensor_pb2.Image(encoding=tensor_pb2.Image.PNG, data=_huge_png_header(10000, 10000))
    with pytest.raises(CodecError) as caught:
        codec.image_to_pil(message, "req.image", max_pixels=512 * 512)
    assert caught.value.field == "req.image.width" and "100000000 pixels" in caught.value.description
    # Beyond PIL's hard limit, PIL refuses at open(); still a clean CodecError.
    message.data = _huge_png_header(60000, 60000)
    for limit in (None, 512 * 512):
        with pytest.raises(CodecError) as caught:
            codec.image_to_pil(message, "req.image", max_pixels=limit)
        assert caught.value.field == "req.image.width" and "too large" in caught.value.description
    with pytest.raises(CodecError) as caught:
        codec.mask_to_numpy(tensor_pb2.Mask(png=message.data), "mask", max_pixels=512 * 512)
    assert caught.value.field == "mask.png"


@pytest.mark.parametrize("mutate, field, words", [
    (lambda m: setattr(m, "width", 17), "image.width", "declared width 17"),
    (lambda m: setattr(m, "height", -1), "image.height", "negative"),
    (lambda m: setattr(m, "encoding", tensor_pb2.Image.JPEG), "image.encoding", "declared JPEG but the data is PNG"),
    (lambda m: setattr(m, "data", b"not an image"), "image.data", "cannot read"),
    (lambda m: (setattr(m, "data", b"not an image"), setattr(m, "encoding", 0)), "image.encoding", "neither PNG"),
    (lambda m: setattr(m, "data", m.data[:60]), "image.data", "cannot decode"),
    (lambda m: setattr(m, "data", b""), "image.data", "empty"),
])
def test_malformed_images_name_the_field(mutate, field, words):
    message = codec.image_from_array(_pixels())
    mutate(message)
    with pytest.raises(CodecError) as caught:
        codec.image_to_pil(message)
    assert caught.value.field == field and words in caught.value.description


def test_image_limits_and_raw_checks():
    with pytest.raises(CodecError) as caught:
        codec.image_to_pil(codec.image_from_array(_pixels(16, 12)), multiple_of=8)
    assert caught.value.field == "image.height"
    with pytest.raises(CodecError) as caught:
        codec.image_to_pil(codec.image_from_array(_pixels(16, 8)), max_pixels=100)
    assert caught.value.field == "image.width"
    raw = codec.image_from_array(_pixels(), "raw")
    raw.width = 0
    with pytest.raises(CodecError, match="positive width"):
        codec.image_to_pil(raw)
    raw.width, raw.data = 16, raw.data[:-3]
    with pytest.raises(CodecError) as caught:
        codec.image_to_pil(raw)
    assert caught.value.field == "image.data"


@pytest.mark.parametrize("encoding", ["tensor", "png"])
@pytest.mark.parametrize("dtype", [bool, np.uint8])
def test_mask_round_trip(encoding, dtype):
    inside = RNG.random((6, 10)) > 0.5
    values = inside if dtype is bool else inside.astype(np.uint8) * 7
    decoded = codec.mask_to_numpy(codec.mask_from_numpy(values, encoding), "mask")
    assert decoded.dtype == bool
    np.testing.assert_array_equal(decoded, inside)
    assert codecs.mask_to_torch(codec.mask_from_numpy(values, encoding), size=(6, 10)).dtype == torch.bool


def test_malformed_masks_name_the_field():
    cases = [
        (tensor_pb2.Mask(), "req.mask"),
        (tensor_pb2.Mask(tensor=codec.tensor_from_numpy(np.zeros((2, 2), np.float32))), "req.mask.tensor.datatype"),
        (tensor_pb2.Mask(tensor=codec.tensor_from_numpy(np.zeros((1, 2, 2), np.uint8))), "req.mask.tensor.shape"),
        (tensor_pb2.Mask(png=b"\xff\xd8\xff not png"), "req.mask.png"),
    ]
    for message, field in cases:
        with pytest.raises(CodecError) as caught:
            codec.mask_to_numpy(message, "req.mask")
        assert caught.value.field == field
    with pytest.raises(InvalidArgument) as mapped:
        codecs.mask_to_torch(codec.mask_from_numpy(np.ones((4, 4), bool)), "req.mask", size=(8, 8))
    assert mapped.value.violations[0][0] == "req.mask"


def test_status_carries_bad_request_violations():
    error = InvalidArgument.many([("steps", "must be positive"), ("image.width", "not a multiple of 8")])
    grpc_status = to_grpc_status(error)
    assert grpc_status.code.name == "INVALID_ARGUMENT"
    details = dict(grpc_status.trailing_metadata)["grpc-status-details-bin"]
    parsed = status_pb2.Status.FromString(details)
    bad_request = error_details_pb2.BadRequest()
    assert parsed.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == error.violations
    assert to_grpc_status(NotFound("no model 'x'")).code.name == "NOT_FOUND"


def test_usage_from_control():
    control = CallControl()
    control.unet()
    control.unet(backward=True)
    control.unet(backward=True)
    usage = codecs.usage_to_proto(control)
    assert (usage.unet_forward_evaluations, usage.unet_backward_evaluations) == (1, 2)


def test_config_flags_env_and_extras():
    env = {"ATELIER_PORT": "7000", "ATELIER_MAX_QUEUE": "3", "ATELIER_MODELS": "a=/models/a; b=hub/b",
           "ATELIER_GRACE_SECONDS": "2.5", "ATELIER_DEVICE": "cpu"}
    config = ServerConfig.from_args(["--model", "b=/models/b2", "--max-queue", "5", "--steps-limit", "9"],
                                    "inversion", environ=env,
                                    add_arguments=lambda p: p.add_argument("--steps-limit", type=int, default=1))
    assert (config.port, config.metrics_port, config.max_queue, config.grace_seconds) == (7000, 9451, 5, 2.5)
    assert config.models == {"a": "/models/a", "b": "/models/b2"}
    assert config.device == "cpu" and config.extras == {"steps_limit": 9}
    assert dict(config.grpc_options())["grpc.max_receive_message_length"] == 256 * 1024 * 1024
    for argv, env in [(["--model", "nosource"], {}), ([], {"ATELIER_PORT": "x"}), (["--max-queue", "-1"], {})]:
        with pytest.raises(SystemExit):
            ServerConfig.from_args(argv, "inversion", environ=env)


def test_client_and_server_keepalive_agree():
    from atelier.sdk import channel_options as co

    client = dict(co.client_options())
    server = dict(ServerConfig(service="inversion").grpc_options())
    # The server must accept pings at least as often as clients send them, or it
    # answers GOAWAY "too_many_pings" and long streams die.
    assert server["grpc.http2.min_ping_interval_without_data_ms"] < client["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == client["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.max_receive_message_length"] == server["grpc.max_send_message_length"] > 4 * 1024 * 1024
