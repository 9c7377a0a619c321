"""How long the link will stay as it is, and what moves really cost: learned online from the session's own
history, so that a decision weighs the expected remaining time of the link's present state rather than a fixed
horizon, and prices a move as moves have really gone.

The link's **state** is a run of uplink estimates within a factor ``STATE_RATIO`` of the run's geometric mean: a
fade, an outage or a handover changes the rate tens to hundreds of times, while the estimate of a good link from
small messages errs by a few. From the estimates a session recorded before each step, the states it went through and
how long each lasted give the expected remaining time of the present one: the mean of what the earlier states at its
level lasted beyond its present age, or, when none outlasted it, its age (a state is expected to last as long again
as it has held: the longer a link has held, the longer it tends to hold). A state the session has seen nothing like
is then priced as ski rental prices an unknown stay: a move pays once staying has cost as much as the move, so a
short outage is ridden out and a lasting drop is left after a delay the move's own cost sets. After two outages of a
kind, the next is priced as they went. The state the session started in is expected to hold ``INITIAL_STATE_S``,
unless it is far slower than the link the session was told to expect (its prior): then it is a drop whose start
came before the session, priced as any unseen state. A downlink not measured since the present state began is
taken to have fallen as the uplink did.

**Move costs**: the ratio of what each earlier move took to what the profiles predicted, per direction (towards
this device or towards the edge), scales the next prediction the same way. Pure functions of explicit values.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from seam.planning.cost_model import Link

STATE_RATIO = 8.0
# How long the link stays as the session found it, before it has seen any change: a link is usually as it has
# been for a while, and a generation's first decisions (leaving the default split) should not wait for it.
INITIAL_STATE_S = 10.0
MOVE_SCALE_BOUNDS = (0.5, 20.0)  # a move took half to twenty times its prediction: beyond, one outlier spoke


@dataclass(frozen=True)
class State:
    """A run of estimates: its geometric mean rate (bytes/s), when it began, its length and how many it holds."""

    level: float
    began_s: float
    seconds: float
    estimates: int


def same_level(a: float, b: float) -> bool:
    return max(a, b) < STATE_RATIO * min(a, b)


def states(history: Sequence[tuple[float, float]], now_s: float) -> list[State]:
    """The states ``history`` ((at_s, uplink bytes/s) estimates, oldest first) went through, the present one
    last, lasting until ``now_s``; none without history."""
    found: list[State] = []
    if not history:
        return found
    # In logarithms, as ``same_level`` compares: it runs before every step over up to a thousand estimates.
    began, log_sum, count, apart = history[0][0], 0.0, 0, math.log(STATE_RATIO)
    for at, rate in history:
        level = math.log(max(rate, 1.0))
        if count and abs(level - log_sum / count) >= apart:
            found.append(State(math.exp(log_sum / count), began, at - began, count))
            began, log_sum, count = at, 0.0, 0
        log_sum, count = log_sum + level, count + 1
    found.append(State(math.exp(log_sum / count), began, max(now_s - began, 0.0), count))
    return found


def expected_remaining_s(found: Sequence[State], prior_rate: float | None = None) -> float:
    """Seconds the present state of ``found`` (from ``states``) is expected to last; ``prior_rate``: the uplink
    rate (bytes/s) the session expected before it measured any."""
    if not found:
        return INITIAL_STATE_S
    *completed, present = found
    age = present.seconds
    if not completed:
        if prior_rate is not None and present.level < prior_rate and not same_level(present.level, prior_rate):
            return age
        return max(INITIAL_STATE_S - age, age)
    beyond = [state.seconds - age for state in completed
              if same_level(state.level, present.level) and state.seconds > age]
    return statistics.fmean(beyond) if beyond else age


def rate_before(found: Sequence[State]) -> float | None:
    """The uplink rate of the state before the present one (None while the session has seen no change), passing
    over states of a single estimate (the estimate on its way between two): what a move made for this state will
    most likely come back on."""
    completed = found[:-1]
    if not completed:
        return None
    return next((state.level for state in reversed(completed) if state.estimates > 1), completed[-1].level)


def downlink_following(link: Link, found: Sequence[State], down_measured_at: float | None) -> Link:
    """``link`` with its downlink rate cut as the uplink's fell, when the downlink was last measured (or never,
    ``None``) in an earlier, faster state: fades, handovers and congestion take both directions, and a decode
    step measures only the uplink, so a move priced on the downlink from before would carry a cache over a link
    that is gone. Never raised: a downlink that recovered shows in the next probe, and until then only a move
    away from the edge, which needs no downlink, is priced low."""
    if len(found) < 2:
        return link
    *completed, present = found
    if down_measured_at is not None and down_measured_at >= present.began_s:
        return link
    then = next((state.level for state in reversed(completed)
                 if down_measured_at is not None and state.began_s <= down_measured_at), completed[0].level)
    return replace(link, down_bytes_per_s=link.down_bytes_per_s * min(present.level / then, 1.0))


def move_scale(costs: Sequence[tuple[bool, float, float]], towards_ue: bool) -> float:
    """Measured over predicted for the moves in this direction so far, from ``costs`` (towards this device,
    predicted s, measured s); 1 before any."""
    ratios = [measured / predicted for direction, predicted, measured in costs
              if direction == towards_ue and predicted > 0]
    if not ratios:
        return 1.0
    low, high = MOVE_SCALE_BOUNDS
    return min(max(statistics.median(ratios), low), high)
