"""The shared-buffer KV layout: caches written in place by the graphs, arenas whose rows sessions hold, growth by
doubling, compaction, and the export's refusals."""

from __future__ import annotations

import numpy as np
import pytest

from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.kv_buffers import MIN_CAPACITY, KvArena, KvBuffers
from seam.runtime.spans import Span

NAMES, SHAPE = ["k", "v"], (2, 4)


def filled(arena: KvArena, batch: int, length: int, value: float) -> KvBuffers:
    buffers = KvBuffers(NAMES, batch, SHAPE, np.dtype(np.float32), arena)
    buffers.assign({name: np.full((batch, SHAPE[0], length, SHAPE[1]), value, np.float32) for name in NAMES})
    return buffers


def test_an_arena_gives_rows_back_and_doubles_keeping_what_it_holds():
    arena = KvArena(NAMES, SHAPE, np.dtype(np.float32))
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


def test_compaction_moves_the_rows_in_use_to_the_front_and_gives_the_rest_back():
    arena = KvArena(NAMES, SHAPE, np.dtype(np.float32))
    everyone = [filled(arena, 1, 4, float(index)) for index in range(8)]
    everyone[0].reserve(4 * MIN_CAPACITY)
    kept = everyone[6]
    del everyone
    arena.compact()
    assert kept.first_row == 0 and arena.rows == 2 and arena.capacity == 2 * MIN_CAPACITY
    np.testing.assert_array_equal(kept.views()["k"], np.full((1, 2, 4, 4), 6.0, np.float32))


def test_decode_steps_write_the_cache_in_place(exported):
    """Nothing of the cache moves in a step: the buffers are the same memory before and after, and a step
    writes exactly its own position."""
    artifact = Artifact.open(exported("tiny-llama"))
    assert artifact.manifest.kv_layout == "shared-buffer"
    runner = SessionPool(artifact).runner(Span(0, artifact.num_layers))
    runner.reset(1)
    runner.run(np.arange(1, 9)[None], np.ones((1, 8), np.int64), np.arange(8)[None])
    arrays = {name: id(array) for name, array in runner.buffers.arena.arrays.items()}
    for past in range(8, 30):
        before = {name: view.copy() for name, view in runner.cache.items()}
        runner.run(np.array([[past % 7 + 1]]), np.ones((1, past + 1), np.int64), np.array([[past]]))
        after = runner.cache
        assert all(after[name].shape[2] == past + 1 for name in after)
        for name, earlier in before.items():
            np.testing.assert_array_equal(after[name][:, :, :past], earlier)
    assert {name: id(array) for name, array in runner.buffers.arena.arrays.items()} == arrays


def test_a_layout_the_family_lacks_and_shared_buffers_on_cuda_are_refused(tmp_path, exported):
    from seam.export.exporter import ExportRequest, export

    with pytest.raises(SeamError, match="--kv-layout shared-buffer is not available for the gpt2 family"):
        export(ExportRequest(model="tiny-gpt2", out=tmp_path / "gpt2", kv_layout="shared-buffer", quiet=True))
    assert not (tmp_path / "gpt2").exists()
    with pytest.raises(SeamError, match="export it with --kv-layout concat for --device cuda"):
        SessionPool(Artifact.open(exported("tiny-llama")), device="cuda")
