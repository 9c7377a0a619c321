"""Batched decode steps across sessions of different lengths give each session what it gets alone."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import TINY_PRESETS
from seam.runtime.artifact import Artifact
from seam.runtime.batching import run_together
from seam.runtime.executor import SessionPool
from seam.runtime.spans import Span


def prefilled(pool: SessionPool, span: Span, hidden: np.ndarray):
    runner = pool.runner(span)
    runner.reset(len(hidden))
    length = hidden.shape[1]
    runner.run(hidden, np.ones((len(hidden), length), np.int64), np.tile(np.arange(length), (len(hidden), 1)))
    return runner


@pytest.mark.parametrize("shared_rows", [False, True], ids=["own-caches", "rows-of-one-arena"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_run_together_matches_each_runner_alone(exported, preset, shared_rows):
    """With ``shared_rows`` (an edge's pool, shared-buffer artifacts) the sessions' caches are rows of one arena
    and a batched step writes them in place: nothing is stacked into a batch and back."""
    artifact = Artifact.open(exported(preset))
    pool = SessionPool(artifact)
    batched_pool = SessionPool(artifact, shared_rows=shared_rows)
    span = Span(1, artifact.num_layers)
    hidden_size = artifact.manifest.dims.hidden_size
    rng = np.random.default_rng(0)
    # Past lengths 3, 11 and 6 (batch 2): the window of tiny-mistral (8) is crossed by the longest.
    prompts = [rng.standard_normal((rows, length, hidden_size)).astype(np.float32) for rows, length in ((1, 3), (1, 11), (2, 6))]
    alone = [prefilled(pool, span, prompt) for prompt in prompts]
    together = [prefilled(batched_pool, span, prompt) for prompt in prompts]
    in_arena = shared_rows and artifact.manifest.kv_layout == "shared-buffer"
    for _ in range(12):
        arena = together[0].buffers.arena if in_arena else None
        before = (arena.generation, {name: id(array) for name, array in arena.arrays.items()}) if arena else None
        steps = [rng.standard_normal((len(p), 1, hidden_size)).astype(np.float32) for p in prompts]
        masks = [np.ones((len(p), runner.past_length + 1), np.int64) for p, runner in zip(prompts, alone)]
        positions = [np.full((len(p), 1), runner.past_length, np.int64) for p, runner in zip(prompts, alone)]
        expected = [runner.run(*inputs) for runner, *inputs in zip(alone, steps, masks, positions)]
        produced = run_together(together, steps, masks, positions)
        if arena is not None and arena.generation == before[0]:  # the arena did not grow: written in place
            assert {name: id(array) for name, array in arena.arrays.items()} == before[1]
            assert all(runner.buffers.arena is arena for runner in together)
        for want, got in zip(expected, produced):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-4)
            assert (got.argmax(-1) == want.argmax(-1)).all()
    for a, b in zip(alone, together):
        assert b.past_length == a.past_length
        for name in a.cache:
            np.testing.assert_allclose(b.cache[name], a.cache[name], atol=1e-5)


def test_sessions_between_the_stepping_ones_come_along_without_a_change(exported):
    """Rows of an arena step as one range: sessions between the stepping ones write past their length, which
    their next step writes again, so each gives what it gives alone, whichever sessions step together."""
    artifact = Artifact.open(exported("tiny-llama"))
    span, hidden = Span(1, artifact.num_layers), artifact.manifest.dims.hidden_size
    rng = np.random.default_rng(3)
    prompts = [rng.standard_normal((1, length, hidden)).astype(np.float32) for length in (3, 9, 5, 7, 4, 6)]
    alone = [prefilled(SessionPool(artifact), span, prompt) for prompt in prompts]
    pool = SessionPool(artifact, shared_rows=True)
    together = [prefilled(pool, span, prompt) for prompt in prompts]
    for turn in range(8):
        stepping = [index for index in range(len(prompts)) if (index + turn) % 3 != 0]  # a different subset each turn
        steps = {index: rng.standard_normal((1, 1, hidden)).astype(np.float32) for index in stepping}
        masks = {index: np.ones((1, alone[index].past_length + 1), np.int64) for index in stepping}
        positions = {index: np.array([[alone[index].past_length]]) for index in stepping}
        expected = [alone[index].run(steps[index], masks[index], positions[index]) for index in stepping]
        produced = run_together([together[index] for index in stepping], [steps[index] for index in stepping],
                                [masks[index] for index in stepping], [positions[index] for index in stepping])
        for want, got in zip(expected, produced):
            np.testing.assert_allclose(got, want, atol=1e-4)
    for a, b in zip(alone, together):
        assert b.past_length == a.past_length
        for name in a.cache:
            np.testing.assert_allclose(b.cache[name], a.cache[name], atol=1e-5)


def test_a_long_prefill_lets_the_other_sessions_decode_between_its_chunks(exported):
    """A prompt longer than a prefill chunk runs a chunk at a time between bursts: a session decoding meanwhile
    gets its replies before the long prefill's, which still gives what one pass over the prompt gives."""
    import threading

    from seam.edge_server.process import edge_server
    from seam.runtime.protocol import OpenSession, SessionOpened, Step, StepResult
    from seam.runtime.replies import expect
    from test_edge_memory import hello

    artifact = Artifact.open(exported("tiny-llama"))
    hidden, length = artifact.manifest.dims.hidden_size, 480
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, length, hidden)).astype(np.float32)
    order: list[str] = []
    with edge_server(artifact.root, "--prefill-chunk", "1") as (_, address):
        fingerprint = artifact.manifest.artifact_fingerprint
        long_ue, short_ue = hello(address, fingerprint), hello(address, fingerprint)
        expect(short_ue.request(OpenSession("short", 1, 1, {}, 64)), SessionOpened)
        expect(short_ue.request(Step("short", 0, np.ones((1, 4), np.int64), np.arange(4)[None],
                                     hidden_states=prompt[:, :4])), StepResult)
        expect(long_ue.request(OpenSession("long", 1, 1, {}, length + 1)), SessionOpened)
        replies = {}

        def prefill() -> None:
            replies["long"] = long_ue.request(Step("long", 0, np.ones((1, length), np.int64),
                                                   np.arange(length)[None], hidden_states=prompt))
            order.append("long")

        thread = threading.Thread(target=prefill)
        thread.start()
        time.sleep(0.02)  # the long prompt is on its way first
        for step in range(1, 4):
            expect(short_ue.request(Step("short", step, np.ones((1, 1), np.int64), np.array([[3 + step]]),
                                         hidden_states=prompt[:, 3 + step: 4 + step])), StepResult)
            order.append(f"short {step}")
        thread.join(timeout=60)
        long_ue.close()
        short_ue.close()
    assert order == ["short 1", "short 2", "short 3", "long"], order
    runner = SessionPool(artifact).runner(Span(1, artifact.num_layers))
    runner.reset(1)
    logits = runner.run(prompt, np.ones((1, length), np.int64), np.arange(length)[None])
    assert expect(replies["long"], StepResult).tokens.tolist() == [int(logits[0, -1].argmax())]
