"""The edge's table of UE sessions: admission against a session count and a KV budget, idle eviction, and LRU
eviction that the UE holding the most sessions pays for.

Pure bookkeeping, no I/O: the server asks it what to evict and tells the affected UEs.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np

from seam.runtime.errors import SeamError
from seam.runtime.executor import SpanRunner
from seam.runtime.sampling import Sampler

SessionKey = tuple[bytes, str]  # (peer identity, session id chosen by the UE)


class UnknownSession(SeamError):
    """A request for a session this edge does not hold (never opened, evicted, or lost with a restart)."""


@dataclass
class EdgeSession:
    key: SessionKey
    runner: SpanRunner
    sampler: Sampler
    split: int
    batch: int
    max_length: int
    kv_bytes: int  # reserved for the full max_length, so admission never over-commits
    opened_at: float
    last_used: float
    allow_token_upload: bool = False
    next_step: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    batched_steps: int = 0  # steps that ran in one batch with other sessions
    moves: int = 0  # times the split moved
    mask: np.ndarray | None = None  # the attention mask of every position so far: steps may send only new columns


class SessionTable:
    def __init__(self, max_sessions: int, kv_budget_bytes: int, idle_timeout_s: float, remember_evicted: int = 1024):
        self.max_sessions = max_sessions
        self.kv_budget_bytes = kv_budget_bytes
        self.idle_timeout_s = idle_timeout_s
        self.sessions: OrderedDict[SessionKey, EdgeSession] = OrderedDict()  # least recently used first
        self.evicted: OrderedDict[SessionKey, str] = OrderedDict()
        self.remember_evicted = remember_evicted

    @property
    def kv_reserved(self) -> int:
        return sum(session.kv_bytes for session in self.sessions.values())

    def admit(self, key: SessionKey, kv_bytes: int) -> list[EdgeSession]:
        """Makes room for a new session; returns the sessions evicted for it (least recently used first)."""
        if key in self.sessions:
            raise SeamError(f"session {key[1]!r} is already open; close it or choose another id")
        if kv_bytes > self.kv_budget_bytes:
            raise SeamError(
                f"the session needs {kv_bytes / 2**20:.1f} MiB of KV cache, more than the server's whole budget of "
                f"{self.kv_budget_bytes / 2**20:.1f} MiB; ask for fewer tokens or a smaller batch"
            )
        victims = []
        while self.sessions and (
            len(self.sessions) >= self.max_sessions or self.kv_reserved + kv_bytes > self.kv_budget_bytes
        ):
            victim = self._victim(key[0])
            victims.append(self.remove(victim.key, "evicted to make room for a newer session (KV budget or session "
                                                   "limit)"))
        return victims

    def _victim(self, peer: bytes) -> EdgeSession:
        """The session that makes room for a new one of ``peer``: the least recently used of the UE that holds the
        most sessions, counting the new one (the asking UE first on a tie), so that one UE opening many sessions
        evicts its own rather than other UEs' running generations."""
        held = Counter(key[0] for key in self.sessions)
        held[peer] += 1
        most = max(held.values())
        payer = peer if held[peer] == most else next(p for p, count in held.items() if count == most)
        if payer == peer and held[peer] == 1:  # it holds none yet: plain least recently used
            return next(iter(self.sessions.values()))
        return next(session for session in self.sessions.values() if session.key[0] == payer)

    def reserve(self, session: EdgeSession, kv_bytes: int) -> None:
        """Changes an open session's KV reservation (its split moved); refuses growth beyond the budget rather
        than evicting others for a session that already runs."""
        others = self.kv_reserved - session.kv_bytes
        if others + kv_bytes > self.kv_budget_bytes:
            raise SeamError(
                f"the edge's KV budget has {max(self.kv_budget_bytes - others, 0) / 2**20:.1f} MiB left for this "
                f"session, which would need {kv_bytes / 2**20:.1f} MiB at the new split; keep more layers on the UE"
            )
        session.kv_bytes = kv_bytes

    def add(self, session: EdgeSession) -> None:
        self.sessions[session.key] = session
        self.evicted.pop(session.key, None)

    def get(self, key: SessionKey, now: float) -> EdgeSession:
        session = self.sessions.get(key)
        if session is None:
            reason = self.evicted.get(key)
            raise UnknownSession(f"session {key[1]!r} was {reason}" if reason else
                                 f"unknown session {key[1]!r}; open it first")
        session.last_used = now
        self.sessions.move_to_end(key)
        return session

    def remove(self, key: SessionKey, reason: str | None = None) -> EdgeSession:
        session = self.sessions.pop(key)
        if reason:
            self.evicted[key] = reason
            while len(self.evicted) > self.remember_evicted:
                self.evicted.popitem(last=False)
        return session

    def idle(self, now: float) -> list[EdgeSession]:
        """Removes and returns sessions unused for longer than the idle timeout."""
        stale = [s.key for s in self.sessions.values() if now - s.last_used > self.idle_timeout_s]
        return [self.remove(key, f"closed after {self.idle_timeout_s:g} s idle") for key in stale]
