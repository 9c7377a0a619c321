"""Measures every graph of an artifact on this device: prefill and decode latency over a grid, load time, memory.

Blocks run through the runtime's own executor and session options, so what is measured is what the UE and the
edge run. Each block is timed alone, with the prelude's outputs computed once per shape, and the prelude is timed
as a graph of its own since each side of a split runs it once per step. Inputs are random: the cost of these
graphs does not depend on the values.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import psutil

from profiler.host import describe
from profiler.schema import BlockProfile, DeviceProfile, ProfileKey, Timing
from runtime.artifact import DTYPE_BYTES, NUMPY_DTYPES, Artifact
from runtime.executor import SessionPool, SpanRunner, past_names
from runtime.ort_options import PROVIDERS, default_threads, providers_for
from runtime.spans import Span

DEFAULT_PREFILL_LENGTHS = (1, 4, 16, 64, 256, 512)
DEFAULT_PAST_LENGTHS = (0, 32, 128, 512, 2048)


@dataclass
class Grid:
    prefill_lengths: tuple[int, ...] = DEFAULT_PREFILL_LENGTHS
    past_lengths: tuple[int, ...] = DEFAULT_PAST_LENGTHS
    batches: tuple[int, ...] = (1,)
    repeats: int = 10
    warmup: int = 2

    def runs(self, graphs: int) -> int:
        """Timed shapes in all, for the progress bar: prefill at batch 1, decode at every batch."""
        return graphs * (len(self.prefill_lengths) + len(self.past_lengths) * len(self.batches))


def profile_key(artifact: Artifact, device: str, threads: int, variant: str) -> ProfileKey:
    return ProfileKey(artifact.manifest.artifact_fingerprint, device, PROVIDERS[device], threads, variant)


def timed(run: Callable[[], object], repeats: int, warmup: int) -> tuple[float, float]:
    """(median, p90) seconds of ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.9 * len(samples)))]


class _Inputs:
    """Random inputs of the right shapes and dtypes for one artifact."""

    def __init__(self, artifact: Artifact, seed: int = 0):
        self.dims = artifact.manifest.dims
        self.dtype = np.dtype(NUMPY_DTYPES[artifact.manifest.dtype])
        self.rng = np.random.default_rng(seed)

    def first(self, layers: Span, batch: int, new: int) -> np.ndarray:
        if layers.start == 0:
            return self.rng.integers(0, self.dims.vocab_size, size=(batch, new), dtype=np.int64)
        return self.rng.standard_normal((batch, new, self.dims.hidden_size)).astype(self.dtype)

    def cache(self, layers: Span, batch: int, past: int) -> dict[str, np.ndarray]:
        shape = (batch, self.dims.num_kv_heads, past, self.dims.head_dim)
        return {name: self.rng.standard_normal(shape).astype(self.dtype) for layer in layers for name in past_names(layer)}

    @staticmethod
    def positions(batch: int, past: int, new: int) -> tuple[np.ndarray, np.ndarray]:
        mask = np.ones((batch, past + new), dtype=np.int64)
        return mask, np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1))


def _shapes(grid: Grid) -> list[tuple[str, int, int]]:
    """(phase, batch, length): prefill at batch 1 over prompt lengths, decode at each batch over past lengths."""
    prefill = [("prefill", 1, length) for length in grid.prefill_lengths]
    return prefill + [("decode", batch, past) for batch in grid.batches for past in grid.past_lengths]


def _measure_graph(make_run: Callable, grid: Grid, advance: Callable[[], None]) -> dict[str, list]:
    """Times ``make_run(batch, past, new)()`` at every shape of the grid."""
    timings = {"prefill": [], "decode": []}
    for phase, batch, length in _shapes(grid):
        past, new = (0, length) if phase == "prefill" else (length, 1)
        median, p90 = timed(make_run(batch, past, new), grid.repeats, grid.warmup)
        timings[phase].append(Timing(batch, length, median, p90))
        advance()
    return timings


def _block_run(runner: SpanRunner, inputs: _Inputs) -> Callable:
    def make_run(batch: int, past: int, new: int) -> Callable[[], object]:
        loaded = runner.blocks[0]
        shared = runner.shared_inputs(*inputs.positions(batch, past, new))
        feed = runner.feed(loaded, inputs.first(runner.span, batch, new), inputs.cache(runner.span, batch, past), shared)
        return lambda: loaded.session.run(None, feed)

    return make_run


def _prelude_run(session, inputs: _Inputs) -> Callable:
    def make_run(batch: int, past: int, new: int) -> Callable[[], object]:
        mask, positions = inputs.positions(batch, past, new)
        feed = {"attention_mask": mask, "position_ids": positions}
        return lambda: session.run(None, feed)

    return make_run


def _rss() -> int:
    return psutil.Process().memory_info().rss


def profile_device(
    artifact: Artifact,
    device: str = "cpu",
    threads: int | None = None,
    variant: str | None = None,
    grid: Grid | None = None,
    progress: bool = True,
) -> DeviceProfile:
    grid = grid or Grid()
    providers_for(device)  # refuses an unavailable device before anything is measured
    threads = threads or default_threads()
    manifest = artifact.manifest
    variant = variant or manifest.dtype
    pool = SessionPool(artifact, threads, device)
    inputs = _Inputs(artifact)
    dtype_bytes = DTYPE_BYTES[manifest.dtype]

    from tqdm import tqdm

    bar = tqdm(total=grid.runs(len(manifest.blocks) + 1), desc="profiling", unit="shape", disable=not progress,
               file=sys.stderr)
    try:
        before = _rss()
        started = time.perf_counter()
        prelude_session = pool.session(manifest.prelude)
        prelude = BlockProfile(
            index=-1, layers=(0, 0), variant=manifest.dtype, weight_bytes=manifest.prelude.weight_bytes,
            load_s=time.perf_counter() - started, load_rss_bytes=max(_rss() - before, 0),
            kv_bytes_per_token=0, activation_bytes_per_token=0,
            **_measure_graph(_prelude_run(prelude_session, inputs), grid, bar.update),
        )
        blocks = []
        for block in manifest.blocks:
            onnx_file = block.variants[variant]
            before = _rss()
            started = time.perf_counter()
            pool.session(onnx_file)
            load_s, load_rss = time.perf_counter() - started, max(_rss() - before, 0)
            runner = pool.runner(block.layers, variant)
            last = block.layers.end == manifest.dims.num_layers
            blocks.append(BlockProfile(
                index=block.index, layers=(block.layers.start, block.layers.end), variant=variant,
                weight_bytes=onnx_file.weight_bytes, load_s=load_s, load_rss_bytes=load_rss,
                kv_bytes_per_token=len(block.layers) * manifest.kv_bytes_per_token_per_layer,
                # Only a sampled token id leaves the last block; the others hand on a hidden state.
                activation_bytes_per_token=(8 if last else manifest.dims.hidden_size * dtype_bytes),
                **_measure_graph(_block_run(runner, inputs), grid, bar.update),
            ))
    finally:
        bar.close()
    return DeviceProfile(
        key=profile_key(artifact, device, threads, variant),
        host=describe(threads=threads, provider=PROVIDERS[device]),
        settings={
            "prefill_lengths": list(grid.prefill_lengths), "past_lengths": list(grid.past_lengths),
            "batches": list(grid.batches), "repeats": grid.repeats, "warmup": grid.warmup,
        },
        prelude=prelude,
        blocks=blocks,
        num_layers=manifest.dims.num_layers,
        hidden_size=manifest.dims.hidden_size,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
