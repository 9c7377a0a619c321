"""The edge's session table: who pays when a new session needs room."""

from __future__ import annotations

from seam.edge_server.sessions import EdgeSession, SessionTable


def opened(table: SessionTable, peer: bytes, name: str, now: float) -> list[str]:
    """Opens a session (runner and sampler play no part in the bookkeeping); returns who was evicted for it."""
    victims = table.admit((peer, name), kv_bytes=1)
    table.add(EdgeSession((peer, name), None, None, 1, 1, 8, 1, now, now))
    return [victim.key[1] for victim in victims]


def test_one_ue_opening_many_sessions_evicts_its_own_not_another_ues():
    table = SessionTable(max_sessions=8, kv_budget_bytes=100, idle_timeout_s=60)
    opened(table, b"a", "a-live", 0)
    evicted = [name for index in range(20) for name in opened(table, b"b", f"b{index}", index + 1)]
    assert ("a", "a-live") in {(key[0].decode(), key[1]) for key in table.sessions}
    assert evicted and all(name.startswith("b") for name in evicted)
    assert len(table.sessions) == 8


def test_the_ue_holding_most_pays_and_a_single_ue_sees_plain_lru():
    table = SessionTable(max_sessions=4, kv_budget_bytes=100, idle_timeout_s=60)
    for index in range(4):
        opened(table, b"a", f"a{index}", index)
    assert opened(table, b"b", "b0", 10) == ["a0"]  # the newcomer holds none: the biggest holder's oldest goes
    assert opened(table, b"a", "a4", 11) == ["a1"]  # a holds most: its own oldest goes
    lone = SessionTable(max_sessions=2, kv_budget_bytes=100, idle_timeout_s=60)
    assert [opened(lone, b"x", name, 0) for name in ("x0", "x1", "x2")] == [[], [], ["x0"]]
