"""One request to the edge and its checked reply, measured: the UE's session, prober and split mover all send
through ``exchange``, so that every message's bytes and network time feed the session's link estimate."""

from __future__ import annotations

import time

from seam.planning.link_estimate import LinkEstimator, Sample
from seam.runtime.protocol import Message
from seam.runtime.replies import expect
from seam.runtime.transport import UeSocket


def exchange(socket: UeSocket, message: Message, kind: type, link: LinkEstimator) -> tuple[Message, float]:
    """One request and its reply of ``kind``, with its network time (the round trip less the edge's compute),
    which ``link`` observes together with the bytes each way."""
    sent, received, started = socket.bytes_sent, socket.bytes_received, time.perf_counter()
    reply = expect(socket.request(message), kind)
    compute = getattr(reply, "edge_compute_s", 0.0)  # steps, opens and moves report the edge's own time
    seconds = time.perf_counter() - started - compute
    link.observe(Sample(started, socket.bytes_sent - sent, socket.bytes_received - received, seconds))
    return reply, seconds
