"""Online estimate of the link to the edge from the UE's own traffic: round-trip time and bandwidth each way.

Every request gives one sample: bytes up, bytes down, and its network time (round trip minus the compute the
edge reports). A sample of a KiB or more whose bytes dominate one direction and whose transfer takes a fair
share of its time measures that direction's bandwidth; the estimate is the harmonic mean of the last few, as adaptive-bitrate video
players do, so one lucky burst cannot inflate it while a real drop shows at once. The round trip is the median
of what the samples leave once their transfer time is taken out. Decode steps alone are small and alike, so a
direction whose last bandwidth sample is old is marked stale, and the client then sends a probe sized to
measure it; so is a direction whose rates a later message outran, since the link has got faster since. Bookkeeping only, no I/O, clocks passed in; safe to feed from a probing thread while steps read it.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass

from seam.planning.cost_model import Link


@dataclass(frozen=True)
class Sample:
    at_s: float
    up_bytes: int
    down_bytes: int
    seconds: float  # network time: round trip minus the edge's compute


def harmonic_mean(values) -> float:
    values = list(values)
    return len(values) / sum(1 / value for value in values)


class LinkEstimator:
    def __init__(self, prior: Link, window: int = 32, rates: int = 5, stale_s: float = 2.0, dominance: float = 0.8,
                 transfer_share: float = 0.3, min_rate_bytes: int = 1024, rate_window_s: float = 1.0,
                 rtt_memory_s: float = 10.0):
        self.samples: deque[Sample] = deque(maxlen=window)
        # The quickest messages of the last ``rtt_memory_s`` seconds, quickest first: the round trip is no longer
        # than theirs. Without it, an outage whose slow messages fill the window would pass for a long round trip
        # at the old rate, where each message's time says the link carries next to nothing.
        self.quickest: deque[Sample] = deque()
        self.rtt_memory_s = rtt_memory_s
        # The last samples that moved enough bytes one way to measure it, kept apart: dozens of decode steps
        # would otherwise push a probe's measurement out of the window long before it goes stale.
        self.measuring: dict[str, deque[Sample]] = {"up": deque(maxlen=rates), "down": deque(maxlen=rates)}
        self.lock = threading.Lock()
        self.prior = prior
        self.rates = rates  # bandwidth samples per direction in the harmonic mean
        self.stale_s = stale_s
        self.dominance = dominance  # share of a sample's bytes that makes it measure one direction
        self.transfer_share = transfer_share  # share of its time a transfer must take to measure a rate
        self.min_rate_bytes = min_rate_bytes  # below this, a message's time is round trip and jitter
        self.rate_window_s = rate_window_s  # rate samples older than this before the newest are dropped
        # The estimate changes only when a sample arrives, and a session reads it several times a step.
        self.observed = 0
        self.cached: tuple[int, Link, dict[str, float | None]] | None = None

    def observe(self, sample: Sample) -> None:
        if sample.seconds > 0:
            with self.lock:
                self.samples.append(sample)
                while self.quickest and self.quickest[-1].seconds >= sample.seconds:
                    self.quickest.pop()
                self.quickest.append(sample)
                while self.quickest[0].at_s < sample.at_s - self.rtt_memory_s:
                    self.quickest.popleft()
                self.observed += 1
                for direction, kept in self.measuring.items():
                    if self._measures(sample, direction):
                        kept.append(sample)

    def measured(self, direction: str) -> bool:
        """Whether any message so far measured ``direction``'s rate (before one, the estimate is the prior's)."""
        with self.lock:
            return bool(self.measuring[direction])

    def _snapshot(self) -> list[Sample]:
        with self.lock:
            kept = {*self.samples, *self.measuring["up"], *self.measuring["down"]}
        return sorted(kept, key=lambda sample: sample.at_s)

    def _ceiling(self) -> float:
        """The longest the round trip can be: the quickest recent message's whole time."""
        with self.lock:
            return self.quickest[0].seconds if self.quickest else float("inf")

    def _measures(self, sample: Sample, direction: str) -> int:
        """The bytes ``sample`` moved in ``direction`` if they dominate it, else 0."""
        moved = sample.up_bytes if direction == "up" else sample.down_bytes
        return moved if moved >= max(self.dominance * (sample.up_bytes + sample.down_bytes), self.min_rate_bytes) else 0

    def _rate_samples(self, samples: list[Sample], direction: str, rtt_s: float) -> list[tuple[float, float]]:
        """(at_s, bytes per second) of the recent samples that measure ``direction``, newest last: at most
        ``rates`` of them, none older than ``rate_window_s`` before the newest, so that a recovered link is not
        held down for long by samples from before."""
        found: list[tuple[float, float]] = []
        for sample in samples:
            moved, transfer = self._measures(sample, direction), sample.seconds - rtt_s
            if moved and transfer >= self.transfer_share * sample.seconds:
                found.append((sample.at_s, moved / transfer))
            elif found and self._outran(sample, direction, rtt_s, harmonic_mean(r for _, r in found[-self.rates:])):
                found.clear()
        return [(at, rate) for at, rate in found[-self.rates:] if at >= found[-1][0] - self.rate_window_s]

    def _outran(self, sample: Sample, direction: str, rtt_s: float, rate: float) -> bool:
        """Whether ``sample`` carried enough bytes in ``direction`` to show that the link is now far faster than
        ``rate``: in less than half the time that rate allows. A step or a probe too quick to measure the rate
        still proves the rates before it wrong, so they go and the direction counts as stale."""
        moved = sample.up_bytes if direction == "up" else sample.down_bytes
        return moved >= self.min_rate_bytes and sample.seconds < 0.5 * (rtt_s + moved / rate)

    def link(self) -> Link:
        """The current estimate."""
        return self._estimate()[0]

    def measured_at(self, direction: str) -> float | None:
        """When the newest sample the estimate of ``direction``'s rate rests on was taken (None: the prior's)."""
        return self._estimate()[1][direction]

    def _estimate(self) -> tuple[Link, dict[str, float | None]]:
        with self.lock:
            observed, cached = self.observed, self.cached
        if cached is None or cached[0] != observed:
            cached = (observed, *self._settle(self._snapshot()))
            with self.lock:
                self.cached = cached
        return cached[1], cached[2]

    def _settle(self, samples: list[Sample]) -> tuple[Link, dict[str, float | None]]:
        """The estimate from ``samples`` and when each direction was last measured. The round trip and the rates
        depend on each other (a rate is bytes over the time left once the round trip is taken out), so a few
        rounds settle them, starting from the quickest sample."""
        if not samples:
            return self.prior, {"up": None, "down": None}
        # Messages too small to measure a rate (pings, most requests) measure the round trip nearly directly.
        small = [s for s in samples if s.up_bytes + s.down_bytes < self.min_rate_bytes] or samples
        ceiling = self._ceiling()
        rtt = min(min(sample.seconds for sample in samples), ceiling)
        up, down = self.prior.up_bytes_per_s, self.prior.down_bytes_per_s
        for _ in range(4):
            up_rates, down_rates = self._rate_samples(samples, "up", rtt), self._rate_samples(samples, "down", rtt)
            up = harmonic_mean(rate for _, rate in up_rates) if up_rates else self.prior.up_bytes_per_s
            down = harmonic_mean(rate for _, rate in down_rates) if down_rates else self.prior.down_bytes_per_s
            rtt = min(max(statistics.median(s.seconds - s.up_bytes / up - s.down_bytes / down for s in small), 0.0),
                      ceiling)
        return Link(rtt, up, down), {"up": up_rates[-1][0] if up_rates else None,
                                     "down": down_rates[-1][0] if down_rates else None}

    @property
    def rtt_s(self) -> float:
        return self.link().rtt_s

    @property
    def up_bytes_per_s(self) -> float:
        return self.link().up_bytes_per_s

    @property
    def down_bytes_per_s(self) -> float:
        return self.link().down_bytes_per_s

    def stale(self, now_s: float) -> list[str]:
        """The directions ('up', 'down') with no bandwidth sample in the last ``stale_s`` seconds."""
        return [direction for direction in ("up", "down")
                if (at := self.measured_at(direction)) is None or now_s - at > self.stale_s]

    def probe_bytes(self, direction: str) -> int:
        """A probe payload whose transfer takes about four round trips at the current estimate, so that it
        measures bandwidth rather than latency or a token bucket's burst; 8 KiB to 1 MiB, the floor kept small
        because a probe sized for a link that has since collapsed takes that much longer; the floor too while the
        direction has no measurement. When the last probe that way crossed too quickly to measure anything, the
        link got faster: eight times that probe."""
        link, samples = self.link(), self._snapshot()
        measured = self._rate_samples(samples, direction, link.rtt_s)
        rate = link.up_bytes_per_s if direction == "up" else link.down_bytes_per_s
        size = 4 * link.rtt_s * rate if measured else 0  # the prior alone could size a probe for minutes
        last = next((s for s in reversed(samples) if self._measures(s, direction)), None)
        if last is not None and last.seconds - link.rtt_s < self.transfer_share * last.seconds:
            size = max(size, 8 * self._measures(last, direction))
        return int(min(max(size, 8 << 10), 1 << 20))
