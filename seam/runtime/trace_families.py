"""Seeded families of link traces, for judging a split policy on links it was not tuned on: each family is a
common shape of real links with its parameters drawn per seed, so that a policy can be tuned on one seed set
and reported on another.

- ``markov-fades``: a good and a bad state, each lasting an exponentially distributed time.
- ``handovers``: a good link with a short outage every few seconds (a cell or access-point handover).
- ``starved-uplink``: a few Mbit/s up, tens down, a steady round trip, jitter on every second.
- ``congestion``: a rate that falls as other users join, and recovers as they leave.
- ``random-walk``, ``4g``, ``wifi``: the shipped shapes (``seam.runtime.traces``), drawn afresh per seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from seam.runtime.errors import SeamError
from seam.runtime.traces import LinkState, Trace, cellular_trace, log_walk, random_walk_trace, rounded, wifi_trace

DURATION_S = 30.0


def markov_fades(seed: int, duration_s: float = DURATION_S) -> Trace:
    rng = np.random.default_rng(seed)
    good = (rng.uniform(20, 60), rng.uniform(10, 30))  # Mbit/s, round trip ms
    bad = (rng.uniform(0.2, 1.5), rng.uniform(60, 200))
    mean_good_s, mean_bad_s = rng.uniform(3, 8), rng.uniform(0.5, 4)
    times, states, now, is_good = [], [], 0.0, True
    while now < duration_s:
        rate, rtt = good if is_good else bad
        jitter = rng.uniform(0.8, 1.2)
        times.append(round(now, 3))
        states.append(LinkState(round(rate * jitter, 3), round(rate * jitter * 2, 3), round(rtt, 2)))
        now += max(rng.exponential(mean_good_s if is_good else mean_bad_s), 0.1)
        is_good = not is_good
    return _ended(times, states, duration_s)


def handovers(seed: int, duration_s: float = DURATION_S) -> Trace:
    rng = np.random.default_rng(seed)
    rate, rtt = rng.uniform(15, 50), rng.uniform(10, 40)
    period_s, outage_s = rng.uniform(3, 8), rng.uniform(0.3, 1.2)
    times, states, now = [0.0], [LinkState(round(rate, 3), round(2 * rate, 3), round(rtt, 2))], rng.uniform(1, period_s)
    while now < duration_s:
        times += [round(now, 3), round(now + outage_s, 3)]
        states += [LinkState(0.05, 0.05, 500.0), LinkState(round(rate, 3), round(2 * rate, 3), round(rtt, 2))]
        now += outage_s + period_s * rng.uniform(0.8, 1.2)
    return _ended(times, states, duration_s)


def starved_uplink(seed: int, duration_s: float = DURATION_S, interval_s: float = 1.0) -> Trace:
    rng = np.random.default_rng(seed)
    steps = int(duration_s / interval_s)
    up = rng.uniform(1.5, 4.0) * rng.uniform(0.7, 1.3, steps)
    down = log_walk(rng, rng.uniform(20, 50), 10.0, 100.0, steps, 0.1)
    rtt = rng.uniform(30, 60) * rng.uniform(0.9, 1.1, steps)
    return rounded(interval_s, up, down, rtt)


def congestion(seed: int, duration_s: float = DURATION_S, interval_s: float = 1.0) -> Trace:
    rng = np.random.default_rng(seed)
    steps = int(duration_s / interval_s)
    peak = rng.uniform(20, 60)
    users = np.concatenate([np.linspace(1, rng.uniform(10, 40), steps // 2), np.linspace(20, 1, steps - steps // 2)])
    users = np.maximum(users + rng.normal(0, 1, steps), 1)
    rate = peak / users
    rtt = rng.uniform(15, 30) * (1 + users / 10)  # queues grow with the crowd
    return rounded(interval_s, rate, rate * 2, rtt)


FAMILIES: dict[str, Callable[[int], Trace]] = {
    "markov-fades": markov_fades,
    "handovers": handovers,
    "starved-uplink": starved_uplink,
    "congestion": congestion,
    "random-walk": random_walk_trace,
    "4g": cellular_trace,
    "wifi": wifi_trace,
}


def family_trace(family: str, seed: int) -> Trace:
    if family not in FAMILIES:
        raise SeamError(f"no trace family {family!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family](seed)


def _ended(times: list[float], states: list[LinkState], duration_s: float) -> Trace:
    """The rows before ``duration_s``, and a last row there that marks the end."""
    kept = [(t, s) for t, s in zip(times, states) if t < duration_s]
    return Trace(tuple(t for t, _ in kept) + (duration_s,), tuple(s for _, s in kept) + (kept[-1][1],))
