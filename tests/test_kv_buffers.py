"""The shared-buffer KV layout: caches written in place by the graphs, arenas whose rows sessions hold, growth by
doubling, compaction, and the export's refusals."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.kv_buffers import MIN_CAPACITY, DeviceMemory, HostMemory, KvArena, KvBuffers
from seam.runtime.spans import Span

NAMES, SHAPE = ["k", "v"], (2, 4)
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


MEMORIES = {"host": HostMemory, "device": lambda: DeviceMemory("cpu")}  # the device path, in OrtValues on the CPU


def filled(arena: KvArena, batch: int, length: int, value: float) -> KvBuffers:
    buffers = KvBuffers(NAMES, batch, SHAPE, np.dtype(np.float32), arena)
    buffers.assign({name: np.full((batch, SHAPE[0], length, SHAPE[1]), value, np.float32) for name in NAMES})
    return buffers


@pytest.mark.parametrize("memory", MEMORIES)
def test_an_arena_gives_rows_back_and_doubles_keeping_what_it_holds(memory):
    arena = KvArena(NAMES, SHAPE, np.dtype(np.float32), MEMORIES[memory]())
    first, second = filled(arena, 1, 5, 1.0), filled(arena, 2, 7, 2.0)
    assert (first.first_row, second.first_row) == (0, 1) and arena.capacity == MIN_CAPACITY
    del first  # its row is free again
    third = filled(arena, 1, 3, 3.0)
    assert third.first_row == 0
    second.reserve(MIN_CAPACITY + 1)  # every row moves once into twice the positions
    assert arena.capacity == 2 * MIN_CAPACITY
    assert (second.views()["k"] == 2.0).all() and second.views()["k"].shape == (2, 2, 7, 4)
    assert (third.views()["v"] == 3.0).all()
    generation = arena.generation
    values = second.values
    assert second.values is values  # built once per arrangement of the arena
    filled(arena, 3, 2, 4.0)  # no room for three rows: the arena doubles its rows
    assert arena.rows == 6 and arena.generation > generation and second.values is not values


@pytest.mark.parametrize("memory", MEMORIES)
def test_compaction_moves_the_rows_in_use_to_the_front_and_gives_the_rest_back(memory):
    arena = KvArena(NAMES, SHAPE, np.dtype(np.float32), MEMORIES[memory]())
    everyone = [filled(arena, 1, 4, float(index)) for index in range(8)]
    everyone[0].reserve(4 * MIN_CAPACITY)
    kept = everyone[6]
    del everyone
    arena.compact()
    assert kept.first_row == 0 and arena.rows == 2 and arena.capacity == 2 * MIN_CAPACITY
    np.testing.assert_array_equal(kept.views()["k"], np.full((1, 2, 4, 4), 6.0, np.float32))
    assert kept.live_bytes == 2 * 4 * 2 * 4 * 4 and arena.nbytes == 2 * 2 * 2 * 2 * MIN_CAPACITY * 4 * 4


def steps_of(artifact: Artifact, **pool_options) -> list[np.ndarray]:
    """The outputs of a prefill, decode steps, two sessions stepping as one batch over their rows, and a cache
    handed to another runner, as a move does."""
    from seam.runtime.batching import run_together

    span = Span(0, artifact.num_layers)
    pool = SessionPool(artifact, shared_rows=True, **pool_options)
    runners = [pool.runner(span) for _ in range(2)]
    seen = []
    for index, runner in enumerate(runners):
        runner.reset(1)
        prompt = np.arange(1, 6 + index)[None]
        seen.append(runner.run(prompt, np.ones_like(prompt), np.arange(prompt.shape[1])[None]))
    for step in range(4):
        pasts = [runner.past_length for runner in runners]
        seen += run_together(runners, [np.array([[step + 3]])] * 2,
                             [np.ones((1, past + 1), np.int64) for past in pasts], [np.array([[past]]) for past in pasts])
    moved = pool.runner(span)
    moved.cache = runners[1].cache
    past = moved.past_length
    seen.append(moved.run(np.array([[9]]), np.ones((1, past + 1), np.int64), np.array([[past]])))
    return seen


def test_caches_kept_in_device_buffers_give_the_host_buffers_outputs_alone_and_in_a_batch(exported):
    """The path a GPU edge runs (buffers as OrtValues bound by address, rows copied out and in through a copy
    graph), on the CPU, gives what the host buffers give."""
    artifact = Artifact.open(exported("tiny-llama"))
    assert isinstance(SessionPool(artifact, kv_on_device=True).kv_memory, DeviceMemory)
    for host, device in zip(steps_of(artifact), steps_of(artifact, kv_on_device=True), strict=True):
        np.testing.assert_allclose(device, host, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_fp16(artifacts_root) -> Artifact:
    """tiny-llama in fp16: the dtype a GPU edge's GroupQueryAttention runs in."""
    from seam.export.exporter import ExportRequest, export

    out = artifacts_root / "tiny-llama-fp16"
    if not out.exists():
        export(ExportRequest(model="tiny-llama", out=out, quiet=True, dtype="fp16"))
    return Artifact.open(out)


def test_fp16_caches_in_device_buffers_give_the_host_buffers_outputs(tiny_fp16):
    for host, device in zip(steps_of(tiny_fp16), steps_of(tiny_fp16, kv_on_device=True), strict=True):
        np.testing.assert_array_equal(device, host)


def test_shared_fp32_buffers_are_refused_on_cuda(exported):
    with pytest.raises(SeamError, match="export it with --dtype fp16"):
        SessionPool(Artifact.open(exported("tiny-llama")), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu ('make gpu') and a CUDA GPU")
def test_caches_on_the_gpu_give_the_cpu_outputs(tiny_fp16):
    for cpu, gpu in zip(steps_of(tiny_fp16), steps_of(tiny_fp16, device="cuda"), strict=True):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-2, atol=1e-2)
        assert np.argmax(gpu[:, -1], axis=-1).tolist() == np.argmax(cpu[:, -1], axis=-1).tolist()


def test_a_layout_the_family_lacks_is_refused(tmp_path):
    from seam.export.exporter import ExportRequest, export

    with pytest.raises(SeamError, match="--kv-layout shared-buffer is not available for the gpt2 family"):
        export(ExportRequest(model="tiny-gpt2", out=tmp_path / "gpt2", kv_layout="shared-buffer", quiet=True))
    assert not (tmp_path / "gpt2").exists()
