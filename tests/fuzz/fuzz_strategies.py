"""One hypothesis strategy per protobuf message type, built from the descriptors.

``message_strategy(descriptor)`` walks the message's fields: scalars get values that mix
ordinary ones with edge cases (0, negatives, the int32 limits, NaN, infinities, 1e308,
control characters, long strings), enums their defined values and unknown numbers,
repeated fields and maps short lists, oneofs at most one member, sub-messages the same
strategy recursively (depth-bounded). Every message type has exactly one strategy, shared by
every RPC that carries it, so a service added later is fuzzed with no strategy code at all.

A few wire types carry payloads that random bytes almost never make valid, so the calls
would never get past the first check; ``PAYLOADS`` adds well-formed values for those
(small real PNGs, tensors of plausible shapes) beside the generic ones. Sizes stay small:
the point is the server's validation and error paths, not its throughput.
"""
from __future__ import annotations

import functools
import io

import numpy as np
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from hypothesis import strategies as st
from PIL import Image as PILImage

FieldDescriptor = _descriptor.FieldDescriptor

MAX_DEPTH = 4  # InversionResult inside EditRequest inside ... stays bounded
MAX_REPEATED = 4

_INT32_EDGES = [0, 1, -1, 2, 7, 8, 63, 64, 999, 1000, 1001, 2**31 - 1, -(2**31)]
_INT64_EDGES = _INT32_EDGES + [2**40, 2**63 - 1, -(2**63)]
_UINT_EDGES = [0, 1, 2, 64, 2**32 - 1]
_FLOAT_EDGES = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-8, 1e38, -1e38, float("nan"), float("inf"), float("-inf")]
_DOUBLE_EDGES = _FLOAT_EDGES + [1e308, -1e308, 5e-324]
# Strings a caller might send: empty, the shipped model names, plausible prompts, whitespace,
# unicode, NUL, and long ones (echoed strings must not blow the error trailers).
_STRING_EDGES = [
    "", " ", "toy", "toy-sam", "no-such-model", "a red circle on a blue background", "circle",
    "\x00", "\u00e9\u4e2d\U0001f600", "a " * 40, "x" * 300, "../../etc/passwd",
]
_DATATYPES = ["FP32", "FP16", "BF16", "INT64", "UINT8", "BOOL", "", "FP64", "fp32"]


