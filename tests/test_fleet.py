"""Several edge servers: the UE chooses the one predicted fastest, and a session whose edge dies or shuts down
goes on elsewhere (or on the UE) with exactly the tokens an uninterrupted run gives, greedy and seeded."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack

import numpy as np
import pytest

from seam.edge_server.process import edge_server
from seam.planning.fleet import EdgeOffer, rank_edges
from seam.runtime.artifact import Artifact
from seam.runtime.sampling import Sampler, SamplingParams
from seam.runtime.transport import TransportConfig
from seam.ue_client.client import EdgeClient
from test_runtime import NEW_TOKENS, PROMPTS, local_tokens

SEEDED = SamplingParams(temperature=0.9, top_k=40, seed=11)
LONG = 24  # tokens: the kill lands mid-generation


def expected_tokens(artifact: Artifact, params: SamplingParams, new_tokens: int = NEW_TOKENS) -> np.ndarray:
    import test_runtime

    saved, test_runtime.NEW_TOKENS = test_runtime.NEW_TOKENS, new_tokens
    try:
        return local_tokens(artifact, PROMPTS, params)
    finally:
        test_runtime.NEW_TOKENS = saved


def edges(stack: ExitStack, artifact: Artifact, count: int, *flags: str) -> dict[str, subprocess.Popen]:
    """``count`` edge servers on the artifact: address -> process."""
    started = [stack.enter_context(edge_server(artifact.root, *flags)) for _ in range(count)]
    return {address: process for process, address in started}


def test_rank_edges_prefers_the_fastest_predicted_and_leaves_draining_ones_out():
    near_busy = EdgeOffer("a", 0.001, sessions=9, step_s=0.050)
    far_idle = EdgeOffer("b", 0.010)
    full = EdgeOffer("c", 0.0005, free_kv_bytes=10)
    draining = EdgeOffer("d", 0.0001, draining=True)
    assert [o.address for o in rank_edges([near_busy, far_idle, full, draining], kv_bytes=100)] == ["b", "a", "c"]
    assert [o.address for o in rank_edges([EdgeOffer("x", 0.002, 3), EdgeOffer("y", 0.0025, 1)])] == ["y", "x"]
    assert [o.address for o in rank_edges([EdgeOffer("x", 0.002, 3), EdgeOffer("y", 0.009, 1)])] == ["x", "y"]
    idle = [EdgeOffer(name, 0.001) for name in "pqr"]
    firsts = [rank_edges(idle, chooser=f"ue{index}")[0].address for index in range(300)]
    assert all(firsts.count(name) > 60 for name in "pqr")  # UEs arriving at an idle fleet spread over it
    assert rank_edges(idle, chooser="ue7") == rank_edges(idle[::-1], chooser="ue7")
    # Sessions just opened on an edge have run no step yet: it is not predicted as instant, so arrivals spread.
    warm, fresh = EdgeOffer("warm", 0.001, sessions=1, step_s=0.020), EdgeOffer("fresh", 0.001, sessions=3)
    assert [o.address for o in rank_edges([warm, fresh])] == ["warm", "fresh"]
    assert rank_edges([warm, EdgeOffer("fresh", 0.001)])[0].address == "fresh"  # truly idle: no step to wait for
    odd = EdgeOffer.from_load("z", 0.001, {"sessions": "many", "step_s": True, "free_kv_bytes": 1.5, "draining": 1})
    assert (odd.sessions, odd.step_s, odd.free_kv_bytes, odd.draining) == (0, 0.0, None, False)


def test_the_sampler_skips_as_sampling_would():
    logits = np.random.default_rng(0).normal(size=(2, 300)).astype(np.float32)
    sampling, skipping = Sampler(SEEDED), Sampler(SEEDED)
    for _ in range(5):
        sampling(logits)
        skipping.skip(2)
    assert (sampling(logits) == skipping(logits)).all()


def test_an_edge_reports_its_load_and_a_ue_skips_one_that_is_down(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with ExitStack() as stack:
        fleet = edges(stack, artifact, 2)
        busy, idle = list(fleet)
        with EdgeClient(artifact, busy) as client:
            session = client.session(2)
            steps = session.generate(PROMPTS, NEW_TOKENS)
            next(steps), next(steps)  # open on the edge, mid-generation
            with EdgeClient(artifact, busy) as other:
                load = other.welcome.load
            steps.close()
        assert load["sessions"] == 1 and load["step_s"] > 0 and not load["draining"]
        assert 0 < load["free_kv_bytes"] < 4096 * 2**20
        dead = "tcp://127.0.0.1:9"
        started = time.monotonic()
        with EdgeClient(artifact, f"{dead},{idle}", TransportConfig(timeout_s=20)) as client:
            assert client.server == idle and client.servers == [dead, idle]
        assert time.monotonic() - started < 10  # the dead one's timeout is not waited out


@pytest.mark.parametrize("params", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
def test_a_killed_edge_mid_generation_loses_nothing(exported, params):
    artifact = Artifact.open(exported("tiny-llama"))
    expected = expected_tokens(artifact, params, LONG)
    with ExitStack() as stack:
        fleet = edges(stack, artifact, 3)
        with EdgeClient(artifact, ",".join(fleet), TransportConfig(timeout_s=2)) as client:
            first = client.server
            session = client.session(2, params)
            steps = session.generate(PROMPTS, LONG)
            produced = [next(steps) for _ in range(LONG // 2)]
            fleet[first].kill()
            fleet[first].wait()
            started = time.monotonic()
            produced += list(steps)
            assert time.monotonic() - started < 8
    assert (np.stack(produced, axis=1) == expected).all()
    (failover,) = session.moves
    assert failover.edge != first and failover.edge in fleet and failover.from_split == failover.to_split == 2
    assert f"the edge at {first} was lost" in failover.reason and "went on at" in failover.reason


def test_a_restarted_edge_on_its_address_is_picked_up_again(exported):
    """Two edges: the first is killed and the session goes on at the second; the first restarts on the same
    address; the second is killed and the session comes back to the first, the tokens those of one run."""
    artifact = Artifact.open(exported("tiny-llama"))
    expected = expected_tokens(artifact, SEEDED, LONG)
    with ExitStack() as stack:
        fleet = edges(stack, artifact, 2)
        with EdgeClient(artifact, ",".join(fleet), TransportConfig(timeout_s=2)) as client:
            first = client.server
            (second,) = set(fleet) - {first}
            session = client.session(2, SEEDED)
            steps = session.generate(PROMPTS, LONG)
            produced = [next(steps) for _ in range(LONG // 3)]
            fleet[first].kill()
            fleet[first].wait()
            produced += [next(steps) for _ in range(LONG // 3)]
            stack.enter_context(edge_server(artifact.root, bind=first))  # the same address, a new process
            fleet[second].kill()
            fleet[second].wait()
            produced += list(steps)
    assert (np.stack(produced, axis=1) == expected).all()
    assert [move.edge for move in session.moves] == [second, first]


def test_a_draining_edge_hands_its_sessions_on_and_exits(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    expected = expected_tokens(artifact, SEEDED, LONG)
    with ExitStack() as stack:
        fleet = edges(stack, artifact, 2, "--drain-s", "20")
        with EdgeClient(artifact, ",".join(fleet)) as client:
            first = client.server
            session = client.session(2, SEEDED)
            steps = session.generate(PROMPTS, LONG)
            produced = [next(steps) for _ in range(4)]
            fleet[first].send_signal(signal.SIGTERM)
            produced += list(steps)
            assert fleet[first].wait(timeout=10) == 0  # once its one session left, not after --drain-s
    assert (np.stack(produced, axis=1) == expected).all()
    (moved,) = session.moves
    assert moved.edge != first and "is shutting down" in moved.reason


def test_a_draining_edge_alone_hands_the_session_to_the_ue(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    expected = expected_tokens(artifact, SEEDED, LONG)
    with edge_server(artifact.root) as (process, address), EdgeClient(artifact, address) as client:
        session = client.session(2, SEEDED)
        steps = session.generate(PROMPTS, LONG)
        produced = [next(steps) for _ in range(4)]
        process.send_signal(signal.SIGTERM)
        produced += list(steps)
        assert process.wait(timeout=10) == 0
    assert (np.stack(produced, axis=1) == expected).all()
    (moved,) = session.moves
    assert moved.to_split == artifact.num_layers and "shutting down" in moved.reason


def test_ue_client_takes_a_list_of_edges_and_refuses_a_bad_one(exported):
    artifact = exported("tiny-llama")
    command = [sys.executable, "-m", "seam.ue_client.cli", str(artifact), "--prompt", "hi", "--max-new-tokens", "3"]
    refused = subprocess.run([*command, "--server", "tcp://127.0.0.1:5555,edge:1"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "tcp://HOST:PORT" in refused.stderr.strip().splitlines()[-1]
    with edge_server(artifact) as (_, address):
        answered = subprocess.run([*command, "--server", f"tcp://127.0.0.1:9,{address}", "--timeout", "5"],
                                  capture_output=True, text=True, timeout=120)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()


def test_sixty_four_sessions_over_three_edges_lose_nothing_when_one_dies(exported):
    """64 UEs at once spread over three edges; one edge is killed while every session is halfway; each session
    finishes with the tokens of its solo run on the device."""
    from seam.runtime.executor import SessionPool
    from seam.runtime.generation import LocalSplit, generate

    artifact = Artifact.open(exported("tiny-llama"))
    ues, tokens, half = 64, 12, 6
    prompts = [[3 + ue % 50, 40 + ue, 7 + 2 * ue][: 1 + ue % 3] + [100 + ue] for ue in range(ues)]
    pool, pad = SessionPool(artifact, threads=1), artifact.manifest.tokenizer["pad_token_id"]
    model = LocalSplit(pool, artifact.num_layers)
    expected = [[int(t[0]) for t, _ in generate(model, [prompt], tokens, pad, lambda logits, _: logits.argmax(-1))]
                for prompt in prompts]
    results: dict[int, tuple] = {}
    firsts: dict[int, str] = {}  # the edge each UE opened on
    errors: list[BaseException] = []
    halfway, killed = threading.Semaphore(0), threading.Event()

    def ue(index: int, servers: str) -> None:
        try:
            with EdgeClient(artifact, servers, TransportConfig(timeout_s=30), pool=pool) as client:
                first = client.server
                session = client.session(2)
                steps = session.generate([prompts[index]], tokens)
                produced = [int(next(steps)[0]) for _ in range(half)]
                firsts[index] = first
                halfway.release()
                killed.wait(120)
                produced += [int(step[0]) for step in steps]
                results[index] = (produced, first, session.moves)
        except BaseException as error:  # reported by the test's thread
            errors.append(error)
            halfway.release()

    with ExitStack() as stack:
        fleet = edges(stack, artifact, 3)
        threads = [threading.Thread(target=ue, args=(index, ",".join(fleet))) for index in range(ues)]
        for thread in threads:
            thread.start()
        for _ in range(ues):
            assert halfway.acquire(timeout=120)
        assert not errors, errors[0]
        per_edge = [sum(first == address for first in firsts.values()) for address in fleet]
        victim = list(fleet)[per_edge.index(max(per_edge))]
        fleet[victim].kill()
        fleet[victim].wait()
        killed.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors[0]
    assert sorted(results) == list(range(ues))
    for index, (produced, first, moves) in results.items():
        assert produced == expected[index], f"UE {index} changed its tokens"
        assert [move.edge for move in moves if move.edge] == ([] if first != victim else [moves[0].edge])
    assert min(per_edge) >= ues // 6, per_edge  # spread over the fleet, not piled on one edge
