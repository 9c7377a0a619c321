"""Batched decode steps across sessions of different lengths give each session what it gets alone."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_PRESETS
from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool, run_together
from seam.runtime.spans import Span


def prefilled(pool: SessionPool, span: Span, hidden: np.ndarray):
    runner = pool.runner(span)
    runner.reset(len(hidden))
    length = hidden.shape[1]
    runner.run(hidden, np.ones((len(hidden), length), np.int64), np.tile(np.arange(length), (len(hidden), 1)))
    return runner


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_run_together_matches_each_runner_alone(exported, preset):
    artifact = Artifact.open(exported(preset))
    pool = SessionPool(artifact)
    span = Span(1, artifact.num_layers)
    hidden_size = artifact.manifest.dims.hidden_size
    rng = np.random.default_rng(0)
    # Past lengths 3, 11 and 6 (batch 2): the window of tiny-mistral (8) is crossed by the longest.
    prompts = [rng.standard_normal((rows, length, hidden_size)).astype(np.float32) for rows, length in ((1, 3), (1, 11), (2, 6))]
    alone = [prefilled(pool, span, prompt) for prompt in prompts]
    together = [prefilled(pool, span, prompt) for prompt in prompts]
    for _ in range(12):
        steps = [rng.standard_normal((len(p), 1, hidden_size)).astype(np.float32) for p in prompts]
        masks = [np.ones((len(p), runner.past_length + 1), np.int64) for p, runner in zip(prompts, alone)]
        positions = [np.full((len(p), 1), runner.past_length, np.int64) for p, runner in zip(prompts, alone)]
        expected = [runner.run(*inputs) for runner, *inputs in zip(alone, steps, masks, positions)]
        produced = run_together(together, steps, masks, positions)
        for want, got in zip(expected, produced):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-4)
            assert (got.argmax(-1) == want.argmax(-1)).all()
    for a, b in zip(alone, together):
        assert b.past_length == a.past_length
        for name in a.cache:
            np.testing.assert_allclose(b.cache[name], a.cache[name], atol=1e-5)
