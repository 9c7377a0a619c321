"""Moving a split while sequences are running: the KV cache of the layers that change side, packed for the wire
or recomputed where it is needed.

A split moves between steps. The side that gives layers up packs their cache into one tensor, the side that takes
them over unpacks it into a runner for its new span, and every other layer keeps its cache where it is, so the
next step computes exactly what it would have computed without the move. Instead of the cache, the side taking
layers over may get the hidden states at the first of them for every position so far and recompute their cache
in one pass: a cache holds two tensors per layer, the hidden states one for all the layers.
"""

from __future__ import annotations

import numpy as np

from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool, SpanRunner, past_names
from seam.runtime.generation import positions_from_mask
from seam.runtime.spans import Span


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


def recompute(pool: SessionPool, layers: Span, hidden: np.ndarray, mask: np.ndarray, variant: str | None = None,
              keep_boundaries: bool = False, head: bool = True) -> tuple[SpanRunner, np.ndarray]:
    """A runner for ``layers`` whose cache covers every position so far, computed in one pass from ``hidden``,
    the hidden states at ``layers.start`` (or the token ids when it is 0), under ``mask`` [B, past]; and the
    pass's output (the hidden states at ``layers.end`` when it is not the last layer)."""
    runner = pool.runner(layers, variant, keep_boundaries, head)
    runner.reset(mask.shape[0])
    return runner, runner.run(hidden, mask, positions_from_mask(mask))


def check_boundary(hidden: np.ndarray | None, mask: np.ndarray | None, batch: int, past: int | None, hidden_size: int,
                   dtype: np.dtype) -> None:
    """Checks the hidden states [B, past, H] and mask [B, past] a peer sent to recompute a cache from; ``past``
    None takes the mask's length, which must still be at least one position."""
    if hidden is None or mask is None:
        raise SeamError("recomputing moved layers needs the boundary hidden states and their attention mask")
    past = mask.shape[1] if past is None and mask.ndim == 2 else past
    if mask.shape != (batch, past) or mask.dtype != np.int64 or not past:
        raise SeamError(f"the attention mask of a recomputed cache must be int64 of shape [{batch}, past >= 1], "
                        f"got {mask.dtype.name} {list(mask.shape)}")
    expected = (batch, past, hidden_size)
    if hidden.shape != expected or hidden.dtype != dtype:
        raise SeamError(f"boundary hidden states must be {dtype.name} of shape {list(expected)}, "
                        f"got {hidden.dtype.name} {list(hidden.shape)}")


def resplit(pool: SessionPool, runner: SpanRunner, span: Span, incoming: dict[str, np.ndarray],
            boundaries: dict[int, list[np.ndarray]] | None = None) -> SpanRunner:
    """A runner for ``span`` that continues ``runner``'s sequences: layers in both spans keep their cache, the
    layers ``span`` gains take theirs from ``incoming``; kept boundary hidden states carry over likewise, from
    ``runner`` or ``boundaries``."""
    moved = pool.runner(span, runner.variant, runner.keep_boundaries, runner.head)
    moved.cache = {
        name: runner.cache[name] if name in runner.cache else incoming[name]
        for layer in span
        for name in past_names(layer)
    }
    known = {**(boundaries or {}), **runner.boundaries}
    moved.boundaries = {cut: known[cut] for cut in moved.boundary_cuts if cut in known}
    return moved
