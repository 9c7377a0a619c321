"""Runs one side of a split: the prelude once per step, then each block of a span, keeping that span's KV cache.

The prelude turns the 2-D attention mask and the position ids into the additive attention bias and the
position features (rotary tables) that every block takes, so they are built once per step instead of once
per block. Feeds are built from each session's declared inputs because an exporter may drop unused ones.
"""

from __future__ import annotations

import threading

import numpy as np

from seam.runtime.artifact import NUMPY_DTYPES, Artifact
from seam.runtime.ort_options import open_session
from seam.runtime.spans import Span

FIRST_INPUTS = ("input_ids", "hidden_states")


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


class _LoadedBlock:
    def __init__(self, block, session):
        self.block = block
        self.session = session
        self.input_names = [arg.name for arg in self.session.get_inputs()]
        self.output_names = [arg.name for arg in self.session.get_outputs()]
        self.cache_moves = [
            (present, past)
            for layer in block.layers
            for present, past in zip(present_names(layer), past_names(layer))
        ]


class SessionPool:
    """onnxruntime sessions of one artifact, opened on first use and shared by every runner and session.

    Sessions are stateless between runs, so many sequences (and many UEs on an edge) share one per graph.
    """

    def __init__(self, artifact: Artifact, threads: int | None = None, device: str = "cpu"):
        self.artifact = artifact
        self.threads = threads
        self.device = device
        self._sessions: dict[str, object] = {}
        self._opening = threading.Lock()  # concurrent sessions of one UE (its HTTP endpoint) open each graph once

    def session(self, onnx_file):
        with self._opening:
            if onnx_file.file not in self._sessions:
                path = str(self.artifact.path(onnx_file))
                self._sessions[onnx_file.file] = open_session(path, self.threads, self.device)
            return self._sessions[onnx_file.file]

    def preload(self, span: Span, variant: str | None = None) -> None:
        """Opens the sessions of ``span`` now, so the first request does not pay for loading them."""
        self.runner(span, variant)

    def runner(self, span: Span, variant: str | None = None, keep_boundaries: bool = False) -> SpanRunner:
        return SpanRunner(self, span, variant, keep_boundaries)


class SpanRunner:
    """The blocks of ``span`` in onnxruntime with the KV cache of their layers for one batch of sequences.

    With ``keep_boundaries`` it also keeps, for every position so far, the hidden states after each block that
    ends before the last layer: a split that moves to one of those cuts hands them to the other side, which
    recomputes the cache of the layers it takes over from far fewer bytes than the cache itself.
    """

    def __init__(self, pool: SessionPool, span: Span, variant: str | None = None, keep_boundaries: bool = False):
        manifest = pool.artifact.manifest
        self.span = span
        self.num_layers = manifest.dims.num_layers
        self.variant = variant or manifest.dtype
        self.kv_dtype = np.dtype(NUMPY_DTYPES[manifest.dtype])
        self.kv_shape = (manifest.dims.num_kv_heads, manifest.dims.head_dim)
        self.blocks = [
            _LoadedBlock(block, pool.session(block.variants[self.variant]))
            for block in pool.artifact.blocks_for(span)
        ]
        self.prelude = pool.session(manifest.prelude) if self.blocks else None
        self.prelude_outputs = [arg.name for arg in self.prelude.get_outputs()] if self.prelude else []
        self.cache: dict[str, np.ndarray] = {}
        self.keep_boundaries = keep_boundaries
        # cut -> hidden states there, in chunks along positions; only cuts seen from the first position on
        self.boundaries: dict[int, list[np.ndarray]] = {}
        self.boundary_cuts = [b.block.layers.end for b in self.blocks if b.block.layers.end < self.num_layers]

    def reset(self, batch: int) -> None:
        """Start new sequences: an empty cache (past length 0) for every layer of the span."""
        empty = np.zeros((batch, self.kv_shape[0], 0, self.kv_shape[1]), dtype=self.kv_dtype)
        self.cache = {name: empty for layer in self.span for name in past_names(layer)}
        self.boundaries = {cut: [] for cut in self.boundary_cuts} if self.keep_boundaries else {}

    def boundary(self, cut: int) -> np.ndarray | None:
        """The hidden states at ``cut`` for every position so far [B, past, H], or None when not kept."""
        chunks = self.boundaries.get(cut)
        if not chunks:
            return None
        if len(chunks) > 1:  # joined once when asked for, not at every step
            chunks[:] = [np.concatenate(chunks, axis=1)]
        return chunks[0]

    @property
    def ends_in_logits(self) -> bool:
        return self.span.end == self.num_layers

    @property
    def past_length(self) -> int:
        return next(iter(self.cache.values())).shape[2] if self.cache else 0

    def run(
        self,
        first_input: np.ndarray,  # input_ids [B, S] int64, or hidden_states [B, S, H]
        attention_mask: np.ndarray,  # [B, past + S] int64, 0 on left padding
        position_ids: np.ndarray,  # [B, S] int64
        logits_to_keep: int = 1,
    ) -> np.ndarray:
        """Runs the span for one step and returns its output: hidden states [B, S, H] or logits [B, K, V]."""
        outputs: dict[int, np.ndarray] | None = {} if self.boundaries else None
        output, self.cache = self._forward(first_input, attention_mask, position_ids, self.cache, logits_to_keep,
                                           outputs)
        for cut, hidden in (outputs or {}).items():
            if cut in self.boundaries:
                self.boundaries[cut].append(hidden)
        return output

    def run_in_chunks(self, first_input: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                      chunk: int) -> np.ndarray:
        """The step ``run`` takes, ``chunk`` positions at a time: a long prefill's attention scores grow with the
        square of its length, a chunk's only with its own. Returns what ``run`` would: the last position's
        logits (the last chunk's), or the hidden states of every position (each chunk's, joined)."""
        past, new = self.past_length, first_input.shape[1]
        outputs = []
        for start in range(0, new, chunk):
            end = min(start + chunk, new)
            outputs.append(self.run(first_input[:, start:end], attention_mask[:, : past + end],
                                    position_ids[:, start:end]))
        return outputs[-1] if self.ends_in_logits or len(outputs) == 1 else np.concatenate(outputs, axis=1)

    def shared_inputs(self, attention_mask, position_ids, logits_to_keep: int = 1) -> dict[str, np.ndarray]:
        """The inputs every block of one step shares: the prelude's bias and position features, and the mask."""
        shared = {"attention_mask": attention_mask, "position_ids": position_ids}
        shared.update(zip(self.prelude_outputs, self.prelude.run(None, shared)))
        shared["logits_to_keep"] = np.array(logits_to_keep, dtype=np.int64)
        return shared

    @staticmethod
    def feed(loaded: _LoadedBlock, first_input, cache: dict, shared: dict) -> dict[str, np.ndarray]:
        """One block's feed, built from the inputs its session declares (an exporter may drop unused ones)."""
        feed = {}
        for name in loaded.input_names:
            if name in FIRST_INPUTS:
                feed[name] = first_input
            elif name in cache:
                feed[name] = cache[name]
            else:
                feed[name] = shared[name]
        return feed

    def _forward(self, first_input, attention_mask, position_ids, cache, logits_to_keep=1, outputs=None):
        """One step over ``cache``; returns the span's output and the grown cache (the input cache is untouched).
        ``outputs``, when given, collects each block's output by the cut it ends at."""
        if not self.blocks:
            return first_input, cache
        shared = self.shared_inputs(attention_mask, position_ids, logits_to_keep)
        grown = dict(cache)
        output = first_input
        for loaded in self.blocks:
            results = dict(zip(loaded.output_names, loaded.session.run(None, self.feed(loaded, output, cache, shared))))
            for present, past in loaded.cache_moves:
                grown[past] = results[present]
            output = results[loaded.output_names[0]]
            if outputs is not None:
                outputs[loaded.block.layers.end] = output
        return output, grown


