"""What the edge tells a UE about how busy it is, in its ``Welcome``: a UE choosing among several edges ranks
them by it (``seam.planning.fleet``). Steps are timed as the server runs them; only the last seconds count, so an
edge that went quiet reports itself idle."""

from __future__ import annotations

import statistics
import time
from collections import deque

from seam.edge_server.sessions import SessionTable

WINDOW_S = 10.0  # steps older than this no longer describe the edge's load


class LoadReport:
    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self.steps: deque[tuple[float, float]] = deque(maxlen=512)  # (when, seconds) of each batched run

    def step(self, seconds: float) -> None:
        self.steps.append((time.monotonic(), seconds))

    def report(self, table: SessionTable, draining: bool) -> dict:
        """The ``Welcome.load`` fields: open sessions, the median recent step, free KV budget, draining."""
        since = time.monotonic() - self.window_s
        recent = [seconds for at, seconds in self.steps if at >= since]
        free = table.budget_bytes - table.kv_reserved - table.pinned_bytes
        return {"sessions": len(table.sessions), "step_s": round(statistics.median(recent), 6) if recent else 0.0,
                "free_kv_bytes": max(int(free), 0), "draining": draining}
