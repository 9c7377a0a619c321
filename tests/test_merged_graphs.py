"""One graph per running span: a span's blocks joined into one graph compute what the blocks compute, in either
KV layout, with the hidden states at the inner cuts when a runner keeps them; the joined graph is written once,
and a runner switches to it between two steps of a running generation."""

from __future__ import annotations

import os

import numpy as np
import pytest

from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool
from seam.runtime.merged_graphs import merged_path
from seam.runtime.spans import Span


def steps(runner, ids: np.ndarray, count: int, switch_at: int | None = None) -> list[np.ndarray]:
    """A prefill of ``ids`` and ``count`` greedy decode steps; at ``switch_at`` the runner joins its blocks."""
    batch, length = ids.shape
    outputs = [runner.run(ids, np.ones((batch, length), np.int64), np.tile(np.arange(length), (batch, 1)))]
    for step in range(count):
        if step == switch_at:
            runner.join_blocks(wait=True)
        past = length + step
        token = outputs[-1][:, -1].argmax(-1)[:, None]
        outputs.append(runner.run(token, np.ones((batch, past + 1), np.int64), np.full((batch, 1), past)))
    return outputs


@pytest.mark.parametrize("kv_layout", ["shared-buffer", "concat"])
def test_a_joined_span_computes_what_its_blocks_compute(exported, kv_layout):
    artifact = Artifact.open(exported("tiny-llama", kv_layout))
    span = Span(0, artifact.num_layers)
    ids = np.random.default_rng(0).integers(1, 200, (2, 7))
    apart = SessionPool(artifact, merge=False).runner(span, keep_boundaries=True)
    joined = SessionPool(artifact).runner(span, keep_boundaries=True)
    for runner in (apart, joined):
        runner.reset(2)
    joined.join_blocks(wait=True)
    assert len(apart.blocks) == artifact.num_layers and len(joined.blocks) == 1
    for want, got in zip(steps(apart, ids, 10), steps(joined, ids, 10)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    for name, array in apart.cache.items():
        np.testing.assert_allclose(joined.cache[name], array, atol=1e-5)
    for cut in apart.boundary_cuts:  # the hidden states at every inner cut, for a split that moves there
        np.testing.assert_allclose(joined.boundary(cut), apart.boundary(cut), atol=1e-5)


def test_the_joined_graph_is_built_once_and_a_runner_switches_to_it_between_steps(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    span = Span(1, artifact.num_layers)
    hidden = np.random.default_rng(1).standard_normal((1, 5, artifact.manifest.dims.hidden_size)).astype(np.float32)
    apart = SessionPool(artifact, merge=False).runner(span)
    apart.reset(1)
    switching = SessionPool(artifact).runner(span)
    switching.reset(1)

    def hidden_steps(runner, switch_at=None):
        outputs = [runner.run(hidden, np.ones((1, 5), np.int64), np.arange(5)[None])]
        for step in range(6):
            if step == switch_at:
                runner.join_blocks(wait=True)
            outputs.append(runner.run(hidden[:, step % 5:step % 5 + 1], np.ones((1, 6 + step), np.int64),
                                      np.array([[5 + step]])))
        return outputs

    for want, got in zip(hidden_steps(apart), hidden_steps(switching, switch_at=3)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(switching.blocks) == 1
    path = merged_path(artifact, span, artifact.manifest.dtype, False)
    written = os.stat(path).st_mtime_ns
    again = SessionPool(artifact).runner(span)
    again.join_blocks(wait=True)  # another process, another pool: it opens the file the first one wrote
    assert len(again.blocks) == 1 and os.stat(path).st_mtime_ns == written
    assert [entry.name for entry in path.parent.iterdir() if entry.name.startswith(".")] == []  # no scratch left


def test_a_span_joined_in_the_background_runs_below_the_steps_priority(exported):
    """The steps keep running the blocks while the join is built; it takes only the CPU they leave idle."""
    import threading

    from seam.runtime.executor import BACKGROUND_NICENESS

    artifact = Artifact.open(exported("tiny-llama"))
    pool = SessionPool(artifact)
    key = (Span(0, artifact.num_layers), artifact.manifest.dtype, False, True)
    seen = []

    def build(in_background: bool) -> None:
        assert pool._build_merged(key, in_background) is not None
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))  # 0: this thread

    for in_background in (True, False):
        thread = threading.Thread(target=build, args=(in_background,))
        thread.start()
        thread.join()
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert seen == [min(ours + BACKGROUND_NICENESS, 19), ours]
