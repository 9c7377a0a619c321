"""edge_server in a network namespace of its own behind a tc-shaped veth link: real bandwidth limits, a schedule
that changes them, and the UE's estimate and split moves over it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from seam.edge_server.process import edge_server
from seam.profiler.probe import greet, round_trip
from seam.runtime.artifact import Artifact
from seam.runtime.traces import LinkState, Trace
from seam.runtime.emulation import EmulatedLink
from seam.runtime.transport import TransportConfig, UeSocket
from test_runtime import NEW_TOKENS, PROMPTS, local_tokens
from seam.ue_client.client import EdgeClient

pytestmark = pytest.mark.netns


def timed_ping(socket: UeSocket, up: int, down: int) -> float:
    started = time.perf_counter()
    round_trip(socket, 1, up, down)
    return time.perf_counter() - started


def test_tc_limits_each_direction_and_a_schedule_changes_it(exported, shaped_link):
    artifact = Artifact.open(exported("tiny-llama"))
    shaped_link.shape(up_mbit=1, down_mbit=10)
    with edge_server(artifact.root, bind=f"tcp://{shaped_link.edge_address}:0", launcher=shaped_link.launcher) as (_, address):
        socket = UeSocket(address, TransportConfig(timeout_s=20))
        greet(socket)  # connects; large pongs come only after a hello
        slow_up = timed_ping(socket, 100_000, 100)
        fast_down = timed_ping(socket, 100, 100_000)
        assert slow_up >= 0.7  # 800 kbit at 1 Mbit/s
        assert fast_down < slow_up / 3

        delays = shaped_link.follow(Trace((0.0, 1.0), (LinkState(1, 10, 10), LinkState(20, 20, 10))))
        time.sleep(1.5)
        assert timed_ping(socket, 100_000, 100) < 0.3  # the schedule raised the uplink to 20 Mbit/s
        socket.close()
    assert delays.at(0).rtt_ms == 10 and delays.at(0).up_mbit > 1000


def test_the_estimate_and_split_moves_over_a_shaped_link(exported, shaped_link):
    artifact = Artifact.open(exported("tiny-llama"))
    delays = shaped_link.follow(Trace((0.0,), (LinkState(up_mbit=2, down_mbit=8, rtt_ms=20),)))
    schedule = {2: (1, False), 3: (artifact.num_layers, True), 6: (2, False), 8: (artifact.num_layers, False)}
    with edge_server(artifact.root, bind=f"tcp://{shaped_link.edge_address}:0", launcher=shaped_link.launcher) as (_, address):
        with EdgeClient(artifact, address, TransportConfig(timeout_s=20), emulated=EmulatedLink(delays)) as client:
            with client.session(3) as session:
                tokens = []
                for step, produced in enumerate(session.generate(PROMPTS, NEW_TOKENS), start=1):
                    tokens.append(produced)
                    session.link.stale_s = 0  # probe both directions between steps, on the session's own socket
                    session.probe_link()
                    if step in schedule:
                        session.move_split(schedule[step][0], rebuild=schedule[step][1])
    assert (np.stack(tokens, axis=1) == local_tokens(artifact, PROMPTS, session.sampling)).all()
    assert [move.to_split for move in session.moves] == [split for split, _ in schedule.values()]
    link = session.link.link()
    assert link.up_mbit == pytest.approx(2, rel=0.35)
    assert link.down_mbit == pytest.approx(8, rel=0.35)
    assert link.rtt_s == pytest.approx(0.02, abs=0.015)
