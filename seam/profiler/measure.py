"""Measures every graph of an artifact on this device: prefill and decode latency over a grid, load time, memory.

Blocks run through the runtime's own executor and session options, so what is measured is what the UE and the
edge run. At each shape the prelude and every block run one after another, as in a split, and each is timed on
its own; the prelude is a graph of its own since each side of a split runs it once per step. Inputs are random:
the cost of these graphs does not depend on the values.

Each chain starts after an idle gap, because in a split each side idles while the other side and the link work:
its threads have parked and its CPU has gone idle by the time the next step arrives. Timed back to back, a decode
step of a few layers measured a third faster than it runs in a split.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import onnxruntime as ort
import psutil

from seam.profiler.host import describe
from seam.planning.loading import profile_key
from seam.planning.schema import BlockProfile, DeviceProfile, Timing, p90
from seam.runtime.artifact import DTYPE_BYTES, FINAL_HIDDEN, NUMPY_DTYPES, Artifact
from seam.runtime.executor import SessionPool, SpanRunner, past_names
from seam.runtime.ort_options import PROVIDERS, default_threads, providers_for
from seam.runtime.shell import bar_disabled
from seam.runtime.spans import Span

DEFAULT_PREFILL_LENGTHS = (1, 4, 16, 64, 256, 512)
DEFAULT_PAST_LENGTHS = (0, 32, 128, 512, 2048)
IDLE_GAP_S = 0.02  # about one decode step of a small model: what each side of a split waits between its turns


@dataclass
class Grid:
    prefill_lengths: tuple[int, ...] = DEFAULT_PREFILL_LENGTHS
    past_lengths: tuple[int, ...] = DEFAULT_PAST_LENGTHS
    batches: tuple[int, ...] = (1,)
    repeats: int = 10
    warmup: int = 2
    gap_s: float = IDLE_GAP_S
    io_binding: bool = False  # what 'seam profile' turns on for CUDA, where it keeps data on the GPU

    def settings(self) -> dict:
        """As stored in a profile; a cached profile is reused only when they match."""
        return {
            "prefill_lengths": list(self.prefill_lengths), "past_lengths": list(self.past_lengths),
            "batches": list(self.batches), "repeats": self.repeats, "warmup": self.warmup, "gap_s": self.gap_s,
            "io_binding": self.io_binding,
        }


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


def _time_in_chain(runs: list[Callable[[], object]], grid: Grid) -> list[tuple[float, float]]:
    """(median, p90) seconds of each run, timed one after another as a chain of blocks runs, after an idle gap.

    Timing a block in a loop of its own would keep its weights in the CPU caches and report half the time it
    takes inside a split, where each block finds the caches full of the previous block's weights.
    """
    samples: list[list[float]] = [[] for _ in runs]
    for attempt in range(grid.warmup + grid.repeats):
        time.sleep(grid.gap_s)
        for run, times in zip(runs, samples):
            started = time.perf_counter()
            run()
            if attempt >= grid.warmup:
                times.append(time.perf_counter() - started)
    return [(statistics.median(times), p90(times)) for times in samples]


def _call(session, feed: dict[str, np.ndarray], device: str, bind: bool) -> Callable[[], object]:
    """One run of ``session`` on ``feed``, as it will be timed.

    With IO binding the inputs are placed on the device beforehand and the outputs stay there, so a GPU's time
    is its compute rather than host copies of a KV cache that a serving runtime keeps on the device.
    """
    if not bind:
        return lambda: session.run(None, feed)
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device, 0)

    def run() -> list:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # CUDA runs asynchronously: the time must include the kernels
        return binding.get_outputs()

    return run


def _block_run(runner: SpanRunner, inputs: _Inputs, device: str, bind: bool) -> Callable:
    def make_run(batch: int, past: int, new: int) -> Callable[[], object]:
        loaded = runner.blocks[0]
        shared = runner.shared_inputs(*inputs.positions(batch, past, new))
        first, cache = inputs.first(runner.span, batch, new), inputs.cache(runner.span, batch, past)
        if runner.shared_buffers:  # as a step runs: the buffers bound in place, on the device (every run
            # writes the same new positions again)
            buffers = runner.new_buffers(batch)
            buffers.assign(cache)
            buffers.reserve(past + new)
            return lambda: runner.run_bound(first, shared, buffers.values, None)
        return _call(loaded.session, runner.feed(loaded, first, cache, shared), device, bind)

    return make_run


def _prelude_run(session, inputs: _Inputs, device: str, bind: bool) -> Callable:
    def make_run(batch: int, past: int, new: int) -> Callable[[], object]:
        mask, positions = inputs.positions(batch, past, new)
        return _call(session, {"attention_mask": mask, "position_ids": positions}, device, bind)

    return make_run


def _head_run(session, inputs: _Inputs, device: str, bind: bool) -> Callable:
    def make_run(batch: int, past: int, new: int) -> Callable[[], object]:
        # Only the last position reaches the head, at a prefill as at a decode step.
        final = inputs.rng.standard_normal((batch, 1, inputs.dims.hidden_size)).astype(inputs.dtype)
        return _call(session, {FINAL_HIDDEN: final}, device, bind)

    return make_run


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _cuda_bytes() -> int | None:
    """GPU memory this process holds, as nvidia-smi reports it; None where there is no nvidia-smi to ask.

    onnxruntime's CUDA arena never returns memory, so what the process holds after profiling is its peak.
    """
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [int(mib) for pid, mib in (line.split(", ") for line in listing.splitlines() if ", " in line)
            if pid.strip() == str(os.getpid()) and mib.strip().isdigit()]
    return sum(used) << 20 if used else None


def _block_profiles(manifest, variant: str, loads: list[tuple[float, int]],
                    timings: list[dict[str, list[Timing]]]) -> tuple[BlockProfile, list[BlockProfile]]:
    """The prelude's and each block's profile from their load costs and timings (the prelude's first)."""
    prelude = BlockProfile(
        index=-1, layers=(0, 0), variant=manifest.dtype, weight_bytes=manifest.prelude.weight_bytes,
        load_s=loads[0][0], load_rss_bytes=loads[0][1], kv_bytes_per_token=0, activation_bytes_per_token=0,
        **timings[0],
    )
    blocks = [
        BlockProfile(
            index=block.index, layers=(block.layers.start, block.layers.end), variant=variant,
            weight_bytes=block.variants[variant].weight_bytes, load_s=load_s, load_rss_bytes=load_rss,
            kv_bytes_per_token=len(block.layers) * manifest.kv_bytes_per_token_per_layer,
            # Only a sampled token id leaves the last block; the others hand on a hidden state.
            activation_bytes_per_token=(
                8 if block.layers.end == manifest.dims.num_layers else manifest.dims.hidden_size * DTYPE_BYTES[manifest.dtype]
            ),
            **graph_timings,
        )
        for block, (load_s, load_rss), graph_timings in zip(manifest.blocks, loads[1:], timings[1:])
    ]
    return prelude, blocks


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

    from tqdm import tqdm

    graphs = [_prelude_run(pool.session(manifest.prelude), inputs, device, grid.io_binding)]
    loads = [(0.0, 0)]  # the prelude is tiny; its load is not worth reporting apart
    for block in manifest.blocks:
        before, started = _rss(), time.perf_counter()
        pool.session(block.variants[variant])
        loads.append((time.perf_counter() - started, max(_rss() - before, 0)))
        graphs.append(_block_run(pool.runner(block.layers, variant), inputs, device, grid.io_binding))
    if manifest.head is not None:  # timed last, after the last block, as a UE keeping the output private runs it
        graphs.append(_head_run(pool.session(manifest.head), inputs, device, grid.io_binding))

    timings: list[dict[str, list[Timing]]] = [{"prefill": [], "decode": []} for _ in graphs]
    shapes = _shapes(grid)
    for phase, batch, length in tqdm(shapes, desc="profiling", unit="shape", disable=bar_disabled(not progress), file=sys.stderr):
        past, new = (0, length) if phase == "prefill" else (length, 1)
        measured = _time_in_chain([make_run(batch, past, new) for make_run in graphs], grid)
        for graph, (median, p90) in zip(timings, measured):
            graph[phase].append(Timing(batch, length, median, p90))

    head = None
    if manifest.head is not None:
        layers = (manifest.dims.num_layers, manifest.dims.num_layers)
        head = BlockProfile(index=-2, layers=layers, variant=manifest.dtype, weight_bytes=manifest.head.weight_bytes,
                            load_s=0.0, load_rss_bytes=0, kv_bytes_per_token=0, activation_bytes_per_token=8,
                            **timings.pop())
    prelude, blocks = _block_profiles(manifest, variant, loads, timings)
    return DeviceProfile(
        key=profile_key(artifact, device, threads, variant),
        host=describe(threads=threads, provider=PROVIDERS[device]),
        settings=grid.settings(),
        prelude=prelude,
        blocks=blocks,
        head=head,
        num_layers=manifest.dims.num_layers,
        hidden_size=manifest.dims.hidden_size,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_cuda_bytes=_cuda_bytes() if device == "cuda" else None,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
