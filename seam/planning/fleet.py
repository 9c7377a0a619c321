"""Choosing among several edge servers: which one a UE should open its next session on, from what each edge
reported of its load and the round trip the UE measured to it. Pure functions over ``EdgeOffer`` values.

A session's per-token time on an edge is the round trip of its step plus the edge's own step time, which with
batched decoding grows with the sessions the edge already runs: the edge reports the median of its last
seconds' steps, so an edge busy with many UEs ranks behind an idle one a few milliseconds further away. An edge
that holds sessions but ran no step lately (they have only just opened) is predicted at the quickest step another
edge reports, not at no time at all: else every UE arriving meanwhile would herd onto it before its first step
could say otherwise. Edges whose predictions differ
by less than a handshake's noise count as equal, and of those the one with the fewest sessions comes first, so
that UEs arriving at once spread over an idle fleet.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class EdgeOffer:
    """One edge as a UE sees it before opening a session there."""

    address: str
    round_trip_s: float  # measured by the UE: the handshake's
    sessions: int = 0  # open on the edge now
    step_s: float = 0.0  # the edge's median step time over its last seconds (0: it ran none lately)
    free_kv_bytes: int | None = None  # what its KV budget has left (None: not reported)
    draining: bool = False  # shutting down: it takes no new sessions

    @classmethod
    def from_load(cls, address: str, round_trip_s: float, load: Mapping) -> EdgeOffer:
        """From the ``load`` an edge reports in its ``Welcome``; fields it leaves out keep their defaults, and
        values of the wrong type count as not reported, so that an odd edge ranks as an unknown, not a crash."""
        def number(name: str, default, kind=(int, float)):
            value = load.get(name, default)
            return value if isinstance(value, kind) and not isinstance(value, bool) else default

        return cls(address, round_trip_s, int(number("sessions", 0)), float(number("step_s", 0.0)),
                   number("free_kv_bytes", None, int), load.get("draining") is True)

    def per_token_s(self, unknown_step_s: float = 0.0) -> float:
        """Predicted time per token of a session opened here: its step's round trip and the edge's step
        (``unknown_step_s`` when it holds sessions but ran no step lately; none when it holds none)."""
        step_s = self.step_s if self.step_s > 0 else unknown_step_s if self.sessions else 0.0
        return self.round_trip_s + step_s


def _mixed(chooser: str, address: str) -> bytes:
    """A rank for ``address`` that looks random across choosers and never changes for one (rendezvous hashing)."""
    return hashlib.blake2b(f"{chooser} {address}".encode(), digest_size=8).digest()


NEAR_S = 1e-3  # predictions closer than this to the best are within the noise of a handshake's round trip
NEAR_SHARE = 0.1  # or within this share of the best


def rank_edges(offers: Iterable[EdgeOffer], kv_bytes: int = 0, chooser: str = "") -> list[EdgeOffer]:
    """The edges a new session may open on, best first: by predicted per-token time, where the edges predicted
    within the noise of the best (``NEAR_S``, ``NEAR_SHARE``) count as equal and the one with the fewest sessions
    goes first, so that UEs arriving at an idle fleet spread over it; of those as loaded, the order is a hash of
    the ``chooser`` (the UE) and the edge, the same for one UE every time and different from UE to UE. Edges that are draining are left out; those
    whose KV budget cannot hold ``kv_bytes`` more go last, since they would evict a session to take this one."""
    usable = [offer for offer in offers if not offer.draining and math.isfinite(offer.round_trip_s)]
    room = [offer for offer in usable if offer.free_kv_bytes is None or offer.free_kv_bytes >= kv_bytes]
    full = [offer for offer in usable if offer not in room]
    unknown = min((offer.step_s for offer in usable if offer.step_s > 0), default=0.0)

    def predicted(offer: EdgeOffer) -> float:
        return offer.per_token_s(unknown)

    by_time = sorted(room, key=lambda offer: (predicted(offer), offer.address))
    if not by_time:
        return sorted(full, key=predicted)
    limit = predicted(by_time[0]) * (1 + NEAR_SHARE) + NEAR_S
    near = sorted((offer for offer in by_time if predicted(offer) <= limit),
                  key=lambda offer: (offer.sessions, _mixed(chooser, offer.address), offer.address))
    return near + [offer for offer in by_time if offer not in near] + sorted(full, key=predicted)
