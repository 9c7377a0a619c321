"""The link's dynamics and the calibration of move costs: how long the present link state is expected to last,
learned from the session's own history, and how a decision weighs a move by it."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from seam.planning.cost_model import Link
from seam.planning.dynamics import INITIAL_STATE_S, downlink_following, move_scale, rate_before, states
from seam.planning.dynamics import expected_remaining_s as remaining_of
from seam.planning.snapshot import ArtifactFacts, SessionSnapshot
from seam.runtime.trace_families import FAMILIES, family_trace
from test_policy import KV_PER_LAYER, decide, models

GOOD, BAD = 40e6 / 8, 0.2e6 / 8  # bytes/s


def history(*segments: tuple[float, float], every_s: float = 0.1) -> list[tuple[float, float]]:
    """Estimates every ``every_s`` through consecutive (seconds, rate) segments."""
    points, now = [], 0.0
    for seconds, rate in segments:
        for index in range(round(seconds / every_s)):
            points.append((now + index * every_s, rate))
        now += seconds
    return points


def test_states_are_runs_of_the_uplink_at_one_level_and_their_durations():
    found = states(history((2, GOOD), (1, BAD), (3, GOOD)), now_s=6.0)
    assert [state.level for state in found] == pytest.approx([GOOD, BAD, GOOD])
    assert [state.seconds for state in found] == pytest.approx([2, 1, 3])
    # The estimate of a good link from small messages errs by a few times: still one state.
    noisy = [(0.1 * index, GOOD * (0.3, 1.0, 2.0)[index % 3]) for index in range(30)]
    assert len(states(noisy, 3.0)) == 1


def expected_remaining_s(history: list[tuple[float, float]], now_s: float) -> float:
    return remaining_of(states(history, now_s))


def test_a_state_is_expected_to_last_as_long_again_as_it_has_held():
    assert expected_remaining_s([], 0) == INITIAL_STATE_S  # the link as the session found it
    assert expected_remaining_s(history((30, GOOD)), 30.0) == pytest.approx(30.0)
    changed = history((3, GOOD), (0.1, BAD))
    assert expected_remaining_s(changed, 3.1) == pytest.approx(0.1)  # just changed: staying may be worth it
    assert expected_remaining_s(changed, 4.5) == pytest.approx(1.5)
    assert expected_remaining_s(history((3, GOOD), (8, BAD)), 11.0) == pytest.approx(8.0)


def test_a_first_state_far_below_the_expected_link_is_priced_as_a_drop():
    """The session may start inside a fade: a first state far slower than its prior began before the session,
    so it is priced by its age like any unseen state, not held for ``INITIAL_STATE_S``."""
    found = states(history((2, BAD)), 2.0)
    assert remaining_of(found) == pytest.approx(INITIAL_STATE_S - 2.0)
    assert remaining_of(found, prior_rate=10e6 / 8) == pytest.approx(2.0)
    assert remaining_of(states(history((2, GOOD)), 2.0), prior_rate=10e6 / 8) == pytest.approx(INITIAL_STATE_S - 2.0)


def test_a_drop_is_left_once_staying_has_cost_what_the_move_costs():
    """Ski rental: with nothing like the present state seen before, the policy waits out a drop until staying
    has cost about what the move and the way back cost, so a short outage is ridden out and a long one is not."""
    slow, recovered = Link.from_mbit(0.05, 200), Link.from_mbit(GOOD * 8e-6, 5)  # the way back: once it is over
    found = states(history((5, GOOD), (0.1, BAD)), 5.1)
    assert decide(slow, current=1, state_s=remaining_of(found), back_link=recovered).split == 1
    held = states(history((5, GOOD), (20, BAD)), 25.0)
    assert decide(slow, current=1, state_s=remaining_of(held), back_link=recovered).split == 4


def test_short_outages_seen_before_make_the_next_one_short():
    seen = history((3, GOOD), (0.5, BAD), (3, GOOD), (0.5, BAD), (3, GOOD), (0.1, BAD))
    now = seen[-1][0] + 0.1
    assert expected_remaining_s(seen, now) < 0.5  # outages here lasted 0.5 s, this one has for 0.1 s


def test_a_move_is_weighed_by_how_long_the_link_state_lasts():
    slow = Link.from_mbit(0.05, 200)  # running alone on the UE beats offloading over this link
    assert decide(slow, current=1, state_s=None).split == 4
    assert decide(slow, current=1, state_s=0.05).split == 1  # over in a moment: not worth two moves
    lasting = decide(slow, current=1, state_s=60.0)
    assert lasting.split == 4 and "expected to last 60.0 s" in lasting.reason
    assert lasting.move_s is not None and lasting.move_s > 0


def test_moves_that_took_longer_than_predicted_make_the_next_dearer():
    assert move_scale([], True) == 1.0
    costs = [(True, 0.1, 0.4), (True, 0.2, 0.8), (False, 0.1, 0.1)]
    assert move_scale(costs, True) == pytest.approx(4.0) and move_scale(costs, False) == pytest.approx(1.0)
    assert move_scale([(True, 0.1, 100.0)], True) == 20.0  # bounded
    slow = Link.from_mbit(0.05, 200)
    assert decide(slow, current=1, state_s=30.0).split == 4
    assert decide(slow, current=1, state_s=30.0, move_scales=(20.0, 20.0)).split == 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_trace_family_is_seeded_and_valid(family):
    first, again, other = family_trace(family, 3), family_trace(family, 3), family_trace(family, 4)
    assert first == again and first != other
    assert first.times_s[0] == 0 and all(a < b for a, b in zip(first.times_s, first.times_s[1:]))
    assert all(s.up_mbit > 0 and s.down_mbit > 0 and s.rtt_ms >= 0 for s in first.states)
    assert first.duration_s >= 25


def test_a_generation_measures_both_directions_of_the_link(exported):
    """The downlink used to keep its 10 Mbit/s prior for ever: decode steps' replies are too small to measure it,
    and the background prober's connection, never greeted, got 4 KiB replies at most."""
    from seam.edge_server.process import edge_server
    from seam.runtime.emulation import EmulatedLink
    from seam.runtime.traces import LinkState, Trace
    from seam.runtime.transport import TransportConfig
    from seam.ue_client.client import EdgeClient

    artifact = exported("tiny-llama")
    link = EmulatedLink(Trace((0.0, 60.0), (LinkState(4.0, 40.0, 20.0),) * 2))
    with edge_server(artifact) as (_, address), EdgeClient(artifact, address, TransportConfig(timeout_s=30),
                                                           emulated=link) as client:
        with client.session(2) as session:
            first_token_at = None
            # A prompt long enough that its prefill measures the uplink (40 positions of 64 floats).
            for _ in session.generate([list(range(5, 45))], 80, policy=lambda snapshot: None):
                first_token_at = first_token_at or time.perf_counter()
            estimate = session.link.link()
            recorded = len(session.link_history)
            down_measured_at = session.snapshot(80).down_measured_at
    assert 20 < estimate.down_mbit < 80 and 2 < estimate.up_mbit < 8, estimate
    assert down_measured_at is not None and down_measured_at > session.link_history[0][0]
    assert 60 < recorded <= 79  # an estimate before every step after the first, once the uplink was measured
    # The state the link was found in dates from the prefill that measured it, not from the first decode step.
    assert session.link_history[0][0] < first_token_at


