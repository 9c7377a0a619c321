"""Measures the link to a running edge_server: round-trip time and uplink and downlink bandwidth.

Pings carry payloads of the sizes the runtime sends (a decode step's hidden state up to a long prompt's), one way
at a time; a least-squares line through time against size gives the rate as its inverse slope. The round trip is
the median time of the smallest ping.

Pings are paced, one every ``gap_s``, because the runtime's messages come between computations, when both ends
have gone idle (see seam.profiler.measure): back-to-back pings find the processes and the link hot and report a round trip that no step sees
(about half of it on loopback).
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone

import numpy as np

from seam.profiler.host import describe
from seam.profiler.measure import IDLE_GAP_S
from seam.planning.schema import LinkProfile, LinkSample
from seam.runtime.errors import SeamError
from seam.runtime.protocol import PROBE_FINGERPRINT, PROTOCOL_VERSION, Error, Hello, Ping, Pong, Welcome
from seam.runtime.transport import UeSocket

DEFAULT_SIZES = (256, 4 << 10, 64 << 10, 1 << 20, 4 << 20)


def greet(socket: UeSocket) -> None:
    """Says hello as a link probe, holding no artifact: an edge sends large pongs only after a hello."""
    greeting = socket.request(Hello(PROTOCOL_VERSION, PROBE_FINGERPRINT))
    if not isinstance(greeting, Welcome):
        raise SeamError(f"the edge server refused a probe: {getattr(greeting, 'message', greeting.kind)}")


def round_trip(socket: UeSocket, nonce: int, up: int, down: int) -> float:
    payload = np.zeros(up, dtype=np.uint8) if up else None
    started = time.perf_counter()
    reply = socket.request(Ping(nonce, down, payload))
    elapsed = time.perf_counter() - started
    if isinstance(reply, Error):
        raise SeamError(f"edge server: {reply.message}")
    if not isinstance(reply, Pong) or reply.nonce != nonce:
        raise SeamError(f"the edge server answered a probe with {reply.kind!r}; is it a Seam edge_server?")
    return elapsed


def _rate(samples: list[LinkSample], size_of) -> float:
    """Bytes per second: the inverse slope of the least-squares line time = intercept + size / rate."""
    sizes = np.array([size_of(sample) for sample in samples], dtype=float)
    times = np.array([sample.median_s for sample in samples])
    slope = np.polyfit(sizes, times, 1)[0]
    return 1.0 / slope if slope > 0 else float("inf")


def probe_link(socket: UeSocket, sizes=DEFAULT_SIZES, repeats: int = 7, gap_s: float = IDLE_GAP_S) -> LinkProfile:
    smallest = min(sizes)
    nonce = 0
    shapes = [(size, smallest) for size in sizes] + [(smallest, size) for size in sizes if size != smallest]
    samples = []
    greet(socket)
    round_trip(socket, nonce, smallest, smallest)  # connects and warms both ends up
    for up, down in shapes:
        times = []
        for _ in range(repeats):
            time.sleep(gap_s)
            nonce += 1
            times.append(round_trip(socket, nonce, up, down))
        samples.append(LinkSample(up, down, statistics.median(times)))
    uplink = [sample for sample in samples if sample.down_bytes == smallest]
    downlink = [sample for sample in samples if sample.up_bytes == smallest]
    rtt = next(sample.median_s for sample in samples if sample.up_bytes == sample.down_bytes == smallest)
    return LinkProfile(
        server=socket.address,
        host=describe(),
        rtt_s=rtt,
        up_bytes_per_s=_rate(uplink, lambda sample: sample.up_bytes),
        down_bytes_per_s=_rate(downlink, lambda sample: sample.down_bytes),
        samples=samples,
        gap_s=gap_s,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
