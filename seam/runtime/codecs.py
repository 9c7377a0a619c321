"""Activation codecs: how the hidden states [B, S, H] float32 crossing the cut are packed for the link.

Each codec turns the activation into a few named arrays (an ``EncodedActivation``) that travel as raw tensor
frames, and back. ``fp32`` is the identity; ``fp16`` and ``bf16`` halve the bytes; ``int8`` keeps one float32
absmax scale per token row; ``int4`` keeps one float16 scale per group of 32 values along H and packs two values
per byte. A codec's ``layout`` (the dtype and shape of every array for a given activation shape) is the one source
for both ``encoded_bytes``, which the cost model calls without encoding, and the checks ``decode`` runs on what a
peer sent. ``negotiate`` picks the codec both sides support.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from seam.runtime.errors import SeamError

INT4_GROUP = 32
CODECS_CAPABILITY = "codecs:"  # a handshake capability "codecs:fp32,fp16,..." lists what a side decodes
_F16_MAX = float(np.finfo(np.float16).max)

Shape = tuple[int, int, int]
Layout = dict[str, tuple[np.dtype, tuple[int, ...]]]


class CodecError(SeamError):
    """An activation a codec cannot encode, or an encoding that does not match its codec."""


@dataclass(frozen=True)
class EncodedActivation:
    codec: str
    shape: Shape  # of the float32 activation it decodes to
    arrays: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())


@dataclass(frozen=True)
class Codec:
    name: str
    layout: Callable[[Shape], Layout]
    pack: Callable[[np.ndarray], dict[str, np.ndarray]]
    unpack: Callable[[dict[str, np.ndarray], Shape], np.ndarray]

    def encode(self, x: np.ndarray) -> EncodedActivation:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 3:
            got = f"{x.dtype} of rank {x.ndim}" if isinstance(x, np.ndarray) else type(x).__name__
            raise CodecError(f"codec {self.name} encodes float32 [B, S, H] activations, got {got}")
        return EncodedActivation(self.name, x.shape, self.pack(np.ascontiguousarray(x)))

    def decode(self, encoded: EncodedActivation) -> np.ndarray:
        if encoded.codec != self.name:
            raise CodecError(f"codec {self.name} cannot decode an activation encoded with {encoded.codec!r}")
        shape = _checked_shape(encoded.shape)
        _check_arrays(self.name, self.layout(shape), encoded.arrays)
        return self.unpack(encoded.arrays, shape)


def _checked_shape(shape) -> Shape:
    valid = isinstance(shape, (tuple, list)) and len(shape) == 3
    if not valid or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CodecError(f"an activation's shape must be [B, S, H] of non-negative ints, got {shape!r}")
    return tuple(int(d) for d in shape)


def _check_arrays(name: str, layout: Layout, arrays: dict) -> None:
    if not isinstance(arrays, dict) or set(arrays) != set(layout):
        got = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
        raise CodecError(f"codec {name} carries arrays {sorted(layout)}, got {got}")
    for key, (dtype, shape) in layout.items():
        array = arrays[key]
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
            got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
            raise CodecError(f"codec {name} array {key!r} must be {dtype} {shape}, got {got}")


def _check_scales(name: str, scale: np.ndarray) -> None:
    # A peer's negative or non-finite scale would reach the model as inf or NaN activations.
    if not np.all(np.isfinite(scale) & (scale >= 0)):
        raise CodecError(f"codec {name} received a negative or non-finite scale")


def _require_finite(name: str, absmax: np.ndarray) -> None:
    # One inf or NaN makes its whole row's (or group's) scale meaningless, so refuse rather than send garbage.
    if not np.all(np.isfinite(absmax)):
        raise CodecError(f"codec {name} cannot encode inf or NaN activations; use fp32, fp16 or bf16")


def _plain_layout(dtype) -> Callable[[Shape], Layout]:
    return lambda shape: {"data": (np.dtype(dtype), shape)}


def _fp32_pack(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"data": x}


def _fp32_unpack(arrays: dict[str, np.ndarray], shape: Shape) -> np.ndarray:
    return arrays["data"]


def _fp16_pack(x: np.ndarray) -> dict[str, np.ndarray]:
    with np.errstate(over="ignore"):
        half = x.astype(np.float16)
    # A finite value past float16's range saturates: an inf would turn the next norm's output into NaN. The
    # element-wise search runs only when some value is that large (or NaN), as float16 checks are slow in numpy.
    if not np.max(np.abs(x), initial=0.0) <= _F16_MAX:
        overflow = np.isinf(half) & np.isfinite(x)
        half[overflow] = np.copysign(_F16_MAX, x[overflow])
    return {"data": half}


def _fp16_unpack(arrays: dict[str, np.ndarray], shape: Shape) -> np.ndarray:
    return arrays["data"].astype(np.float32)


def _bf16_pack(x: np.ndarray) -> dict[str, np.ndarray]:
    bits = x.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
    # Rounding would carry a NaN's payload into the exponent (turning it into inf): keep it a quiet NaN instead.
    return {"data": np.where(np.isnan(x), (bits >> 16) | 0x0040, rounded).astype(np.uint16)}


def _bf16_unpack(arrays: dict[str, np.ndarray], shape: Shape) -> np.ndarray:
    return (arrays["data"].astype(np.uint32) << 16).view(np.float32)


def _int8_layout(shape: Shape) -> Layout:
    return {"data": (np.dtype(np.int8), shape), "scale": (np.dtype(np.float32), shape[:2])}


def _int8_pack(x: np.ndarray) -> dict[str, np.ndarray]:
    absmax = np.max(np.abs(x), axis=-1, initial=0.0)
    _require_finite("int8", absmax)
    scale = absmax / 127
    scaled = np.divide(x, scale[..., None], out=np.zeros_like(x), where=scale[..., None] > 0)
    return {"data": np.rint(scaled).clip(-127, 127).astype(np.int8), "scale": scale}


def _int8_unpack(arrays: dict[str, np.ndarray], shape: Shape) -> np.ndarray:
    _check_scales("int8", arrays["scale"])
    return arrays["data"] * arrays["scale"][..., None]


def _int4_groups(hidden: int) -> int:
    return math.ceil(hidden / INT4_GROUP)


def _int4_layout(shape: Shape) -> Layout:
    groups = _int4_groups(shape[2])
    return {
        "data": (np.dtype(np.uint8), (*shape[:2], groups * INT4_GROUP // 2)),
        "scale": (np.dtype(np.float16), (*shape[:2], groups)),
    }


def _int4_scales(absmax: np.ndarray) -> np.ndarray:
    """float16 scales rounded up, so that absmax / scale never exceeds 7 and nothing is clipped."""
    if np.any(absmax > 7 * _F16_MAX):
        raise CodecError(f"codec int4 keeps float16 scales: a group's absmax exceeds {7 * _F16_MAX:g}; use int8")
    scale = (absmax / 7).astype(np.float16)
    short = scale.astype(np.float32) * 7 < absmax
    scale[short] = np.nextafter(scale[short], np.float16(np.inf))
    return scale


def _int4_pack(x: np.ndarray) -> dict[str, np.ndarray]:
    batch, seq, hidden = x.shape
    groups = _int4_groups(hidden)
    padded = np.zeros((batch, seq, groups, INT4_GROUP), np.float32)  # the last group's tail is zeros
    padded.reshape(batch, seq, groups * INT4_GROUP)[..., :hidden] = x
    absmax = np.max(np.abs(padded), axis=-1, initial=0.0)
    _require_finite("int4", absmax)
    scale = _int4_scales(absmax)
    step = scale.astype(np.float32)[..., None]
    scaled = np.divide(padded, step, out=np.zeros_like(padded), where=step > 0)
    # Offset binary: q + 8 lies in [1, 15]; even positions take the low nibble, odd ones the high nibble.
    nibbles = (np.rint(scaled).clip(-7, 7) + 8).astype(np.uint8).reshape(batch, seq, groups * INT4_GROUP)
    return {"data": nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), "scale": scale}


def _int4_unpack(arrays: dict[str, np.ndarray], shape: Shape) -> np.ndarray:
    _check_scales("int4", arrays["scale"])
    batch, seq, hidden = shape
    data, scale = arrays["data"], arrays["scale"]
    groups = scale.shape[-1]
    values = np.stack([data & 0x0F, data >> 4], axis=-1).astype(np.int8) - 8
    grouped = values.reshape(batch, seq, groups, INT4_GROUP) * scale.astype(np.float32)[..., None]
    return np.ascontiguousarray(grouped.reshape(batch, seq, groups * INT4_GROUP)[..., :hidden])


# Best quality first: negotiation falls back along this order. fp16 ranks above bf16 for its three extra
# mantissa bits; hidden states rarely approach its range limit, and it saturates rather than overflows.
CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        Codec("fp32", _plain_layout(np.float32), _fp32_pack, _fp32_unpack),
        Codec("fp16", _plain_layout(np.float16), _fp16_pack, _fp16_unpack),
        Codec("bf16", _plain_layout(np.uint16), _bf16_pack, _bf16_unpack),
        Codec("int8", _int8_layout, _int8_pack, _int8_unpack),
        Codec("int4", _int4_layout, _int4_pack, _int4_unpack),
    )
}


def codec(name: str) -> Codec:
    if not isinstance(name, str) or name not in CODECS:
        raise CodecError(f"unknown activation codec {name!r}; known: {', '.join(CODECS)}")
    return CODECS[name]


def decode(encoded: EncodedActivation) -> np.ndarray:
    """Decodes with the codec the encoding names; raises CodecError on anything that does not match it."""
    return codec(encoded.codec).decode(encoded)


def encoded_bytes(name: str, shape: Sequence[int]) -> int:
    """What ``encode`` would produce for an activation of this shape, without encoding one."""
    layout = codec(name).layout(_checked_shape(tuple(shape)))
    return sum(math.prod(dims) * dtype.itemsize for dtype, dims in layout.values())


def offered(capabilities: Sequence[str]) -> list[str]:
    """The codecs a peer's handshake capabilities list; none from a peer that predates codecs."""
    for capability in capabilities:
        if isinstance(capability, str) and capability.startswith(CODECS_CAPABILITY):
            return [name for name in capability[len(CODECS_CAPABILITY):].split(",") if name]
    return []


