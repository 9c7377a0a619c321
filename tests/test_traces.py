"""Link traces and the in-process link emulator: parsing with line-numbered errors, the shipped traces, and an
emulated link that the UE's estimate measures through a real edge_server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from seam.edge_server.process import edge_server
from seam.profiler.probe import round_trip
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.traces import LinkState, Trace, generate_traces, load_trace, parse_trace, step_trace
from seam.runtime.emulation import EmulatedLink, EmulatedSocket
from seam.runtime.transport import TransportConfig
from test_runtime import PROMPTS
from seam.ue_client.client import EdgeClient

SHIPPED = Path(__file__).resolve().parent.parent / "traces"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("time,up,down,rtt\n0,1,1,1\n", "trace:1: the header must be"),
        ("t_s,up_mbit,down_mbit,rtt_ms\n0,1,1,1\n2,x,1,1\n", "trace:3: '2,x,1,1' is not four numbers"),
        ("t_s,up_mbit,down_mbit,rtt_ms\n0,1,1,1\n1,1,1\n", "trace:3: expected 4 values"),
        ("t_s,up_mbit,down_mbit,rtt_ms\n0,1,1,1\n5,1,1,1\n5,2,2,2\n", "trace:4: times must start at 0 and increase"),
        ("t_s,up_mbit,down_mbit,rtt_ms\n1,1,1,1\n", "trace:2: times must start at 0"),
        ("t_s,up_mbit,down_mbit,rtt_ms\n0,0,1,1\n", "trace:2: bandwidths must be positive"),
        ("t_s,up_mbit,down_mbit,rtt_ms\n0,1,1,nan\n", "trace:2: values must be finite"),
        ("t_s,up_mbit,down_mbit,rtt_ms\n", "trace: no rows"),
    ],
)
def test_a_malformed_trace_names_its_line(text, error):
    with pytest.raises(SeamError, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_trace(text)


def test_a_trace_is_piecewise_constant_and_round_trips(tmp_path):
    trace = step_trace(high=40, low=2, rtt_ms=10, drop_s=5, recover_s=10, end_s=20)

    assert [trace.at(t).up_mbit for t in (0, 4.9, 5, 9.9, 10, 99)] == [40, 40, 2, 2, 40, 40]
    assert trace.duration_s == 20
    assert load_trace(trace.save(tmp_path / "step.csv")) == trace
    assert [p.name for p in tmp_path.iterdir()] == ["step.csv"]


def test_the_shipped_traces_are_what_the_seeded_generator_writes(tmp_path):
    written = generate_traces(tmp_path, seed=0)

    assert sorted(p.name for p in written) == sorted(p.name for p in SHIPPED.glob("*.csv"))
    for path in written:
        assert path.read_text() == (SHIPPED / path.name).read_text(), path.name
        assert load_trace(path).duration_s >= 20


def test_the_emulator_follows_the_trace_clock():
    now = [0.0]
    link = EmulatedLink(Trace((0.0, 10.0), (LinkState(8, 80, 20), LinkState(1, 1, 100))), clock=lambda: now[0])

    assert link.delay_s(1_000_000, "up") == pytest.approx(0.01 + 1.0)
    assert link.delay_s(1_000_000, "down") == pytest.approx(0.01 + 0.1)
    now[0] = 12.0
    assert link.delay_s(125_000, "up") == pytest.approx(0.05 + 1.0)
    # A transfer that starts before the link slows down crosses at each rate in turn: 9.5 s at 8 Mbit/s cover
    # 9.5 MB of 10, the last 0.5 MB take 4 s at 1 Mbit/s.
    now[0] = 0.5
    assert link.delay_s(10_000_000, "up") == pytest.approx(0.01 + 9.5 + 4.0)


def test_the_link_estimate_measures_an_emulated_link(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    trace = Trace((0.0,), (LinkState(up_mbit=4.0, down_mbit=16.0, rtt_ms=30.0),))
    with edge_server(artifact.root) as (_, address):
        socket = EmulatedSocket(EmulatedLink(trace), address, TransportConfig(timeout_s=10))
        started = time.perf_counter()
        round_trip(socket, 1, 50_000, 0)
        assert time.perf_counter() - started >= 0.03 + 50_000 * 8 / 4e6  # the round trip plus 0.1 s of upload
        socket.close()

        with EdgeClient(artifact, address, emulated=EmulatedLink(trace)) as client, client.session(2) as session:
            for _ in session.generate(PROMPTS, 8):
                session.link.stale_s = 0  # probe both directions after every step
                session.probe_link()
    link = session.link.link()
    assert link.up_mbit == pytest.approx(4.0, rel=0.25)
    assert link.down_mbit == pytest.approx(16.0, rel=0.25)
    assert link.rtt_s == pytest.approx(0.03, abs=0.01)


def test_a_ue_generating_alone_keeps_measuring_the_link_in_the_background(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    trace = Trace((0.0,), (LinkState(up_mbit=4.0, down_mbit=16.0, rtt_ms=30.0),))
    slow_steps = lambda snapshot: time.sleep(0.1)  # noqa: E731  (a policy that never moves)
    with edge_server(artifact.root) as (_, address):
        with EdgeClient(artifact, address, emulated=EmulatedLink(trace)) as client:
            with client.session(artifact.num_layers) as session:
                list(session.generate(PROMPTS, 12, slow_steps))
    assert session.probes >= 2 and not session.moves
    link = session.link.link()
    assert link.up_mbit == pytest.approx(4.0, rel=0.25)
    # Alone on the UE, every move would send layers to the edge: the downlink is left to the prior.
    assert link.down_bytes_per_s == client.link.down_bytes_per_s


def test_ue_client_refuses_a_malformed_trace(exported, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("t_s,up_mbit,down_mbit,rtt_ms\n0,5,5,20\n3,5,oops,20\n")
    result = subprocess.run(
        [sys.executable, "-m", "seam.ue_client.cli", str(exported("tiny-llama")), "--prompt", "hi", "--link-trace", str(bad)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"ue_client: error: {bad}:3: '3,5,oops,20' is not four numbers"
