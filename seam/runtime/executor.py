"""Runs one side of a split: the prelude once per step, then the span's graphs, keeping that span's KV cache.

The prelude turns the 2-D attention mask and the position ids into the additive attention bias and the
position features (rotary tables) that every block takes, so they are built once per step instead of once
per block. A span of several blocks runs them until their joined graph is ready (``merged_graphs``), then that
one graph. Feeds are built from each session's declared inputs because an exporter may drop unused ones.
Several sessions' steps as one batch are ``seam.runtime.batching``'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import Future

import numpy as np

from seam.runtime.artifact import FINAL_HIDDEN, NUMPY_DTYPES, Artifact
from seam.runtime.errors import SeamError
from seam.runtime.kv_buffers import DeviceMemory, HostMemory, KvArena, KvBuffers
from seam.runtime.merged_graphs import merged_graph
from seam.runtime.ort_options import open_session
from seam.runtime.spans import Span

FIRST_INPUTS = ("input_ids", "hidden_states")
BACKGROUND_NICENESS = 10  # added to the niceness of a thread joining a span's graphs while its blocks run
log = logging.getLogger("seam.runtime")


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


class _LoadedBlock:
    """One graph a runner runs: a block of the artifact, or a span's blocks joined (``merged_graphs``), whose
    extra ``hidden.CUT`` outputs are the hidden states at the cuts inside it."""

    def __init__(self, layers: Span, session, headless: bool = False):
        self.layers = layers
        self.session = session
        self.input_names = [arg.name for arg in self.session.get_inputs()]
        self.output_names = [arg.name for arg in self.session.get_outputs()]
        # A last block run for private output yields the hidden states before its head: a joined graph without
        # the head has them first; a block kept whole (too large to rewrite) computes its logits as well.
        self.output = FINAL_HIDDEN if headless else self.output_names[0]
        self.cache_moves = [
            (present, past)
            for layer in layers
            for present, past in zip(present_names(layer), past_names(layer))
        ]
        self.inner_cuts = [(int(name.split(".")[1]), name) for name in self.output_names if name.startswith("hidden.")]


class SessionPool:
    """onnxruntime sessions of one artifact, opened on first use and shared by every runner and session.

    Sessions are stateless between runs, so many sequences (and many UEs on an edge) share one per graph.
    """

    def __init__(self, artifact: Artifact, threads: int | None = None, device: str = "cpu", shared_rows: bool = False,
                 merge: bool = True, kv_on_device: bool | None = None):
        self.artifact = artifact
        self.threads = threads
        self.device = device
        if artifact.manifest.kv_layout == "shared-buffer" and device != "cpu" and artifact.manifest.dtype == "fp32":
            # onnxruntime's CUDA GroupQueryAttention takes fp16 and bf16 only: an fp32 one would run on the CPU,
            # away from the buffers it must write in place.
            raise SeamError(f"{artifact.root} keeps its KV cache in shared fp32 buffers, which onnxruntime's "
                            f"GroupQueryAttention does not run on {device}; export it with --dtype fp16 (or "
                            "--kv-layout concat)")
        # The shared-buffer layout's caches live where the blocks run, so a step on a GPU moves only its hidden
        # states across PCIe; ``kv_on_device`` also keeps them in OrtValues on the CPU, to test that path there.
        on_device = device != "cpu" if kv_on_device is None else kv_on_device
        self.kv_memory = DeviceMemory(device) if on_device else HostMemory()
        self._sessions: dict[str, object] = {}
        # With ``shared_rows`` (an edge) every runner of a span keeps its cache in that span's one arena, so
        # sessions stepping together run as one batch over their rows.
        self.arenas: dict[Span, KvArena] | None = {} if shared_rows else None
        # With ``merge`` a span of several blocks runs as one graph once it is built (in the background, while
        # the span's blocks run): (span, variant, boundaries) -> the session being built (None if it failed).
        self.merge = merge
        self._merged: dict[tuple[Span, str, bool, bool], Future] = {}
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

    def runner(self, span: Span, variant: str | None = None, keep_boundaries: bool = False,
               head: bool = True) -> SpanRunner:
        return SpanRunner(self, span, variant, keep_boundaries, head)

    def head_logits(self, final_hidden: np.ndarray) -> np.ndarray:
        """The final norm and LM head on the last layer's hidden states [B, K, H]: logits [B, K, V]."""
        self.artifact.check_private_output()
        session = self.session(self.artifact.manifest.head)
        return session.run(None, {FINAL_HIDDEN: np.ascontiguousarray(final_hidden)})[0]

    def merged_session(self, span: Span, variant: str, boundaries: bool, head: bool = True, wait: bool = False):
        """The session of ``span``'s blocks joined into one graph (``head`` False: without the LM head), or None
        until it is built: the first call starts building it in the background (``wait``: builds it now)."""
        key = (span, variant, boundaries, head)
        with self._opening:
            if key not in self._merged:
                self._merged[key] = Future()
                # Not a daemon: a process that ends meanwhile waits for it, since onnxruntime building a session
                # while the interpreter tears down aborts the process (and the next load finds the file).
                threading.Thread(target=lambda: self._merged[key].set_result(self._build_merged(key, not wait)),
                                 name="join-graphs").start()
            building = self._merged[key]
        return building.result() if wait or building.done() else None

    def _build_merged(self, key: tuple[Span, str, bool, bool], in_background: bool):
        if in_background and hasattr(os, "setpriority"):
            # Built while the span's blocks run on, it takes only CPU the steps leave idle: on a device whose
            # cores the steps keep busy, a join at the same priority slowed every step until it was done.
            thread = threading.get_native_id()
            with contextlib.suppress(OSError):  # a priority it may not change leaves it as it is
                os.setpriority(os.PRIO_PROCESS, thread,
                               min(os.getpriority(os.PRIO_PROCESS, thread) + BACKGROUND_NICENESS, 19))
        try:
            return open_session(str(merged_graph(self.artifact, *key)), self.threads, self.device)
        except Exception as error:  # the blocks keep running: slower, never wrong
            log.warning("could not join the graphs of layers %s (%s: %s); running its blocks", key[0],
                        type(error).__name__, error)
            return None

    def arena(self, span: Span, names: list[str], kv_shape: tuple[int, int], dtype: np.dtype) -> KvArena | None:
        """The arena every runner of ``span`` shares, or None where each keeps its own."""
        if self.arenas is None:
            return None
        return self.arenas.setdefault(span, KvArena(names, kv_shape, dtype, self.kv_memory))