def test_the_edge_s_own_work_on_an_open_is_not_the_link_s_time(exported):
    """Opening a span's blocks or recomputing a moved cache takes the edge a while; counted as network time it
    made the first round-trip estimate seconds long."""
    from seam.edge_server.process import edge_server
    from seam.planning.link_estimate import LinkEstimator
    from seam.runtime.artifact import Artifact
    from seam.runtime.protocol import OpenSession, SessionOpened
    from seam.ue_client.connection import exchange
    from test_runtime_faults import raw_socket

    artifact = exported("tiny-llama")
    with edge_server(artifact) as (_, address):
        socket, link = raw_socket(address, Artifact.open(artifact)), LinkEstimator(Link.from_mbit(10, 20))
        started = time.perf_counter()
        opened, network_s = exchange(socket, OpenSession("s1", 1, 1, {}, 32), SessionOpened, link)
        elapsed = time.perf_counter() - started
        socket.close()
    assert opened.edge_compute_s > 0
    assert network_s == pytest.approx(elapsed - opened.edge_compute_s, abs=1e-3)


def test_the_way_back_is_priced_on_the_link_before_the_fade():
    assert rate_before(states(history((3, GOOD)), 3.0)) is None
    assert rate_before(states(history((3, GOOD), (2, BAD)), 5.0)) == pytest.approx(GOOD)
    # The estimate on its way down (one step at an in-between rate) is not the link the move comes back on.
    passing = history((3, GOOD), (0.1, GOOD / 15), (2, BAD))
    assert rate_before(states(passing, 5.1)) == pytest.approx(GOOD)
    slow = Link.from_mbit(0.05, 200)
    stuck = decide(slow, current=1, state_s=10.0)
    freed = decide(slow, current=1, state_s=10.0, back_link=Link.from_mbit(40, 20))
    assert freed.split == 4 and "saves" in freed.reason
    assert stuck.split == 1  # priced over the fade, the way back (an upload of every position) never pays


