"""Activation codecs and channel impairments: round trips, error bounds, byte counts, negotiation, rejections."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from seam.runtime import impairments
from seam.runtime.codecs import CODECS, INT4_GROUP, CodecError, EncodedActivation, decode, encoded_bytes, negotiate
from seam.runtime.errors import SeamError

WIRE_DTYPES = {np.dtype(d) for d in (np.float32, np.float16, np.int8, np.uint8, np.uint16)}


def activation(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def adversarial() -> np.ndarray:
    """A zero row, a huge outlier, all-negative values and an H that int4 has to pad."""
    x = activation((2, 4, 70))
    x[0, 1] = 0
    x[0, 2, 13] = 3e4
    x[1, 0] = -np.abs(x[1, 0])
    x[1, 3] = 1e-41  # subnormal: the scale underflows
    return x


def within_bound(name: str, x: np.ndarray, y: np.ndarray) -> bool:
    """The documented worst case per element: relative for the floats, a half step of the scale for the ints."""
    error = np.abs(y - x)
    if name == "fp32":
        return np.array_equal(x, y)
    if name in ("fp16", "bf16"):
        relative = 2.0**-11 if name == "fp16" else 2.0**-8  # half an ulp: 10 and 7 mantissa bits
        smallest = 2.0**-25 if name == "fp16" else 2.0**-134  # half the spacing of their subnormals
        return bool(np.all(error <= relative * np.abs(x) + smallest))
    if name == "int8":
        bound = np.max(np.abs(x), axis=-1, keepdims=True) / 127 / 2
        return bool(np.all(error <= bound * (1 + 1e-5) + 1e-37))
    batch, seq, hidden = x.shape
    groups = -(-hidden // INT4_GROUP)
    padded = np.zeros((batch, seq, groups * INT4_GROUP), np.float32)
    padded[..., :hidden] = x
    grouped = np.abs(padded).reshape(batch, seq, groups, INT4_GROUP)
    # float16 scales are rounded up: at most one part in 2**10 above absmax / 7, or one subnormal step.
    bound = grouped.max(axis=-1, keepdims=True) / 7 / 2 * (1 + 2**-10) + 2.0**-25
    return bool(np.all(error <= np.broadcast_to(bound, grouped.shape).reshape(padded.shape)[..., :hidden]))


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", [(1, 1, 768), (2, 7, 64), (1, 3, 70), (0, 4, 32), (1, 0, 5)])
def test_round_trip_on_random_activations(name, shape):
    x = activation(shape)
    encoded = CODECS[name].encode(x)
    y = decode(encoded)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert within_bound(name, x, y)
    assert encoded.nbytes == encoded_bytes(name, shape)
    assert {a.dtype for a in encoded.arrays.values()} <= WIRE_DTYPES


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_on_adversarial_activations(name):
    x = adversarial()
    y = decode(CODECS[name].encode(x))
    assert within_bound(name, x, y)
    assert np.all(y[0, 1] == 0)


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=3, max_dims=3, max_side=40),
        elements=st.floats(-6e4, 6e4, width=32, allow_subnormal=True),
    )
)
def test_round_trip_bounds_hold_for_any_activation(name, x):
    assert within_bound(name, x, decode(CODECS[name].encode(x)))


@pytest.mark.parametrize("name", CODECS)
def test_typical_relative_error(name):
    x = activation((4, 16, 768))
    rms = math.sqrt(np.mean((decode(CODECS[name].encode(x)) - x) ** 2) / np.mean(x**2))
    assert rms <= {"fp32": 0, "fp16": 3e-4, "bf16": 3e-3, "int8": 2e-2, "int4": 0.2}[name]


def test_encoded_bytes_per_codec():
    shape = (1, 128, 768)
    assert {name: encoded_bytes(name, shape) for name in CODECS} == {
        "fp32": 128 * 768 * 4,
        "fp16": 128 * 768 * 2,
        "bf16": 128 * 768 * 2,
        "int8": 128 * 768 + 128 * 4,
        "int4": 128 * 768 // 2 + 128 * 24 * 2,
    }
    assert encoded_bytes("int4", (1, 1, 33)) == 32 + 2 * 2  # one padded group


def test_fp16_saturates_instead_of_overflowing():
    x = np.array([[[1e6, -1e6, np.inf, 1.0, np.nan]]], np.float32)
    y = decode(CODECS["fp16"].encode(x))[0, 0]
    assert y[:4].tolist() == [65504.0, -65504.0, np.inf, 1.0] and np.isnan(y[4])


def test_bf16_rounds_to_nearest_even_and_keeps_specials():
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20], np.float32)  # two ties, one just above
    specials = np.array([np.inf, -np.inf, np.nan, -np.nan, np.finfo(np.float32).max, -0.0], np.float32)
    nan_payload = np.array([0x7F800001, 0xFF800001], np.uint32).view(np.float32)  # would round into inf
    x = np.concatenate([ties, specials, nan_payload]).reshape(1, 1, -1)
    y = decode(CODECS["bf16"].encode(x))[0, 0]
    assert y[:3].tolist() == [1.0, 1 + 4 * 2**-8, 1 + 2 * 2**-8]
    assert y[3:5].tolist() == [np.inf, -np.inf]
    assert np.isnan(y[5]) and np.isnan(y[6]) and np.isnan(y[9]) and np.isnan(y[10])
    assert np.signbit(y[6]) and np.signbit(y[10])
    assert np.isinf(y[7])  # float32's largest value rounds past bfloat16's: IEEE overflow
    assert y[8] == 0 and np.signbit(y[8])


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_quantizers_refuse_non_finite_activations(name, bad):
    x = activation((1, 2, 64))
    x[0, 1, 3] = bad
    with pytest.raises(CodecError, match="inf or NaN"):
        CODECS[name].encode(x)


def test_int4_refuses_groups_beyond_float16_scales():
    x = np.full((1, 1, 32), 1e6, np.float32)
    with pytest.raises(CodecError, match="float16 scales"):
        CODECS["int4"].encode(x)


def test_int4_packs_two_values_per_byte():
    x = np.array([[[-7, 7] + [0] * 30]], np.float32)  # absmax 7: scale 1, values exactly representable
    encoded = CODECS["int4"].encode(x)
    assert encoded.arrays["data"][0, 0, 0] == (-7 + 8) | ((7 + 8) << 4)
    assert encoded.arrays["scale"].tolist() == [[[1.0]]]
    assert np.array_equal(decode(encoded), x)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize(
    "x", [np.zeros((2, 3), np.float32), np.zeros((1, 2, 3), np.float64), [[[1.0]]]], ids=["rank2", "float64", "list"]
)
def test_encode_rejects_anything_but_float32_rank3(name, x):
    with pytest.raises(CodecError, match=r"float32 \[B, S, H\]"):
        CODECS[name].encode(x)


def encoded(name="int8", shape=(1, 2, 40)) -> EncodedActivation:
    return CODECS[name].encode(activation(shape))


def with_array(enc: EncodedActivation, key: str, array) -> EncodedActivation:
    return replace(enc, arrays={**enc.arrays, key: array})


@pytest.mark.parametrize(
    "malformed, message",
    [
        (replace(encoded(), codec="int3"), "unknown activation codec 'int3'"),
        (replace(encoded(), shape=(1, 2)), "shape must be"),
        (replace(encoded(), shape=(1, 2, -40)), "shape must be"),
        (replace(encoded(), shape=(1, 2, 41)), "must be int8 \\(1, 2, 41\\)"),
        (replace(encoded("int4"), shape=(1, 2, 65)), "must be uint8 \\(1, 2, 48\\)"),
        (with_array(encoded(), "data", encoded().arrays["data"][:, :1]), "'data' must be int8"),
        (with_array(encoded(), "scale", encoded().arrays["scale"].astype(np.float16)), "'scale' must be float32"),
        (with_array(encoded("bf16"), "data", encoded("bf16").arrays["data"].view(np.int16)), "must be uint16"),
        (with_array(encoded("fp32"), "data", b"\0" * 320), "got bytes"),
        (replace(encoded(), arrays={"data": encoded().arrays["data"]}), "carries arrays \\['data', 'scale'\\]"),
        (with_array(encoded("fp16"), "scale", np.zeros(1, np.float32)), "carries arrays \\['data'\\]"),
        (with_array(encoded(), "scale", np.full((1, 2), np.nan, np.float32)), "non-finite scale"),
        (with_array(encoded("int4"), "scale", np.full((1, 2, 2), -1, np.float16)), "negative"),
    ],
)
def test_decode_rejects_malformed_encodings(malformed, message):
    with pytest.raises(CodecError, match=message):
        decode(malformed)


def test_a_codec_decodes_only_its_own_encodings():
    with pytest.raises(CodecError, match="codec fp16 cannot decode an activation encoded with 'int8'"):
        CODECS["fp16"].decode(encoded())


def test_errors_are_single_lines_a_server_can_send_back():
    with pytest.raises(SeamError) as raised:
        decode(replace(encoded(), shape=(1, 2, 41)))
    assert "\n" not in str(raised.value)


def test_encoded_bytes_rejects_unknown_codecs_and_bad_shapes():
    with pytest.raises(CodecError, match="unknown activation codec"):
        encoded_bytes("fp8", (1, 1, 8))
    with pytest.raises(CodecError, match="shape must be"):
        encoded_bytes("fp16", (1, 8))
    assert encoded_bytes("fp16", np.array([1, 1, 8])) == 16


ALL = list(CODECS)


@pytest.mark.parametrize(
    "ours, theirs, wanted, chosen, warned",
    [
        (ALL, ALL, "int4", "int4", None),
        (ALL, ["fp32", "fp16", "int8"], "int4", "int8", "not supported by the peer; using int8"),
        (ALL, ["fp32", "bf16"], "int8", "bf16", "not supported by the peer; using bf16"),
        (["fp32", "fp16"], ALL, "bf16", "fp16", "not supported by this side; using fp16"),
        (["fp16"], ["bf16"], "int8", "fp32", "not supported by this side or the peer; using fp32"),
        (ALL, ["int4"], "int8", "fp32", "using fp32"),  # never falls back to a less accurate codec
        ([], [], "fp32", "fp32", None),  # fp32 needs no advertising
        (ALL, ["fp32", "fp16", "int2"], "int2", None, "unknown activation codec 'int2'"),
    ],
)
def test_negotiation(ours, theirs, wanted, chosen, warned):
    if chosen is None:
        with pytest.raises(CodecError, match=warned):
            negotiate(ours, theirs, wanted)
        return
    codec, warning = negotiate(ours, theirs, wanted)
    assert codec == chosen
    assert warning is None if warned is None else warned in warning


def test_erasure_rate_and_zeroing():
    x = activation((4, 256, 768)) + 10  # no element is zero before erasure
    y = impairments.parse("erasure:0.05").apply(x, np.random.default_rng(1))
    erased = y == 0
    assert abs(erased.mean() - 0.05) < 0.002
    assert np.array_equal(y[~erased], x[~erased])
    assert y.dtype == np.float32 and not np.shares_memory(x, y)


@pytest.mark.parametrize("snr_db", [-5, 0, 10, 20, 40])
def test_awgn_hits_the_requested_snr(snr_db):
    x = activation((2, 128, 768))
    x[:, 0, :4] *= 100  # outlier channels: power is measured over the whole tensor
    y = impairments.parse(f"awgn:{snr_db}").apply(x, np.random.default_rng(2))
    measured = 10 * math.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert abs(measured - snr_db) < 0.5
    assert y.dtype == np.float32


@pytest.mark.parametrize("spec", ["erasure:0.3", "awgn:12.5"])
def test_impairments_are_seeded(spec):
    impairment, x = impairments.parse(spec), activation((1, 8, 64))
    first, again = (impairment.apply(x, np.random.default_rng(7)) for _ in range(2))
    other = impairment.apply(x, np.random.default_rng(8))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert str(impairment) == spec


def test_awgn_on_a_silent_activation_adds_nothing():
    x = np.zeros((1, 1, 16), np.float32)
    assert np.array_equal(impairments.parse("awgn:10").apply(x, np.random.default_rng(0)), x)


def test_awgn_refuses_a_non_finite_activation():
    x = activation((1, 1, 16))
    x[0, 0, 0] = np.inf
    with pytest.raises(SeamError, match="finite"):
        impairments.parse("awgn:10").apply(x, np.random.default_rng(0))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("erasure:1", "probability must be in \\[0, 1\\)"),
        ("erasure:-0.1", "probability must be in"),
        ("erasure:nan", "probability must be in"),
        ("awgn:inf", "must be a finite number"),
        ("awgn:nan", "must be a finite number"),
        ("awgn:", "needs a number"),
        ("awgn:loud", "needs a number"),
        ("erasure", "needs a number"),
        ("jitter:0.1", "unknown impairment 'jitter:0.1'"),
        ("", "unknown impairment"),
    ],
)
def test_bad_impairment_specs_are_rejected(spec, message):
    with pytest.raises(SeamError, match=message):
        impairments.parse(spec)