class SpanRunner:
    """The blocks of ``span`` in onnxruntime with the KV cache of their layers for one batch of sequences.

    With ``keep_boundaries`` it also keeps, for every position so far, the hidden states after each block that
    ends before the last layer: a split that moves to one of those cuts hands them to the other side, which
    recomputes the cache of the layers it takes over from far fewer bytes than the cache itself.
    """

    def __init__(self, pool: SessionPool, span: Span, variant: str | None = None, keep_boundaries: bool = False,
                 head: bool = True):
        manifest = pool.artifact.manifest
        self.span = span
        self.num_layers = manifest.dims.num_layers
        # Without ``head`` a span ending at the last layer returns the hidden states before the final norm and
        # the LM head (``FINAL_HIDDEN``), which the UE turns into logits itself (private output).
        self.head = head
        headless = not head and span.end == self.num_layers
        if headless:
            pool.artifact.check_private_output()
        self.variant = variant or manifest.dtype
        self.kv_dtype = np.dtype(NUMPY_DTYPES[manifest.dtype])
        self.kv_shape = (manifest.dims.num_kv_heads, manifest.dims.head_dim)
        blocks = pool.artifact.blocks_for(span)
        self.blocks = [
            _LoadedBlock(block.layers, pool.session(block.variants[self.variant]),
                         headless=headless and block.layers.end == self.num_layers)
            for block in blocks
        ]
        # Until the span's joined graph replaces its blocks; a headless span is one graph rewritten even when it
        # is one block, so that the edge does not compute logits it does not send.
        self.merging = pool.merge and (len(self.blocks) > 1 or headless)
        self.prelude = pool.session(manifest.prelude) if self.blocks else None
        self.prelude_outputs = [arg.name for arg in self.prelude.get_outputs()] if self.prelude else []
        self.pool = pool
        # The concat layout keeps the cache as arrays it replaces every step; the shared-buffer one in buffers
        # the blocks write in place (``seam.runtime.kv_buffers``).
        self.buffers: KvBuffers | None = None
        self.shared_buffers = manifest.kv_layout == "shared-buffer" and len(span) > 0
        self._cache: dict[str, np.ndarray] = {}
        self.keep_boundaries = keep_boundaries
        # cut -> hidden states there, in chunks along positions; only cuts seen from the first position on
        self.boundaries: dict[int, list[np.ndarray]] = {}
        self.boundary_cuts = [b.layers.end for b in self.blocks if b.layers.end < self.num_layers]

    def join_blocks(self, wait: bool = False) -> None:
        """Runs the span as one graph from the next step on, once the pool has it (``wait``: now)."""
        if not self.merging:
            return
        session = self.pool.merged_session(self.span, self.variant, self.keep_boundaries, self.head, wait)
        if session is not None:
            self.blocks, self.merging = [_LoadedBlock(self.span, session)], False
        elif wait:  # it could not be built: the blocks run on, as they are
            self.merging = False

    @property
    def cache(self) -> dict[str, np.ndarray]:
        """Each layer's keys and values so far by past input name, [B, kv_heads, past, head_dim]."""
        return self.buffers.views() if self.buffers is not None else self._cache

    @cache.setter
    def cache(self, cache: dict[str, np.ndarray]) -> None:
        if self.shared_buffers:
            self.buffers = self.buffers or self.new_buffers(0)
            self.buffers.assign(cache)
        else:
            self._cache = cache

    def new_buffers(self, batch: int, own: bool = False) -> KvBuffers:
        """Buffers for ``batch`` sequences: in the span's shared arena where the pool keeps one, unless ``own``."""
        names = [name for layer in self.span for name in past_names(layer)]
        arena = None if own else self.pool.arena(self.span, names, self.kv_shape, self.kv_dtype)
        return KvBuffers(names, batch, self.kv_shape, self.kv_dtype, arena, self.pool.kv_memory)

    def reset(self, batch: int) -> None:
        """Start new sequences: an empty cache (past length 0) for every layer of the span."""
        if self.shared_buffers:
            self.buffers = self.new_buffers(batch)
        else:
            empty = np.zeros((batch, self.kv_shape[0], 0, self.kv_shape[1]), dtype=self.kv_dtype)
            self._cache = {name: empty for layer in self.span for name in past_names(layer)}
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
    def ends_at_last_layer(self) -> bool:
        """Whether a step's output is the last position's logits, or without the head its hidden states there."""
        return self.span.end == self.num_layers

    @property
    def past_length(self) -> int:
        if self.buffers is not None:
            return self.buffers.length
        return next(iter(self._cache.values())).shape[2] if self._cache else 0

    def run(
        self,
        first_input: np.ndarray,  # input_ids [B, S] int64, or hidden_states [B, S, H]
        attention_mask: np.ndarray,  # [B, past + S] int64, 0 on left padding
        position_ids: np.ndarray,  # [B, S] int64
        logits_to_keep: int = 1,
    ) -> np.ndarray:
        """Runs the span for one step and returns its output: hidden states [B, S, H] or logits [B, K, V]."""
        self.join_blocks()
        outputs: dict[int, np.ndarray] | None = {} if self.boundaries else None
        if self.buffers is not None:
            output = self._forward_in_place(first_input, attention_mask, position_ids, self.buffers, logits_to_keep,
                                            outputs)
        else:
            output, self._cache = self._forward(first_input, attention_mask, position_ids, self._cache,
                                                logits_to_keep, outputs)
        for cut, hidden in (outputs or {}).items():
            if cut in self.boundaries:
                self.boundaries[cut].append(hidden)
        return output

    def run_in_chunks(self, first_input: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                      chunk: int) -> np.ndarray:
        """The step ``run`` takes, ``chunk`` positions at a time: a long prefill's attention scores grow with the
        square of its length, a chunk's only with its own. Returns what ``run`` would: the last position's
        logits or hidden states before the head (the last chunk's), or the hidden states of every position (each
        chunk's, joined)."""
        past, new = self.past_length, first_input.shape[1]
        outputs = []
        for start in range(0, new, chunk):
            end = min(start + chunk, new)
            outputs.append(self.run(first_input[:, start:end], attention_mask[:, : past + end],
                                    position_ids[:, start:end]))
        return outputs[-1] if self.ends_at_last_layer or len(outputs) == 1 else np.concatenate(outputs, axis=1)

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
            output = results[loaded.output]
            if outputs is not None:
                outputs.update({cut: results[name] for cut, name in loaded.inner_cuts})
                outputs[loaded.layers.end] = output
        return output, grown

    def _forward_in_place(self, first_input, attention_mask, position_ids, buffers: KvBuffers, logits_to_keep=1,
                          outputs=None) -> np.ndarray:
        """One step that writes the new positions into ``buffers`` and returns the span's output; ``outputs`` as
        for ``_forward``. A run that fails leaves ``buffers.length`` as it was: whatever it wrote lies beyond the
        positions so far, where the next step writes again."""
        if not self.blocks:
            return first_input
        batch, new = first_input.shape[:2]
        past = buffers.length
        buffers.reserve(past + new)
        shared = self.shared_inputs(attention_mask, position_ids, logits_to_keep)
        if new > 1 and past and batch > 1:
            # GroupQueryAttention takes positions after a past one sequence at a time: each row runs alone over
            # its own rows of the buffers, which share their memory.
            rows = [self.run_bound(first_input[row: row + 1],
                                   {name: value[row: row + 1] if value.ndim else value
                                    for name, value in shared.items()},
                                   buffers.row_values(row), None if outputs is None else {}) for row in range(batch)]
            output = np.concatenate([row_output for row_output, _ in rows])
            for cut in (rows[0][1] or {}):
                outputs[cut] = np.concatenate([row_outputs[cut] for _, row_outputs in rows])
        else:
            output, _ = self.run_bound(first_input, shared, buffers.values, outputs)
        buffers.length = past + new
        return output

    def run_bound(self, first_input, shared: dict, values: dict,
                  outputs: dict | None) -> tuple[np.ndarray, dict | None]:
        """The span's blocks with each layer's buffer bound as its past and its present."""
        output = first_input
        for loaded in self.blocks:
            binding = loaded.session.io_binding()
            for name in loaded.input_names:
                if name in values:
                    at = values[name]
                    binding.bind_input(name, at.device, at.device_id, at.dtype, at.shape, at.pointer)
                else:
                    fed = output if name in FIRST_INPUTS else shared[name]
                    # (ascontiguousarray would make a scalar, logits_to_keep, one-dimensional)
                    binding.bind_cpu_input(name, fed if fed.flags.c_contiguous else np.ascontiguousarray(fed))
            binding.bind_output(loaded.output)
            for _, name in loaded.inner_cuts:
                binding.bind_output(name)
            for present, past in loaded.cache_moves:
                at = values[past]
                binding.bind_output(present, at.device, at.device_id, at.dtype, at.shape, at.pointer)
            loaded.session.run_with_iobinding(binding)
            produced = binding.get_outputs()
            output = produced[0].numpy()
            if outputs is not None:
                outputs.update({cut: value.numpy() for (cut, _), value in zip(loaded.inner_cuts, produced[1:])})
                outputs[loaded.layers.end] = output
        return output, outputs
