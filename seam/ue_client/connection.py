"""One request to the edge and its checked reply, measured: the UE's session, prober and split mover all send
through ``exchange``, so that every message's bytes and network time feed the session's link estimate."""

from __future__ import annotations

import time

from seam.planning.link_estimate import LinkEstimator, Sample
from seam.runtime.errors import SeamError
from seam.runtime.protocol import Error, Message, StepResult
from seam.runtime.transport import UeSocket


# Error codes that say the edge no longer holds this UE's state: it restarted, or evicted the session.
LOST_STATE = frozenset({"no_handshake", "unknown_session"})


class EdgeLost(SeamError):
    """The edge answered, but without the session's state; like a timeout, it ends the session there."""


def expect(reply: Message, kind: type) -> Message:
    """``reply`` if it is a ``kind``; an Error reply or any other kind raises SeamError (EdgeLost when the edge
    holds the session no more)."""
    if isinstance(reply, Error):
        raise (EdgeLost if reply.code in LOST_STATE else SeamError)(f"edge server: {reply.message}")
    if not isinstance(reply, kind):
        raise SeamError(f"edge server answered {reply.kind!r} where {kind.kind!r} was expected")
    return reply


def exchange(socket: UeSocket, message: Message, kind: type, link: LinkEstimator) -> tuple[Message, float]:
    """One request and its reply of ``kind``, with its network time (the round trip less the edge's compute),
    which ``link`` observes together with the bytes each way."""
    sent, received, started = socket.bytes_sent, socket.bytes_received, time.perf_counter()
    reply = expect(socket.request(message), kind)
    compute = reply.edge_compute_s if isinstance(reply, StepResult) else 0.0
    seconds = time.perf_counter() - started - compute
    link.observe(Sample(started, socket.bytes_sent - sent, socket.bytes_received - received, seconds))
    return reply, seconds
