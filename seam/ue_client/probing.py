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


class LinkProber:
    """Pings that keep ``link`` fresh, and the network times of step-sized ones (what a decode step would see)."""

    def __init__(self, link: LinkEstimator, hidden_size: int, dtype_bytes: int):
        self.link = link
        self.hidden_size, self.dtype_bytes = hidden_size, dtype_bytes
        self.pings = 0
        self.step_probes: deque[tuple[float, float]] = deque(maxlen=5)  # (at, seconds) of step-sized pings

    def probe(self, socket: UeSocket, batch: int, step_sized: bool = False,
              directions: Sequence[str] = ("up", "down")) -> None:
        """Measures those of ``directions`` whose bandwidth estimate is stale with one ping each, sized to measure
        it, after an empty ping that pins the round trip the rates are measured against; with ``step_sized``,
        also a ping the size of a decode step of ``batch`` sequences."""
        stale = [direction for direction in self.link.stale(time.perf_counter()) if direction in directions]
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
    rare, and sized to a few round trips of the link as last measured."""

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
                    self.prober.probe(self.socket, self.batch())
            except SeamError:
                pass  # a lost edge shows in the steps themselves; the estimate just stays as it was
            self.stopping.wait(self.period_s)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(self.timeout_s + 1)
        if not self.thread.is_alive():  # a socket still in use by a stuck probe is left to the process exit
            self.socket.close()