def negotiate(ours: Sequence[str], theirs: Sequence[str], wanted: str) -> tuple[str, str | None]:
    """The codec to use and, when it is not the wanted one, a warning line saying why.

    The fallback is the cheapest codec both sides support that is at least as accurate as the wanted one, so
    falling back never costs accuracy; fp32 always qualifies.
    """
    codec(wanted)
    order = list(CODECS)
    common = [name for name in order if name == "fp32" or (name in ours and name in theirs)]
    if wanted in common:
        return wanted, None
    chosen = [name for name in common if order.index(name) < order.index(wanted)][-1]
    missing = [side for side, names in (("this side", ours), ("the peer", theirs)) if wanted not in names]
    return chosen, f"activation codec {wanted} is not supported by {' or '.join(missing)}; using {chosen}"


# --- how a coded activation travels in a message ----------------------------------------------------------------
# A step carries the codec's "data" array as ``hidden_states`` and its "scale" array as ``hidden_scale``, with the
# codec's name in ``codec``; an activation in the artifact's own dtype travels as it is, with no codec named.


def to_message_fields(hidden: np.ndarray, name: str, own_dtype: str) -> dict[str, object]:
    """The message fields that carry ``hidden`` [B, S, H] coded with codec ``name``."""
    if name == own_dtype:
        return {"hidden_states": hidden}
    encoded = codec(name).encode(hidden.astype(np.float32, copy=False))
    return {"hidden_states": encoded.arrays["data"], "hidden_scale": encoded.arrays.get("scale"), "codec": name}


def from_message_fields(name: str, data: np.ndarray, scale: np.ndarray | None, shape: Shape,
                        dtype: np.dtype) -> np.ndarray:
    """The activation of ``shape`` in ``dtype`` that ``to_message_fields`` coded with codec ``name`` ("" for
    none); raises CodecError when the arrays do not match that codec."""
    if not name:
        return data
    arrays = {"data": data} if scale is None else {"data": data, "scale": scale}
    return decode(EncodedActivation(name, shape, arrays)).astype(dtype, copy=False)
