"""How long the link will stay as it is, and what moves really cost: learned online from the session's own
history, so that a decision weighs the expected remaining time of the link's present state rather than a fixed
horizon, and prices a move as moves have really gone.

The link's **state** is the band of its uplink rate, a factor of ``BAND_RATIO`` wide (what the hidden states
cross; a fade or an outage changes it, jitter rarely does). From the estimates a session recorded before each
step, the states it went through and how long each lasted give the expected remaining time of the present
one: the mean of what the earlier states of that band lasted beyond the present one's age, with a prior state of
``PRIOR_STATE_S`` among them; the state the session started in is expected to hold ``INITIAL_STATE_S``. A state older than every precedent is expected to last as long again (the longer
a link has held, the longer it tends to hold). A one-second handover outage is then priced as one second, and
after two of them the policy knows outages here are short.

**Move costs**: the ratio of what each earlier move took to what the profiles predicted, per direction (towards
this device or towards the edge), scales the next prediction the same way. Pure functions of explicit values.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

BAND_RATIO = 4.0
# How long the link stays as the session found it, before it has seen any change: a link is usually as it has
# been for a while, and a generation's first decisions (leaving the default split) should not wait for it.
INITIAL_STATE_S = 10.0
PRIOR_STATE_S = 2.0  # how long a state the session saw the link change into lasts, before any precedent
MOVE_SCALE_BOUNDS = (0.5, 20.0)  # a move took half to twenty times its prediction: beyond, one outlier spoke


def band(up_bytes_per_s: float) -> int:
    return math.floor(math.log(max(up_bytes_per_s, 1.0)) / math.log(BAND_RATIO))


def states(history: Sequence[tuple[float, float]], now_s: float) -> tuple[list[tuple[int, float]], int, float]:
    """From ``history`` ((at_s, uplink bytes/s) estimates, oldest first): the completed states as (band,
    seconds), the present band, and how long it has held at ``now_s``."""
    completed: list[tuple[int, float]] = []
    current, since = band(history[0][1]), history[0][0]
    for at, rate in history[1:]:
        level = band(rate)
        if level != current:
            completed.append((current, at - since))
            current, since = level, at
    return completed, current, max(now_s - since, 0.0)


def expected_remaining_s(history: Sequence[tuple[float, float]], now_s: float,
                         prior_s: float = PRIOR_STATE_S) -> float:
    """Seconds the link's present state is expected to last from ``now_s`` (``prior_s`` without history)."""
    if not history:
        return INITIAL_STATE_S
    completed, current, age = states(history, now_s)
    if not completed:
        return max(INITIAL_STATE_S - age, age)
    precedents = [seconds for level, seconds in completed if level == current] + [prior_s]
    beyond = [seconds - age for seconds in precedents if seconds > age]
    return statistics.fmean(beyond) if beyond else age


def rate_before(history: Sequence[tuple[float, float]], now_s: float) -> float | None:
    """The median uplink rate of the state before the present one (None while the session has seen no change):
    what a move made for this state will most likely come back on."""
    if not history:
        return None
    completed, _, age = states(history, now_s)
    if not completed:
        return None
    began = now_s - age
    previous_began = began - completed[-1][1]
    rates = [rate for at, rate in history if previous_began <= at < began]
    return statistics.median(rates) if rates else None


def move_scale(costs: Sequence[tuple[bool, float, float]], towards_ue: bool) -> float:
    """Measured over predicted for the moves in this direction so far, from ``costs`` (towards this device,
    predicted s, measured s); 1 before any."""
    ratios = [measured / predicted for direction, predicted, measured in costs
              if direction == towards_ue and predicted > 0]
    if not ratios:
        return 1.0
    low, high = MOVE_SCALE_BOUNDS
    return min(max(statistics.median(ratios), low), high)
