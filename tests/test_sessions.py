"""The edge's session table: who pays when a new session needs room."""

from __future__ import annotations

import pytest

from seam.edge_server.sessions import EdgeSession, SessionTable
from seam.runtime.errors import SeamError


def opened(table: SessionTable, peer: bytes, name: str, now: float, kv_bytes: int = 1, working_bytes: int = 0
           ) -> list[str]:
    """Opens a session (runner and sampler play no part in the bookkeeping); returns who was evicted for it."""
    victims = table.admit((peer, name), kv_bytes, working_bytes)
    table.add(EdgeSession((peer, name), None, None, 1, 1, 8, kv_bytes, working_bytes, now, now))
    return [victim.key[1] for victim in victims]


def test_one_ue_opening_many_sessions_evicts_its_own_not_another_ues():
    table = SessionTable(max_sessions=8, budget_bytes=100, idle_timeout_s=60)
    opened(table, b"a", "a-live", 0)
    evicted = [name for index in range(20) for name in opened(table, b"b", f"b{index}", index + 1)]
    assert ("a", "a-live") in {(key[0].decode(), key[1]) for key in table.sessions}
    assert evicted and all(name.startswith("b") for name in evicted)
    assert len(table.sessions) == 8


def test_the_ue_holding_most_pays_and_a_single_ue_sees_plain_lru():
    table = SessionTable(max_sessions=4, budget_bytes=100, idle_timeout_s=60)
    for index in range(4):
        opened(table, b"a", f"a{index}", index)
    assert opened(table, b"b", "b0", 10) == ["a0"]  # the newcomer holds none: the biggest holder's oldest goes
    assert opened(table, b"a", "a4", 11) == ["a1"]  # a holds most: its own oldest goes
    lone = SessionTable(max_sessions=2, budget_bytes=100, idle_timeout_s=60)
    assert [opened(lone, b"x", name, 0) for name in ("x0", "x1", "x2")] == [[], [], ["x0"]]


def test_under_memory_pressure_the_ue_holding_most_bytes_pays():
    table = SessionTable(max_sessions=64, budget_bytes=100, idle_timeout_s=60)
    opened(table, b"a", "a-small", 0, kv_bytes=10)
    opened(table, b"b", "b-big", 1, kv_bytes=60)
    opened(table, b"a", "a-small2", 2, kv_bytes=10)
    # a holds two sessions but 20 bytes; b one session of 60: b pays for a newcomer's 40 bytes
    assert opened(table, b"c", "c0", 3, kv_bytes=40) == ["b-big"]


def test_the_budget_covers_the_largest_step_and_pinned_bytes():
    table = SessionTable(max_sessions=64, budget_bytes=100, idle_timeout_s=60)
    opened(table, b"a", "a0", 0, kv_bytes=30, working_bytes=40)
    assert opened(table, b"b", "b0", 1, kv_bytes=30, working_bytes=10) == []  # 30 + 30 + 40 fits
    table.pinned_bytes = 10
    assert opened(table, b"c", "c0", 2, kv_bytes=10, working_bytes=10) == ["a0"]  # 60 + 10 + 10 + 40 does not
    with pytest.raises(SeamError, match="to run a step"):
        table.admit((b"d", "d0"), kv_bytes=50, working_bytes=60)
