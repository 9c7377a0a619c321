"""Checking a peer's reply against the kind of message a request expects: an Error reply becomes a SeamError,
and one that says the peer no longer holds the session's state becomes ``EdgeLost``. The UE checks the edge's
replies with it, and a pipeline stage the next stage's."""

from __future__ import annotations

from seam.runtime.errors import SeamError
from seam.runtime.protocol import Error, Message

# Error codes that say the edge no longer holds this UE's state: it restarted, evicted the session, a later stage
# of its pipeline stopped answering, or it is shutting down and takes no session.
LOST_STATE = frozenset({"no_handshake", "unknown_session", "stage_lost", "draining"})


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
