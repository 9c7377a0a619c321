"""The link's dynamics and the calibration of move costs: how long the present link state is expected to last,
learned from the session's own history, and how a decision weighs a move by it."""

from __future__ import annotations

import pytest

from seam.planning.cost_model import Link
from seam.planning.dynamics import INITIAL_STATE_S, PRIOR_STATE_S, band, expected_remaining_s, move_scale, states
from seam.runtime.trace_families import FAMILIES, family_trace
from test_policy import decide

GOOD, BAD = 40e6 / 8, 0.2e6 / 8  # bytes/s


def history(*segments: tuple[float, float], every_s: float = 0.1) -> list[tuple[float, float]]:
    """Estimates every ``every_s`` through consecutive (seconds, rate) segments."""
    points, now = [], 0.0
    for seconds, rate in segments:
        for index in range(round(seconds / every_s)):
            points.append((now + index * every_s, rate))
        now += seconds
    return points


def test_states_are_bands_of_the_uplink_and_their_durations():
    completed, current, age = states(history((2, GOOD), (1, BAD), (3, GOOD)), now_s=6.0)
    assert [level for level, _ in completed] == [band(GOOD), band(BAD)]
    assert [seconds for _, seconds in completed] == pytest.approx([2, 1])
    assert current == band(GOOD) and age == pytest.approx(3)
    assert band(GOOD) == band(GOOD * 1.3)  # jitter stays in a state


def test_a_new_state_lasts_the_prior_and_an_old_one_as_long_again():
    assert expected_remaining_s([], 0) == INITIAL_STATE_S  # the link as the session found it
    assert expected_remaining_s(history((30, GOOD)), 30.0) == pytest.approx(30.0)
    changed = history((3, GOOD), (0.1, BAD))
    assert expected_remaining_s(changed, 3.1) == pytest.approx(PRIOR_STATE_S - 0.1, abs=0.01)
    assert expected_remaining_s(history((3, GOOD), (8, BAD)), 11.0) == pytest.approx(8.0)


def test_short_outages_seen_before_make_the_next_one_short():
    seen = history((3, GOOD), (0.5, BAD), (3, GOOD), (0.5, BAD), (3, GOOD), (0.1, BAD))
    now = seen[-1][0] + 0.1
    assert expected_remaining_s(seen, now) < 1.0  # outages here lasted 0.5 s; the prior alone says 2 s


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
            for _ in session.generate([[5, 6, 7, 8]], 80, policy=lambda snapshot: None):
                pass
            estimate = session.link.link()
            recorded = len(session.link_history)
    assert 20 < estimate.down_mbit < 80 and 2 < estimate.up_mbit < 8, estimate
    assert 60 < recorded <= 79  # an estimate before every step after the first, once the uplink was measured


def test_the_way_back_is_priced_on_the_link_before_the_fade():
    from seam.planning.dynamics import rate_before

    assert rate_before(history((3, GOOD)), 3.0) is None
    assert rate_before(history((3, GOOD), (2, BAD)), 5.0) == pytest.approx(GOOD)
    slow = Link.from_mbit(0.05, 200)
    stuck = decide(slow, current=1, state_s=10.0)
    freed = decide(slow, current=1, state_s=10.0, back_link=Link.from_mbit(40, 20))
    assert freed.split == 4 and "saves" in freed.reason
    assert stuck.split == 1  # priced over the fade, the way back (an upload of every position) never pays
