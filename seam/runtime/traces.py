"""Link traces: bandwidth each way and round-trip time over time, as CSV rows ``t_s,up_mbit,down_mbit,rtt_ms``.

A trace is piecewise constant: each row holds from its time until the next row's; the last row holds on, and a
replay ends at its time.
Loading checks every line and names the first bad one. The shipped traces come from ``generate_traces``, seeded,
so they can be made again byte for byte: a step down and back up, a random walk, and 4G-like and Wi-Fi-like
traces (rates drawn around typical means with the burstiness and dropouts of each kind of link).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seam.runtime.errors import SeamError
from seam.runtime.files import write_atomically

HEADER = ("t_s", "up_mbit", "down_mbit", "rtt_ms")


@dataclass(frozen=True)
class LinkState:
    up_mbit: float
    down_mbit: float
    rtt_ms: float


@dataclass(frozen=True)
class Trace:
    times_s: tuple[float, ...]  # strictly increasing, from 0
    states: tuple[LinkState, ...]

    def at(self, t_s: float) -> LinkState:
        return self.states[max(bisect.bisect_right(self.times_s, t_s) - 1, 0)]

    def transfer_s(self, start_s: float, size_bytes: int, direction: str) -> float:
        """Seconds for ``size_bytes`` sent at ``start_s`` to cross in ``direction`` ('up' or 'down'), the rate
        following the trace while they do (the last row holds beyond its end): a transfer that starts in a
        fade speeds up when the fade ends, as on a real link."""
        index = max(bisect.bisect_right(self.times_s, start_s) - 1, 0)
        now, left = start_s, size_bytes * 8 / 1e6  # Mbit
        while True:
            state = self.states[index]
            rate = state.up_mbit if direction == "up" else state.down_mbit
            end = self.times_s[index + 1] if index + 1 < len(self.times_s) else math.inf
            if left <= rate * (end - now):
                return now + left / rate - start_s
            left -= rate * (end - now)
            now, index = end, index + 1

    @property
    def duration_s(self) -> float:
        return self.times_s[-1]

    def to_csv(self) -> str:
        rows = [",".join(HEADER)]
        rows += [f"{t:g},{s.up_mbit:g},{s.down_mbit:g},{s.rtt_ms:g}" for t, s in zip(self.times_s, self.states)]
        return "\n".join(rows) + "\n"

    def save(self, path: Path) -> Path:
        return write_atomically(path, lambda out: out.write(self.to_csv()))


def parse_trace(text: str, name: str = "trace") -> Trace:
    lines = text.splitlines()
    if not lines or tuple(cell.strip() for cell in lines[0].split(",")) != HEADER:
        raise SeamError(f"{name}:1: the header must be {','.join(HEADER)}")
    times, states = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = line.split(",")
        if len(cells) != len(HEADER):
            raise SeamError(f"{name}:{number}: expected {len(HEADER)} values ({','.join(HEADER)}), got {len(cells)}")
        try:
            t, up, down, rtt = (float(cell) for cell in cells)
        except ValueError:
            raise SeamError(f"{name}:{number}: {line.strip()!r} is not four numbers") from None
        if not all(math.isfinite(value) for value in (t, up, down, rtt)):
            raise SeamError(f"{name}:{number}: values must be finite")
        if up <= 0 or down <= 0 or rtt < 0:
            raise SeamError(f"{name}:{number}: bandwidths must be positive and the round trip not negative")
        if (not times and t != 0) or (times and t <= times[-1]):
            raise SeamError(f"{name}:{number}: times must start at 0 and increase, got {t:g}")
        times.append(t)
        states.append(LinkState(up, down, rtt))
    if not times:
        raise SeamError(f"{name}: no rows after the header")
    return Trace(tuple(times), tuple(states))


def load_trace(path: Path) -> Trace:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise SeamError(f"cannot read trace {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise SeamError(f"{path} is not a text CSV trace") from None
    return parse_trace(text, str(path))


# --- the shipped traces -------------------------------------------------------------------------------------


def step_trace(high: float = 50.0, low: float = 0.1, rtt_ms: float = 20.0, drop_s: float = 10.0,
               recover_s: float = 35.0, end_s: float = 50.0) -> Trace:
    """High bandwidth, a long drop, then recovery; the last row marks the end."""
    times = (0.0, drop_s, recover_s, end_s)
    rates = (high, low, high, high)
    return Trace(times, tuple(LinkState(rate, rate, rtt_ms) for rate in rates))


def log_walk(rng, start: float, low: float, high: float, steps: int, spread: float) -> np.ndarray:
    """A log-space random walk kept inside [low, high]."""
    values = [math.log(start)]
    for _ in range(steps - 1):
        values.append(min(max(values[-1] + rng.normal(0, spread), math.log(low)), math.log(high)))
    return np.exp(values)


def random_walk_trace(seed: int, duration_s: float = 30.0, interval_s: float = 1.0) -> Trace:
    rng = np.random.default_rng(seed)
    steps = int(duration_s / interval_s)
    up = log_walk(rng, 10.0, 0.5, 100.0, steps, 0.4)
    down = log_walk(rng, 20.0, 0.5, 100.0, steps, 0.4)
    rtt = log_walk(rng, 30.0, 5.0, 150.0, steps, 0.15)
    return rounded(interval_s, up, down, rtt)


def cellular_trace(seed: int, duration_s: float = 30.0, interval_s: float = 0.5) -> Trace:
    """4G-like: uplink a few Mbit/s, downlink tens, 40-80 ms round trips, occasional deep fades."""
    rng = np.random.default_rng(seed)
    steps = int(duration_s / interval_s)
    fade = rng.random(steps) < 0.06
    down = log_walk(rng, 25.0, 2.0, 80.0, steps, 0.3) * np.where(fade, 0.08, 1.0)
    up = log_walk(rng, 6.0, 0.5, 20.0, steps, 0.3) * np.where(fade, 0.08, 1.0)
    rtt = log_walk(rng, 50.0, 30.0, 120.0, steps, 0.1) * np.where(fade, 2.0, 1.0)
    return rounded(interval_s, up, down, rtt)


def wifi_trace(seed: int, duration_s: float = 30.0, interval_s: float = 0.5) -> Trace:
    """Wi-Fi-like: fast and symmetric with short round trips, and bursts of contention that cut it sharply."""
    rng = np.random.default_rng(seed)
    steps = int(duration_s / interval_s)
    contention = np.convolve(rng.random(steps) < 0.05, np.ones(4), mode="same") > 0  # bursts of about 2 s
    rate = log_walk(rng, 80.0, 20.0, 200.0, steps, 0.15) * np.where(contention, 0.05, 1.0)
    rtt = log_walk(rng, 4.0, 1.0, 15.0, steps, 0.2) * np.where(contention, 5.0, 1.0)
    return rounded(interval_s, rate * 0.8, rate, rtt)


def rounded(interval_s: float, up, down, rtt) -> Trace:
    times = tuple(round(i * interval_s, 3) for i in range(len(up)))
    states = tuple(LinkState(round(float(u), 3), round(float(d), 3), round(float(r), 2)) for u, d, r in zip(up, down, rtt))
    return Trace(times, states)


def generate_traces(out: Path, seed: int = 0) -> list[Path]:
    """Writes the shipped traces into ``out``: step, random-walk, 4g and wifi."""
    traces = {
        "step": step_trace(),
        "random-walk": random_walk_trace(seed),
        "4g": cellular_trace(seed + 1),
        "wifi": wifi_trace(seed + 2),
    }
    return [trace.save(Path(out) / f"{name}.csv") for name, trace in traces.items()]
