"""Moving the split in the middle of a generation, through a real edge_server: the tokens never change."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_PRESETS
from seam.edge_server.process import edge_server
from seam.planning.snapshot import Decision
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.migration import pack_kv, resplit, unpack_kv
from seam.runtime.protocol import Resplit, Resplitted
from seam.runtime.sampling import SamplingParams
from seam.runtime.spans import Span
from test_runtime import NEW_TOKENS, PROMPTS, local_tokens
from seam.ue_client.client import EdgeClient


def scheduled(schedule: dict[int, int]):
    """A policy that moves the split to ``schedule[step]`` before that step."""
    return lambda snapshot: Decision(schedule[snapshot.step], {}, "scheduled") if snapshot.step in schedule else None


def moving_tokens(client: EdgeClient, start: int, schedule: dict[int, int], sampling: SamplingParams):
    with client.session(start, sampling, allow_token_upload=True) as session:
        tokens = np.stack(list(session.generate(PROMPTS, NEW_TOKENS, scheduled(schedule))), axis=1)
    return tokens, session


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_moving_the_split_both_ways_never_changes_the_tokens(exported, preset):
    artifact = Artifact.open(exported(preset))
    points = artifact.split_points
    last = points[-1]
    middle = points[len(points) // 2]
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11)
    # Deeper, shallower, all the way to the UE and back, down to split 0: every kind of move in one generation.
    schedule = {2: last - 1 if last - 1 in points else middle, 3: points[1], 5: last, 7: middle, 8: 0, 9: points[1]}
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        for params in (greedy, sampled):
            tokens, session = moving_tokens(client, middle, schedule, params)
            assert (tokens == local_tokens(artifact, PROMPTS, params)).all(), f"{preset}, {params}"
            moved = [(move.before_step, move.to_split) for move in session.moves]
            assert moved == [(step, split) for step, split in schedule.items() if split != middle or step != 2]
            assert all(move.sent_bytes > 0 for move in session.moves)
            assert session.split == points[1] and not session.open  # closed after the generation


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_recomputing_the_moved_layers_instead_of_carrying_their_cache_keeps_the_tokens(exported, preset):
    artifact = Artifact.open(exported(preset))
    last, hidden_size = artifact.num_layers, artifact.manifest.dims.hidden_size
    params = SamplingParams(temperature=0.9, top_k=40, seed=7)
    # (split, rebuild) before each step: the UE rebuilds from the hidden states it kept at 1 and then from the
    # tokens, the edge from the hidden states the UE sends, at a running split and when the session reopens.
    moves = {2: (2, True), 3: (1, True), 4: (last, True), 6: (1, True), 7: (3, False), 8: (1, True), 9: (2, True)}

    kept = []

    def policy(snapshot):
        kept.append((1 in snapshot.kept, 2 in snapshot.kept))
        if snapshot.step in moves:
            split, rebuild = moves[snapshot.step]
            return Decision(split, {}, "scheduled", rebuild)
        return None

    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        with client.session(1, params) as session:
            tokens = np.stack(list(session.generate(PROMPTS, NEW_TOKENS, policy)), axis=1)
    # After downloading the cache of layers [1, 3) before step 7 the UE holds no hidden states at 2 to send.
    assert kept[7] == (True, False) and kept[5] == (True, True)
    assert (tokens == local_tokens(artifact, PROMPTS, params)).all()
    past = [len(PROMPTS[0]) + move.before_step - 1 for move in session.moves]
    hidden_bytes = [len(PROMPTS) * p * hidden_size * 4 for p in past]
    expected = [0, hidden_bytes[1], 0, hidden_bytes[3], None, hidden_bytes[5], 0]
    assert [m.sent_bytes for m, want in zip(session.moves, expected) if want is not None] == \
        [want for want in expected if want is not None]
    assert session.moves[4].sent_bytes > hidden_bytes[4]  # the cache of two layers outweighs the hidden states


def test_recomputing_needs_the_hidden_states_at_the_new_split(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        with client.session(1) as session:
            steps = session.generate(PROMPTS, NEW_TOKENS)
            produced = [next(steps), next(steps)]
            session.move_split(3)  # the cache comes down: the UE never saw the hidden states at 2
            with pytest.raises(SeamError, match="kept no hidden states at layer 2"):
                session.move_split(2, rebuild=True)
            # A mask that does not match the edge's sequences is refused, and the session goes on.
            hidden = session.head.boundary(1)
            with pytest.raises(SeamError, match="attention mask of a recomputed cache"):
                session.request(Resplit(session.session_id, session.edge_step, 1, hidden_states=hidden,
                                         attention_mask=session.mask[:, :-2]), Resplitted)
            with pytest.raises(SeamError, match="boundary hidden states must be float32"):
                session.request(Resplit(session.session_id, session.edge_step, 1, hidden_states=hidden[:, :, :-1],
                                         attention_mask=session.mask[:, : session.past]), Resplitted)
            produced += list(steps)
    assert (np.stack(produced, axis=1) == local_tokens(artifact, PROMPTS, SamplingParams())).all()


def test_a_generation_can_start_on_the_ue_alone(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    last = artifact.num_layers
    params = SamplingParams(temperature=0.8, seed=5)
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        tokens, session = moving_tokens(client, last, {4: 1, 6: last}, params)
    assert (tokens == local_tokens(artifact, PROMPTS, params)).all()
    assert [t.edge_s > 0 for t in session.stats.timings] == [False] * 4 + [True] * 2 + [False] * 4


def test_the_edge_refuses_bad_moves_and_keeps_the_session(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        with client.session(2) as session:
            steps = session.generate(PROMPTS, NEW_TOKENS)
            produced = [next(steps), next(steps)]
            with pytest.raises(SeamError, match="split 0 sends raw token ids"):
                session.move_split(0)
            with pytest.raises(SeamError, match="not a split point"):
                session.move_split(99)
            # A cache of the wrong length is refused by the edge, which goes on serving the session.
            wrong = pack_kv(session.head.cache, Span(1, 2))[:, :, :-1]
            with pytest.raises(SeamError, match="KV cache of layers \\[1, 2\\) must be"):
                session.request(Resplit(session.session_id, session.edge_step, 1, kv=wrong), Resplitted)
            produced += list(steps)
    expected = local_tokens(artifact, PROMPTS, SamplingParams())
    assert (np.stack(produced, axis=1) == expected).all()


def test_packing_round_trips_and_resplit_keeps_every_other_layer(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    pool = SessionPool(artifact)
    runner = pool.runner(Span(0, 3))
    runner.reset(2)
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    runner.run(ids, np.ones((2, 3), np.int64), np.tile(np.arange(3), (2, 1)))

    packed = pack_kv(runner.cache, Span(1, 3))
    unpacked = unpack_kv(packed, Span(1, 3), runner, batch=2, past=3)
    shorter = resplit(pool, runner, Span(0, 1), {})

    assert packed.shape == (2 * 2 * 2, *runner.cache["past_key_values.1.key"].shape[1:])
    assert all(np.array_equal(unpacked[name], runner.cache[name]) for name in unpacked)
    assert set(shorter.cache) == {"past_key_values.0.key", "past_key_values.0.value"}
    with pytest.raises(SeamError, match="must be float32 of shape"):
        unpack_kv(packed[:4], Span(1, 3), runner, batch=2, past=3)
    with pytest.raises(SeamError, match="does not carry"):
        unpack_kv(None, Span(1, 3), runner, batch=2, past=3)