def run_together(
    runners: list[SpanRunner],
    first_inputs: list[np.ndarray],
    attention_masks: list[np.ndarray],
    position_ids: list[np.ndarray],
) -> list[np.ndarray]:
    """One step for several runners of the same span as one batch; returns each runner's output.

    Sequences of different past lengths are aligned by left-padding their caches and masks, which the attention
    bias already treats as padding, so each sequence attends to exactly what it would alone. Afterwards each
    runner keeps its own rows of the grown cache, without the padding.
    """
    lead = runners[0]
    pasts = [runner.past_length for runner in runners]
    longest = max(pasts)
    rows = np.cumsum([0] + [len(first) for first in first_inputs])
    new = first_inputs[0].shape[1]
    mask = np.zeros((rows[-1], longest + new), dtype=np.int64)
    cache = {
        name: np.zeros((rows[-1], *lead.kv_shape[:1], longest, lead.kv_shape[1]), dtype=lead.kv_dtype)
        for name in lead.cache
    }
    for index, (runner, past) in enumerate(zip(runners, pasts)):
        span = slice(rows[index], rows[index + 1])
        mask[span, longest - past:] = attention_masks[index]
        for name, stacked in cache.items():
            stacked[span, :, longest - past:] = runner.cache[name]
    output, grown = lead._forward(np.concatenate(first_inputs), mask, np.concatenate(position_ids), cache)
    for index, (runner, past) in enumerate(zip(runners, pasts)):
        span = slice(rows[index], rows[index + 1])
        runner.cache = {name: stacked[span, :, longest - past:] for name, stacked in grown.items()}
    return [output[rows[index]:rows[index + 1]] for index in range(len(runners))]


def _owner(array: np.ndarray) -> np.ndarray:
    """The array whose memory ``array`` views: itself when it owns its memory or onnxruntime does."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def compact(runners: list[SpanRunner]) -> tuple[int, int]:
    """Gives every cache array that keeps a mostly dead array alive a copy of its own; returns the bytes the
    runners' caches cover and the bytes they hold, after.

    After ``run_together`` each runner's cache views the batch's arrays, and a view keeps its whole array
    alive: an idle session would hold its batch-mates' caches long after they moved on or closed. An array is
    copied out once less than half of it is still viewed, so the bytes held stay under twice those in use, and
    sessions that keep stepping together are never copied at all."""
    users: dict[int, tuple[np.ndarray, list[tuple[dict, str]]]] = {}
    for runner in runners:
        for name, array in runner.cache.items():
            owner = _owner(array)
            users.setdefault(id(owner), (owner, []))[1].append((runner.cache, name))
    live = held = 0
    for owner, views in users.values():
        used = sum(cache[name].nbytes for cache, name in views)
        if 2 * used < owner.nbytes:
            for cache, name in views:
                cache[name] = cache[name].copy()
        live += used
        held += used if 2 * used < owner.nbytes else owner.nbytes
    return live, held