def test_the_way_back_carries_the_tokens_produced_while_the_state_lasts():
    """The way back comes when the link's present state ends, with every token produced meanwhile in its
    cache: a congestion ramp's way back took twice what it was priced at the context of the way there."""
    import re

    from seam.planning.policy import Scales, move_s, rebuild_s

    ue, edge = models()
    slow, recovered = Link.from_mbit(0.3, 50), Link.from_mbit(1.0, 50)
    decision = decide(slow, current=1, state_s=10.0, back_link=recovered, remaining=2000)
    tokens = int(re.search(r"over the next (\d+) tokens", decision.reason).group(1))

    def way_s(link: Link, start: int, end: int, context: int) -> float:
        return min(move_s(link, start, end, KV_PER_LAYER, 1, context),
                   rebuild_s(ue, edge, link, start, end, 1, context, Scales(), 0, ()))

    gain = (decision.per_token_s[1] - decision.per_token_s[4]) * tokens - way_s(slow, 1, 4, 64)
    saved = float(re.search(r"saves ([\d.]+) s", decision.reason).group(1))
    assert saved == pytest.approx(gain - way_s(recovered, 4, 1, 64 + tokens), abs=0.01)
    assert way_s(recovered, 4, 1, 64 + tokens) > 1.5 * way_s(recovered, 4, 1, 64)


def test_a_downlink_measured_before_a_fade_is_taken_to_fade_with_the_uplink():
    link = Link(0.02, BAD, GOOD)  # the uplink's estimate fell; the downlink's is from before
    faded = history((3, GOOD), (2, BAD))
    assert downlink_following(link, states(faded, 5.0), 1.0).down_bytes_per_s == pytest.approx(BAD)
    assert downlink_following(link, states(faded, 5.0), None).down_bytes_per_s == pytest.approx(BAD)
    # Measured during the fade: the measurement stands. Before any change: nothing to follow.
    assert downlink_following(link, states(faded, 5.0), 4.0) == link
    assert downlink_following(link, states(history((3, GOOD)), 3.0), None) == link
    # A recovered uplink does not raise a downlink measured in the fade: the next probe will.
    slow_down = Link(0.02, GOOD, BAD)
    recovered = history((3, BAD), (2, GOOD))
    assert downlink_following(slow_down, states(recovered, 5.0), 1.0) == slow_down



