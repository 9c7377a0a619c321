"""Seam's own events for the chat page (``GET /seam/events``): each request's split, link estimate, rate and
moves as its generation runs. Generation threads publish; each listening page has a bounded queue on the
server's event loop, and a page too slow to keep up misses events rather than holding memory or a generation."""

from __future__ import annotations

import asyncio
import threading

QUEUE_EVENTS = 256


class EventHub:
    def __init__(self):
        self._listeners: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()
        self._lock = threading.Lock()

    def listen(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue]:
        """A queue of the events from now on, on the calling event loop; hand it to ``leave`` when done."""
        listener = (asyncio.get_running_loop(), asyncio.Queue(QUEUE_EVENTS))
        with self._lock:
            self._listeners.add(listener)
        return listener

    def leave(self, listener) -> None:
        with self._lock:
            self._listeners.discard(listener)

    def publish(self, payload: dict) -> None:
        """Hands ``payload`` to every listener; callable from any thread."""
        with self._lock:
            listeners = list(self._listeners)
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(_offer, queue, payload)
            except RuntimeError:  # that loop has closed: the server is stopping
                self.leave((loop, queue))


def _offer(queue: asyncio.Queue, payload: dict) -> None:
    if not queue.full():
        queue.put_nowait(payload)
