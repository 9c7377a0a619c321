"""Inference over a pipeline of edge_server stages, each a real process: the UE's hidden states go to the first
stage, which runs its layers and hands them on; the tokens equal one edge's, the UE moves its split while the
stages stay put, and a stage lost mid-generation ends the session in one clear line within the timeout."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager

import numpy as np
import pytest

from seam.edge_server.process import edge_server
from seam.planning.snapshot import Decision
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.sampling import SamplingParams
from seam.ue_client.client import EdgeClient
from test_runtime import NEW_TOKENS, PROMPTS, local_tokens

GREEDY, SAMPLED = SamplingParams(), SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11)


@contextmanager
def pipeline(artifact: Artifact, ends: list[int], *flags: str, logs: list | None = None):
    """Edge stages ending at each of ``ends`` and then at the last layer, started last first; yields the
    processes, the first stage's address first."""
    with ExitStack() as stack:
        started, following = [], None
        for end in [*ends, None][::-1]:
            stage = ["--until", str(end), "--next", following, *flags] if end is not None else []
            process, following = stack.enter_context(edge_server(artifact.root, *stage))
            started.insert(0, (process, following))
        yield started


def test_two_and_three_stages_give_one_edges_tokens(exported):
    artifact = Artifact.open(exported("tiny-llama"))  # 4 layers, a cut at each
    for ends in ([2], [2, 3]):
        with pipeline(artifact, ends) as stages, EdgeClient(artifact, stages[0][1]) as client:
            assert client.welcome.split_points == [0, 1, 4]  # the first stage serves splits before layer 2 only
            for params in (GREEDY, SAMPLED):
                with client.session(1, params) as session:
                    tokens = np.stack(list(session.generate(PROMPTS, NEW_TOKENS)), axis=1)
                assert (tokens == local_tokens(artifact, PROMPTS, params)).all(), f"ends {ends}, {params}"
            assert session.edge_stats["next_stage"]["tokens"] == len(PROMPTS) * NEW_TOKENS