def every_policy() -> dict[str, object]:
    """The cost-model policy, the planner and a learned policy whose actor always wants the UE alone, on the same
    synthetic profiles: the planner and the learned policy only name the split to go to."""
    import numpy as np

    from seam.planning.learned import LearnedPolicy, PolicyFile
    from seam.planning.planner import LOSSLESS, actions
    from seam.planning.policy import CostModelPolicy

    ue, edge = models()
    choices = actions(ue.split_points[1:], [LOSSLESS], ue.split_points[-1])
    alone = np.array([10.0 if split == ue.split_points[-1] else 0.0 for split, _ in choices], dtype=np.float32)
    actor = {"w0": np.zeros((len(choices), 7), dtype=np.float32), "b0": alone}
    policy_file = PolicyFile(Path("."), "synthetic", ue.split_points[-1], choices, {}, 10.0, 1.0, actor)
    return {"cost-model": CostModelPolicy(ue, edge), "planner": LearnedPolicy(ue, edge, policy_file, planner=True),
            "learned": LearnedPolicy(ue, edge, policy_file)}


def outage_snapshot(link_history, now_s: float, move_costs=()) -> SessionSnapshot:
    facts = ArtifactFacts(4, KV_PER_LAYER, (1, 1, 1, 1), (1000,) * 4, 4 * 64 + 4)
    return SessionSnapshot(facts, step=80, now_s=now_s, split=1, past=96, batch=1, max_length=2048, codec="fp32",
                           allow_token_upload=False, offered_codecs=("fp32",), link=Link.from_mbit(BAD * 8e-6, 200),
                           link_history=tuple(link_history), move_costs=tuple(move_costs), up_measured_at=now_s,
                           down_measured_at=now_s)


@pytest.mark.parametrize("name", ["cost-model", "planner", "learned"])
def test_every_policy_weighs_its_move_by_the_link_dynamics_and_what_moves_cost(name):
    """The planner and the learned policy choose where to go; whether a move pays, over how long the link's
    state is expected to last and at what moves have cost, is the same test for all three."""
    policy = every_policy()[name]
    just_fell = outage_snapshot(history((5, GOOD), (0.1, BAD)), 5.1)
    assert policy(just_fell).split == 1  # expected over in a moment: ridden out
    held = outage_snapshot(history((5, GOOD), (8, BAD)), 13.0)
    assert policy(held).split == 4 and "expected to last 8.0 s" in policy.decisions[-1].reason
    dear = outage_snapshot(history((5, GOOD), (8, BAD)), 13.0, move_costs=[(True, 0.1, 5.0), (False, 0.1, 5.0)])
    assert policy(dear).split == 1  # moves took fifty times their prediction: this one would not pay


def test_no_move_rests_on_an_uplink_the_session_has_not_measured():
    """A message that outruns the uplink's rates proves them wrong but not how fast the link now is: until a
    probe measures it, the estimate is the prior's, and a move is not priced on it."""
    policy = every_policy()["cost-model"]
    held = outage_snapshot(history((5, GOOD), (8, BAD)), 13.0)
    assert policy(held).split == 4
    assert policy(replace(held, up_measured_at=None)) is None
    assert policy(replace(held, step=0, up_measured_at=None)) is not None  # before the prompt the prior is all


def test_the_learned_policy_scores_the_downlink_as_the_move_test_prices_it():
    """A downlink measured before the fade is taken to have faded with the uplink for the learned policy's choice
    of where to go too, not only for whether the move pays."""
    import numpy as np

    from seam.planning.learned import LearnedPolicy, PolicyFile
    from seam.planning.planner import LOSSLESS, actions

    ue, edge = models()
    choices = actions(ue.split_points[1:], [LOSSLESS], ue.split_points[-1])
    # The actor wants the UE alone only over a slow downlink (the observation's second entry: log10 of Mbit/s).
    weights = np.zeros((len(choices), 7), dtype=np.float32)
    weights[[split for split, _ in choices].index(ue.split_points[-1]), 1] = -5.0
    policy_file = PolicyFile(Path("."), "synthetic", ue.split_points[-1], choices, {}, 10.0, 1.0,
                             {"w0": weights, "b0": np.zeros(len(choices), dtype=np.float32)})
    policy = LearnedPolicy(ue, edge, policy_file)
    held = outage_snapshot(history((5, GOOD), (8, BAD)), 13.0)
    stale_downlink = replace(held, link=Link(held.link.rtt_s, BAD, GOOD), down_measured_at=1.0)
    assert policy(stale_downlink).split == ue.split_points[-1]
