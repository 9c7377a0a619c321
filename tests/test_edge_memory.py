"""The edge bounds what it holds: batched caches pin no dead rows, each session's largest step is counted in the
budget, training jobs share the frozen base and stay within their bounds, and a ping before a hello gets no large
reply."""

from __future__ import annotations

import numpy as np
import pytest

from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.batching import compact, run_together
from seam.runtime.executor import SessionPool
from seam.runtime.kv_buffers import MIN_CAPACITY
from seam.runtime.protocol import (PROBE_FINGERPRINT, PROTOCOL_VERSION, Error, Hello, OpenSession, Ping, Pong,
                                   SessionOpened, Welcome)
from seam.runtime.spans import Span
from seam.runtime.transport import TransportConfig, UeSocket
from test_batching import prefilled


def batched_runners(exported, count: int, kv_layout: str = "concat"):
    artifact = Artifact.open(exported("tiny-llama", kv_layout))
    span = Span(1, artifact.num_layers)
    hidden = artifact.manifest.dims.hidden_size
    rng = np.random.default_rng(0)
    pool = SessionPool(artifact)
    runners = [prefilled(pool, span, rng.standard_normal((1, 6, hidden)).astype(np.float32)) for _ in range(count)]
    steps = [rng.standard_normal((1, 1, hidden)).astype(np.float32) for _ in runners]
    run_together(runners, steps, [np.ones((1, 1), np.int64)] * count, [np.full((1, 1), 6)] * count)
    return runners


def test_sessions_stepping_together_keep_their_batch_arrays_uncopied(exported):
    runners = batched_runners(exported, 4)
    arrays = [dict(runner.cache) for runner in runners]
    live, held = compact(runners)
    assert live == held == sum(array.nbytes for cache in arrays for array in cache.values())
    assert all(runner.cache[name] is cache[name] for runner, cache in zip(runners, arrays) for name in cache)


def test_shared_buffers_hold_at_most_twice_what_their_sessions_use(exported):
    """Each session keeps its own buffers, grown by doubling: a batched step leaves nothing pinned."""
    runners = batched_runners(exported, 4, "shared-buffer")
    live, held = compact(runners)
    assert live == sum(array.nbytes for runner in runners for array in runner.cache.values())
    assert held == sum(runner.buffers.nbytes for runner in runners)
    lone = runners[0]
    lone.buffers.reserve(MIN_CAPACITY + 1)  # one position past what the buffers held: they double
    used = sum(array.nbytes for array in lone.cache.values())
    assert lone.buffers.nbytes == used * 2 * MIN_CAPACITY // lone.past_length
    assert compact([lone]) == (used, lone.buffers.nbytes)


def test_a_session_left_alone_stops_holding_its_batch_mates_caches(exported):
    runners = batched_runners(exported, 4)
    lone = runners[0]
    own = sum(array.nbytes for array in lone.cache.values())
    expected = {name: array.copy() for name, array in lone.cache.items()}
    assert compact([lone]) == (own, own)  # its three batch-mates closed: their rows are no longer held
    assert all(array.base is None for array in lone.cache.values())
    for name, array in expected.items():
        np.testing.assert_array_equal(lone.cache[name], array)


def hello(address: str, fingerprint: str) -> UeSocket:
    socket = UeSocket(address, TransportConfig(timeout_s=10))
    assert isinstance(socket.request(Hello(PROTOCOL_VERSION, fingerprint)), Welcome)
    return socket


def test_a_ping_before_hello_gets_no_large_reply_and_a_probe_hello_opens_no_session(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with edge_server(artifact.root) as (_, address):
        stranger = UeSocket(address, TransportConfig(timeout_s=10))
        reply = stranger.request(Ping(1, 1 << 20))
        assert isinstance(reply, Error) and "send hello first" in reply.message, reply
        assert isinstance(stranger.request(Ping(2, 4096)), Pong)
        echoed = stranger.request(Ping(3, 10_000, np.zeros(10_000, np.uint8)))  # as large as what it carried
        assert isinstance(echoed, Pong) and echoed.payload.nbytes == 10_000
        stranger.close()
        prober = hello(address, PROBE_FINGERPRINT)
        reply = prober.request(Ping(4, 1 << 20))
        assert isinstance(reply, Pong) and reply.payload.nbytes == 1 << 20
        reply = prober.request(OpenSession("s", 1, 1, {}, 32))
        assert isinstance(reply, Error) and reply.code == "no_handshake"
        prober.close()


def test_a_session_whose_largest_step_does_not_fit_is_refused_at_open(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    with edge_server(artifact.root, "--memory-budget-mb", "2", "--max-length", "8192") as (_, address):
        socket = hello(address, artifact.manifest.artifact_fingerprint)
        reply = socket.request(OpenSession("long", 1, 1, {}, 8192))
        assert isinstance(reply, Error) and "to run a step" in reply.message, reply
        assert isinstance(socket.request(OpenSession("short", 1, 1, {}, 64)), SessionOpened)
        socket.close()
