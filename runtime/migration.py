"""Moving a split while sequences are running: the KV cache of the layers that change side, packed for the wire.

A split moves between steps. The side that gives layers up packs their cache into one tensor, the side that takes
them over unpacks it into a runner for its new span, and every other layer keeps its cache where it is, so the
next step computes exactly what it would have computed without the move.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import SeamError
from runtime.executor import SessionPool, SpanRunner, past_names
from runtime.spans import Span


def pack_kv(cache: dict[str, np.ndarray], layers: Span) -> np.ndarray:
    """The cache of ``layers`` as one tensor [2 * len(layers) * B, kv_heads, past, head_dim]: for each layer in
    order its keys then its values, each [B, kv_heads, past, head_dim]."""
    return np.concatenate([cache[name] for layer in layers for name in past_names(layer)])


def unpack_kv(packed: np.ndarray | None, layers: Span, like: SpanRunner, batch: int, past: int) -> dict[str, np.ndarray]:
    """Checks a packed cache against the sequences it joins (``like``'s dtype and heads, ``batch`` rows, ``past``
    positions) and splits it by layer."""
    expected = (2 * len(layers) * batch, like.kv_shape[0], past, like.kv_shape[1])
    if packed is None:
        raise SeamError(f"moving layers {layers} needs their KV cache, which the message does not carry")
    if packed.shape != expected or packed.dtype != like.kv_dtype:
        raise SeamError(
            f"the KV cache of layers {layers} must be {like.kv_dtype.name} of shape {list(expected)}, "
            f"got {packed.dtype.name} {list(packed.shape)}"
        )
    parts = np.split(packed, 2 * len(layers))
    names = [name for layer in layers for name in past_names(layer)]
    return dict(zip(names, parts))


def resplit(pool: SessionPool, runner: SpanRunner, span: Span, incoming: dict[str, np.ndarray]) -> SpanRunner:
    """A runner for ``span`` that continues ``runner``'s sequences: layers in both spans keep their cache, the
    layers ``span`` gains take theirs from ``incoming``."""
    moved = pool.runner(span, runner.variant)
    moved.cache = {
        name: runner.cache[name] if name in runner.cache else incoming[name]
        for layer in span
        for name in past_names(layer)
    }
    return moved