def test_the_ue_moves_its_split_while_the_stages_stay_put(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    # To split 0, to the UE alone (both stages hand their cache and the sampler back), back with the cache, back
    # with hidden states for the stages to recompute theirs from, and to the UE alone rebuilding it itself.
    moves = {2: (0, False), 3: (4, False), 5: (1, False), 6: (4, True), 7: (1, True), 8: (0, False)}

    def policy(snapshot):
        if snapshot.step in moves:
            return Decision(moves[snapshot.step][0], {}, "scheduled", moves[snapshot.step][1])
        return None

    with pipeline(artifact, [2]) as stages, EdgeClient(artifact, stages[0][1]) as client:
        for params in (GREEDY, SAMPLED):
            with client.session(1, params, allow_token_upload=True) as session:
                tokens = np.stack(list(session.generate(PROMPTS, NEW_TOKENS, policy)), axis=1)
            assert (tokens == local_tokens(artifact, PROMPTS, params)).all(), params
            assert [(m.before_step, m.to_split) for m in session.moves] == [(s, m[0]) for s, m in moves.items()]
        with pytest.raises(SeamError, match=r"the edge serves splits \[0, 1, 4\], not 2"):
            client.session(2)


def test_a_policy_keeps_the_split_where_the_first_stage_serves_it(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    seen = []

    def policy(snapshot):
        seen.append(snapshot.served)
        return None

    with pipeline(artifact, [2]) as stages, EdgeClient(artifact, stages[0][1]) as client:
        with client.session(1) as session:
            list(session.generate(PROMPTS, 3, policy))
    assert seen and all(served == (0, 1, 4) for served in seen)


def test_a_stage_lost_mid_generation_ends_the_session_in_one_line_within_the_timeout(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with pipeline(artifact, [2], "--next-timeout", "2") as stages, EdgeClient(artifact, stages[0][1]) as client:
        with client.session(1) as session:
            steps = session.generate(PROMPTS, NEW_TOKENS)
            next(steps)
            stages[1][0].kill()
            stages[1][0].wait(10)
            started = time.monotonic()
            with pytest.raises(SeamError, match=r"the next pipeline stage at tcp://127\.0\.0\.1:\d+ did not answer "
                                                r"within 2 s") as lost:
                list(steps)
            assert time.monotonic() - started < 6  # the stage's timeout, not the UE's 30 s
            assert "\n" not in str(lost.value)
        # The first stage lives on and says the same to the next session, which it cannot open.
        with pytest.raises(SeamError, match="did not answer within 2 s"):
            with client.session(1) as session:
                list(session.generate(PROMPTS, 2))


def test_a_lost_stage_hands_the_generation_to_the_device_with_fallback(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with pipeline(artifact, [2], "--next-timeout", "2") as stages, EdgeClient(artifact, stages[0][1]) as client:
        with client.session(1, SAMPLED, fallback_local=True) as session:  # the UE kept the sampler's position
            produced = []
            for tokens in session.generate(PROMPTS, NEW_TOKENS):
                produced.append(tokens)
                if len(produced) == 3:
                    stages[1][0].kill()
                    stages[1][0].wait(10)
    assert (np.stack(produced, axis=1) == local_tokens(artifact, PROMPTS, SAMPLED)).all()
    assert "the edge was lost (edge server: the next pipeline stage" in session.moves[-1].reason


def test_sessions_of_several_ues_run_batched_through_the_stages(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    prompts = [[[3 + ue, 40 + 2 * ue, 7][: 1 + ue % 3]] for ue in range(4)]
    results, errors = {}, []
    with pipeline(artifact, [2]) as stages:
        barrier = threading.Barrier(4)

        def ue(index):
            try:
                with EdgeClient(artifact, stages[0][1]) as client, client.session(1) as session:
                    barrier.wait(30)
                    results[index] = np.stack(list(session.generate(prompts[index], NEW_TOKENS)), axis=1)
                results[index, "batched"] = session.edge_stats["next_stage"]["batched_steps"]
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=ue, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert not errors, errors
    for index in range(4):
        assert (results[index] == local_tokens(artifact, prompts[index], GREEDY)).all(), index
    assert sum(results[index, "batched"] for index in range(4)) > 0  # the last stage ran some steps together


def test_stage_flags_are_refused_in_one_line(exported):
    root = str(exported("tiny-llama"))
    cases = [
        (["--until", "2"], "give its address with --next"),
        (["--next", "tcp://127.0.0.1:9"], "--next needs --until"),
        (["--until", "7", "--next", "tcp://127.0.0.1:9"], "--until 7 is not a cut of this artifact"),
        (["--until", "2", "--next", "tcp://127.0.0.1:9", "--next-timeout", "1"], "within 1 s"),
        (["--until", "2", "--next", "tcp://127.0.0.1:9", "--next-server-key", "edge.key"], "own --curve-secret"),
    ]
    for flags, expected in cases:
        result = run_seam_edge(root, *flags)
        assert result.returncode != 0 and expected in result.stderr, (flags, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def run_seam_edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seam.edge_server.cli", *args, "--bind", "tcp://127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60)


def test_stages_secured_with_curve_keys(exported, tmp_path):
    import shutil

    from seam.runtime.transport import generate_keypair

    artifact = Artifact.open(exported("tiny-llama"))
    keys = {name: generate_keypair(tmp_path / "keys", name) for name in ("ue", "first", "last")}
    allowed = {}
    for server, client in (("first", "ue"), ("last", "first")):  # each admits only the one before it
        allowed[server] = tmp_path / f"{server}-allows"
        allowed[server].mkdir()
        shutil.copy(keys[client][0], allowed[server])
    with edge_server(artifact.root, "--curve-secret", str(keys["last"][1]), "--allow", str(allowed["last"])) as (
            _, last), edge_server(artifact.root, "--curve-secret", str(keys["first"][1]), "--allow",
                                  str(allowed["first"]), "--until", "2", "--next", last, "--next-server-key",
                                  str(keys["last"][0])) as (_, first):
        with EdgeClient(artifact, first, curve_secret=keys["ue"][1], server_key=keys["first"][0]) as client:
            with client.session(1) as session:
                tokens = np.stack(list(session.generate(PROMPTS, NEW_TOKENS)), axis=1)
    assert (tokens == local_tokens(artifact, PROMPTS, GREEDY)).all()
