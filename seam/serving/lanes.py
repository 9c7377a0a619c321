"""Connections from this device to the edge for the HTTP endpoint: a socket serves one thread, so each request
being served takes a connection of its own (its own edge session), made when none is idle and kept for the next
request; all of them share one set of loaded blocks. At most ``limit`` requests generate at once, the rest wait
their turn."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from seam.runtime.errors import SeamError

WAIT_STEP_S = 0.25  # how often a request waiting for its turn looks whether its client has left


class Cancelled(SeamError):
    """The client went away before its request got a turn."""


class Lanes:
    def __init__(self, connect: Callable[[], object], limit: int):
        self._connect = connect  # a new EdgeClient, sharing the blocks
        self._idle: list = []
        self._lock = threading.Lock()
        self._turns = threading.BoundedSemaphore(limit)
        self.limit = limit

    def keep(self, client) -> None:
        """Adds a connection made elsewhere (the one that checked the edge at startup) to the idle ones."""
        with self._lock:
            self._idle.append(client)

    @contextmanager
    def lane(self, cancelled: threading.Event) -> Iterator[object]:
        """A connection for one request, once one of the ``limit`` turns is free; returned to the idle ones when
        the request ends cleanly, closed when it failed (a late reply may still be on its way to that socket)."""
        while not self._turns.acquire(timeout=WAIT_STEP_S):
            if cancelled.is_set():
                raise Cancelled("the client left while waiting for a turn")
        try:
            with self._lock:
                client = self._idle.pop() if self._idle else None
            client = client or self._connect()
            try:
                yield client
            except BaseException:
                client.close()
                raise
            self.keep(client)
        finally:
            self._turns.release()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()
