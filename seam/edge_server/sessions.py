"""The edge's table of UE sessions: admission against a session count and a memory budget, idle eviction, and LRU
eviction that the UE holding the most pays for.

The budget covers every session's KV cache at its full length, the bytes that batched caches pin beyond those in
use (``seam.runtime.batching.compact``), and the working memory of the largest step any one session may run,
since the edge runs one step at a time. Pure bookkeeping, no I/O: the server asks it what to evict and tells the
affected UEs.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
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
    sampler: Sampler | None  # None when the UE keeps the output private and samples itself
    split: int
    batch: int
    max_length: int
    kv_bytes: int  # reserved for the full max_length, so admission never over-commits
    working_bytes: int  # what its largest step holds while it runs, beyond the cache
    opened_at: float
    last_used: float
    allow_token_upload: bool = False
    next_step: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    batched_steps: int = 0  # steps that ran in one batch with other sessions
    moves: int = 0  # times the split moved
    mask: np.ndarray | None = None  # the attention mask of every position so far: steps may send only new columns

    @property
    def private_output(self) -> bool:
        return self.sampler is None

    def stats(self) -> dict:
        """The session's account, for the close line of the log and the UE's ``Closed``."""
        return {"steps": self.next_step, "tokens": self.tokens, "batched_steps": self.batched_steps,
                "moves": self.moves, "edge_compute_s": round(self.compute_s, 4),
                "open_s": round(time.monotonic() - self.opened_at, 3)}


class SessionTable:
    def __init__(self, max_sessions: int, budget_bytes: int, idle_timeout_s: float, remember_evicted: int = 1024):
        self.max_sessions = max_sessions
        self.budget_bytes = budget_bytes
        self.idle_timeout_s = idle_timeout_s
        self.sessions: OrderedDict[SessionKey, EdgeSession] = OrderedDict()  # least recently used first
        self.evicted: OrderedDict[SessionKey, str] = OrderedDict()
        self.remember_evicted = remember_evicted
        self.pinned_bytes = 0  # held by batched caches beyond the bytes sessions use; set after each burst

    @property
    def kv_reserved(self) -> int:
        return sum(session.kv_bytes for session in self.sessions.values())

    def committed(self, kv_bytes: int = 0, working_bytes: int = 0, leaving: EdgeSession | None = None) -> int:
        """Bytes the budget must cover with a session of ``kv_bytes`` and ``working_bytes`` added (and
        ``leaving``'s own reservation taken out): every reservation, what batches pin, and the largest step."""
        others = [session for session in self.sessions.values() if session is not leaving]
        largest = max([session.working_bytes for session in others] + [working_bytes])
        return sum(session.kv_bytes for session in others) + kv_bytes + self.pinned_bytes + largest

    def admit(self, key: SessionKey, kv_bytes: int, working_bytes: int) -> list[EdgeSession]:
        """Makes room for a new session; returns the sessions evicted for it (least recently used first)."""
        if key in self.sessions:
            raise SeamError(f"session {key[1]!r} is already open; close it or choose another id")
        if kv_bytes + working_bytes > self.budget_bytes:
            raise SeamError(
                f"the session needs {kv_bytes / 2**20:.1f} MiB of KV cache and {working_bytes / 2**20:.1f} MiB to run "
                f"a step, more than the server's whole budget of {self.budget_bytes / 2**20:.1f} MiB; ask for "
                "fewer tokens or a smaller batch"
            )
        victims = []
        while self.sessions:
            if len(self.sessions) >= self.max_sessions:
                victim = self._victim(key[0], lambda session: 1, 1)
            elif self.committed(kv_bytes, working_bytes) > self.budget_bytes:
                victim = self._victim(key[0], lambda session: session.kv_bytes, kv_bytes)
            else:
                break
            victims.append(self.remove(victim.key, "evicted to make room for a newer session (memory budget or "
                                                   "session limit)"))
        return victims

    def _victim(self, peer: bytes, weight: Callable[[EdgeSession], int], new_weight: int) -> EdgeSession:
        """The session that makes room for a new one of ``peer``: the least recently used of the UE that holds the
        most, in sessions or in reserved bytes as ``weight`` counts them, the new one included (the asking UE
        first on a tie), so that one UE opening many or large sessions evicts its own rather than other UEs'
        running generations."""
        held = Counter()
        for session in self.sessions.values():
            held[session.key[0]] += weight(session)
        holds_none = peer not in held
        held[peer] += new_weight
        most = max(held.values())
        payer = peer if held[peer] == most else next(p for p, amount in held.items() if amount == most)
        if payer == peer and holds_none:  # nobody holds more than the new session alone: plain least recently used
            return next(iter(self.sessions.values()))
        return next(session for session in self.sessions.values() if session.key[0] == payer)

    def reserve(self, session: EdgeSession, kv_bytes: int, working_bytes: int) -> None:
        """Changes an open session's reservation (its split moved); refuses growth beyond the budget rather than
        evicting others for a session that already runs."""
        committed = self.committed(kv_bytes, working_bytes, leaving=session)
        if committed > self.budget_bytes:
            raise SeamError(
                f"the edge's memory budget of {self.budget_bytes / 2**20:.1f} MiB would need "
                f"{committed / 2**20:.1f} MiB with this session at the new split; keep more layers on the UE"
            )
        session.kv_bytes, session.working_bytes = kv_bytes, working_bytes

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