def _mostly(usual: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` three times in four, else ``rare`` (one_of weighs by its own heuristics)."""
    return _chance(0.75).flatmap(lambda pick_usual: usual if pick_usual else rare)


def _chance(p: float) -> st.SearchStrategy:
    """True with probability ~p. (A small range such as integers(0, 3) is not drawn uniformly:
    hypothesis favours its ends, so 'k == 3' came up far more often than one time in four.)"""
    return st.integers(0, 99).map(lambda k: k < 100 * p)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    # Ordinary in-range values three times in four (so requests get past the first check and
    # reach the work), edge cases the rest of the time.
    kind = field.type
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return _mostly(st.integers(0, 4), st.one_of(st.integers(-3, 70), st.sampled_from(_INT32_EDGES)))
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return _mostly(st.integers(0, 4), st.one_of(st.integers(-3, 70), st.sampled_from(_INT64_EDGES)))
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return _mostly(st.integers(0, 4), st.sampled_from(_UINT_EDGES))
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return _mostly(st.integers(0, 4), st.sampled_from(_UINT_EDGES + [2**64 - 1]))
    if kind == FieldDescriptor.TYPE_FLOAT:
        return _mostly(st.floats(0, 8, width=32), st.one_of(st.floats(-100, 100, width=32), st.sampled_from(_FLOAT_EDGES)))
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return _mostly(st.floats(0, 1), st.one_of(st.floats(-100, 100), st.sampled_from(_DOUBLE_EDGES)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return _mostly(st.sampled_from(_STRING_EDGES), st.text(max_size=24))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        defined = [value.number for value in field.enum_type.values]
        return _mostly(st.sampled_from(defined), st.integers(-2, max(defined) + 3))
    raise TypeError(f"no strategy for field type {kind} ({field.full_name})")


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1)
    return _scalar(field)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.28
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


@st.composite
def _generic(draw, descriptor: _descriptor.Descriptor, depth: int):
    cls = message_factory.GetMessageClass(descriptor)
    message = cls()
    if depth > MAX_DEPTH:
        return message
    in_oneof = _explicit_oneof_names(descriptor)
    for oneof in descriptor.oneofs:  # at most one member of each real oneof
        if oneof.fields[0].name in in_oneof:
            chosen = draw(_mostly(st.sampled_from(list(oneof.fields)), st.none()))
            if chosen is not None:
                _set(message, chosen, draw(_value(chosen, depth)))
    for field in descriptor.fields:
        if field.name in in_oneof:
            continue
        if _is_map(field):
            key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            entries = draw(st.dictionaries(_scalar(key_field), _value(value_field, depth), max_size=3))
            container = getattr(message, field.name)
            for key, value in entries.items():
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    container[key].CopyFrom(value)
                else:
                    container[key] = value
            continue
        if _is_repeated(field):
            values = draw(st.lists(_value(field, depth), max_size=MAX_REPEATED))
            container = getattr(message, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for value in values:
                    container.add().CopyFrom(value)
            else:
                container.extend(values)
            continue
        # A request's own sub-messages and payload types are mostly present (it needs its
        # image), other deeper ones (optional extras such as P2P options) less often, scalars half the time (the
        # default is often the valid value the server should accept).
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            usual = depth == 0 or field.message_type.full_name in PAYLOADS  # an image, a latent
            present = draw(_chance(0.75 if usual else 0.25))
        else:
            present = draw(st.booleans())
        if present:
            _set(message, field, draw(_value(field, depth)))
    return message


def _explicit_oneof_names(descriptor) -> set[str]:
    """Members of real oneofs (not the synthetic oneof of a proto3 ``optional`` field)."""
    names = set()
    for oneof in descriptor.oneofs:
        synthetic = len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name
        if not synthetic:
            names.update(field.name for field in oneof.fields)
    return names


def _set(message, field: FieldDescriptor, value) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        sub = getattr(message, field.name)
        sub.SetInParent()  # present even when empty (CopyFrom of an empty message is not)
        sub.MergeFrom(value)
    else:
        setattr(message, field.name, value)


# ---------------------------------------------------------------- well-formed payloads


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@st.composite
def _valid_image(draw, cls):
    sides = _mostly(st.sampled_from([8, 16, 32, 64]), st.integers(1, 72))
    width, height, seed = draw(sides), draw(sides), draw(st.integers(0, 3))
    if draw(st.booleans()):
        return cls(encoding=1, data=_png(width, height, seed), width=width, height=height)
    raw = np.random.default_rng(seed).integers(0, 256, width * height * 3, dtype=np.uint8).tobytes()
    return cls(encoding=3, data=raw, width=width, height=height)


@st.composite
def _valid_tensor(draw, cls):
    # Shapes near the ones the services use: latents (1, 4, h, w), low-res masks, plus odd ranks.
    shape = draw(st.one_of(
        st.tuples(st.just(1), st.just(4), st.integers(1, 8), st.integers(1, 8)),
        st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
        # square low-res masks: SAM's is 256x256, the embedded toy-sam's 64x64
        st.tuples(st.just(1), st.sampled_from([16, 64, 256])).map(lambda t: (t[0], t[1], t[1])),
        st.sampled_from([16, 64, 256]).map(lambda side: (side, side)),
    ))
    datatype = draw(st.sampled_from(["FP32", "FP32", "FP16", "BF16", "UINT8", "BOOL", "INT64"]))
    itemsize = {"FP32": 4, "FP16": 2, "BF16": 2, "UINT8": 1, "BOOL": 1, "INT64": 8}[datatype]
    count = int(np.prod(shape))
    if datatype == "FP32":
        values = draw(st.sampled_from(["normal", "nan", "huge"]))
        array = np.random.default_rng(0).standard_normal(count).astype(np.float32)
        if values == "nan":
            array[0] = np.nan
        elif values == "huge":
            array[:] = 3e38
        raw = array.tobytes()
    elif datatype == "BOOL":
        raw = bytes(draw(st.sampled_from([0, 1])) for _ in range(min(count, 1))) * count
    else:
        raw = bytes(count * itemsize)
    if draw(_chance(0.15)):  # sometimes one byte short
        raw = raw[:-1]
    return cls(datatype=datatype, shape=list(shape), raw=raw)


def _generic_tensor_fields(cls):
    return st.builds(lambda datatype, shape, raw: cls(datatype=datatype, shape=shape, raw=raw),
                     st.sampled_from(_DATATYPES),
                     st.lists(st.one_of(st.integers(-2, 9), st.sampled_from([2**40, 2**63 - 1])), max_size=70),
                     st.binary(max_size=64))


@st.composite
def _inversion_result(draw, cls):
    """An Invert result as a client sends it back to Edit: z_T (1, 4, h, w) matching 8x the
    image size, a few steps, a prompt (other fields from the generic strategies)."""
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    z_t = np.random.default_rng(draw(st.integers(0, 3))).standard_normal((1, 4, h, w)).astype(np.float32)
    result = cls(prompt=draw(st.sampled_from(_STRING_EDGES)), num_inference_steps=draw(st.integers(1, 4)),
                 width=8 * w, height=8 * h)
    result.z_t.datatype, result.z_t.raw = "FP32", z_t.tobytes()
    result.z_t.shape.extend(z_t.shape)
    return result


# full message name -> (message class -> extra strategy), mixed in beside the generic one
PAYLOADS = {
    "atelier.v1.InversionResult": _inversion_result,
    "atelier.v1.Image": _valid_image,
    "atelier.v1.Tensor": lambda cls: st.one_of(_valid_tensor(cls), _generic_tensor_fields(cls)),
}


@functools.lru_cache(maxsize=None)
def message_strategy(descriptor: _descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy:
    """The strategy for one message type (cached: one per type and depth)."""
    generic = _generic(descriptor, depth)
    payload = PAYLOADS.get(descriptor.full_name)
    if payload is None:
        return generic
    cls = message_factory.GetMessageClass(descriptor)
    # Well-formed payloads three times in four: random bytes are refused at the first check.
    return _mostly(payload(cls), generic)
