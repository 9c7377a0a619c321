"""Measuring the link to the edge with pings: on demand for a direction whose bandwidth estimate is stale, sized
to measure it, and from a background thread while the UE generates alone and nothing else crosses the link."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from seam.planning.link_estimate import LinkEstimator
from seam.planning.wire_sizes import downlink_bytes, uplink_bytes
from seam.runtime.errors import SeamError
from seam.runtime.protocol import PROBE_FINGERPRINT, PROTOCOL_VERSION, Hello, Ping, Pong, Welcome
from seam.runtime.transport import UeSocket
from seam.runtime.replies import expect
from seam.ue_client.connection import exchange

PROBE_TRIES = 3  # sizes grow 8x a try: from 8 KiB to 512 KiB, enough for hundreds of Mbit/s
# A probe that finds a direction's rate within this factor of the last one doubles the wait before the next, up to
# ``MAX_QUIET`` times the estimate's staleness: a steady link needs few probes, and each costs the UE's CPU and,
# on a real link, the steps queued behind it. Any other finding, or a rate a message outran, starts over.
STEADY_RATIO = 2.0
MAX_QUIET = 8


class LinkProber:
    """Pings that keep ``link`` fresh, and the network times of step-sized ones (what a decode step would see)."""

    def __init__(self, link: LinkEstimator, hidden_size: int, dtype_bytes: int):
        self.link = link
        self.hidden_size, self.dtype_bytes = hidden_size, dtype_bytes
        self.pings = 0
        self.quiet = {"up": 1, "down": 1}  # per direction: the staleness a probe waits for, in ``stale_s``
        self.step_probes: deque[tuple[float, float]] = deque(maxlen=5)  # (at, seconds) of step-sized pings

    def probe(self, socket: UeSocket, batch: int, step_sized: bool = False,
              directions: Sequence[str] = ("up", "down"), back_off: bool = False) -> None:
        """Measures those of ``directions`` whose bandwidth estimate is stale with one ping each, sized to measure
        it, after an empty ping that pins the round trip the rates are measured against; with ``step_sized``,
        also a ping the size of a decode step of ``batch`` sequences; with ``back_off``, a direction is stale
        only after the wait its steadiness earned (``STEADY_RATIO``)."""
        now = time.perf_counter()
        stale = [direction for direction in directions if self.due(direction, now, back_off)]
        before = {direction: self.rate(direction) for direction in stale}
        if stale:
            self.ping(socket, 0, 0)
        if step_sized:
            up = uplink_bytes(1, batch, 1, self.hidden_size, self.dtype_bytes)
            started = time.perf_counter()
            self.step_probes.append((started, self.ping(socket, up, downlink_bytes(batch))))
        for direction in stale:
            for _ in range(PROBE_TRIES):  # a probe too quick to measure the rate is followed by a larger one
                size = self.link.probe_bytes(direction)
                self.ping(socket, *((size, 0) if direction == "up" else (0, size)))
                if direction not in self.link.stale(time.perf_counter()):
                    break
            self.quiet[direction] = self.next_quiet(direction, before[direction], self.rate(direction))

    def due(self, direction: str, now_s: float, back_off: bool) -> bool:
        measured_at = self.link.measured_at(direction)
        wait = self.link.stale_s * (self.quiet[direction] if back_off else 1)
        return measured_at is None or now_s - measured_at > wait

    def rate(self, direction: str) -> float | None:
        """``direction``'s measured rate in bytes/s, None while it rests on the prior or was outrun."""
        if self.link.measured_at(direction) is None:
            return None
        link = self.link.link()
        return link.up_bytes_per_s if direction == "up" else link.down_bytes_per_s

    def next_quiet(self, direction: str, before: float | None, after: float | None) -> int:
        if before is None or after is None or max(before, after) > STEADY_RATIO * min(before, after):
            return 1
        return min(2 * self.quiet[direction], MAX_QUIET)

    def ping(self, socket: UeSocket, up: int, down: int) -> float:
        """Network seconds of one ping carrying ``up`` bytes and asking for ``down`` back."""
        self.pings += 1
        payload = np.zeros(up, dtype=np.uint8) if up else None
        return exchange(socket, Ping(self.pings, down, payload), Pong, self.link)[1]


class BackgroundProber:
    """Keeps the link estimate fresh while the UE generates alone and sends nothing else, so that it sees the
    link come back; from a thread with a connection of its own, so that a probe never holds up a step.

    While the edge has layers it probes a direction only once its estimate is stale (``LinkEstimator.stale``,
    two seconds without a rate sample): a probe sharing the link with steps queues them behind it, so it stays
    rare, sized to a few round trips of the link as last measured, and rarer as probes find the link steady (a
    collapse shows in the steps' own times first)."""

    def __init__(self, prober: LinkProber, socket: UeSocket, alone: Callable[[], bool], batch: Callable[[], int],
                 period_s: float = 0.25, timeout_s: float = 5.0, server: str = ""):
        self.prober, self.socket = prober, socket
        self.server = server  # the edge it probes
        self.alone, self.batch = alone, batch
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="seam-link-prober", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            # A greeting as a link probe: the edge answers a connection that said hello with replies as large as
            # a downlink probe asks for (before one, at most 4 KiB), and opens no session for it.
            expect(self.socket.request(Hello(PROTOCOL_VERSION, PROBE_FINGERPRINT)), Welcome)
        except SeamError:
            pass  # an edge that cannot be greeted cannot be probed either; the steps will say more
        while not self.stopping.is_set():
            try:
                if self.alone():
                    # Only the uplink: from here every move sends layers to the edge, and a probe of a
                    # collapsed downlink would hold the next step-sized ping back for seconds.
                    self.prober.probe(self.socket, self.batch(), step_sized=True, directions=("up",))
                else:
                    # A decode step's few KiB up and one token down measure neither direction on a link whose
                    # round trip dwarfs their transfer, yet a move crosses one of them with a whole cache or
                    # every position's hidden states: a probe of each direction once its estimate is stale.
                    self.prober.probe(self.socket, self.batch(), back_off=True)
            except SeamError:
                pass  # a lost edge shows in the steps themselves; the estimate just stays as it was
            self.stopping.wait(self.period_s)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(self.timeout_s + 1)
        if not self.thread.is_alive():  # a socket still in use by a stuck probe is left to the process exit
            self.socket.close()
