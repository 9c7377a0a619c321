"""Greeting several edge servers at once and keeping the best: the UE's side of a fleet.

Every candidate is greeted on a thread of its own, so that an edge that is down costs no more than the wait for
the ones that answer: once the first answers, the others have a short grace (a few of its round trips) to answer
too, and the best of those that did (``seam.planning.fleet.rank_edges``) is kept; the rest are closed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from seam.planning.fleet import EdgeOffer, rank_edges
from seam.runtime.errors import SeamError
from seam.runtime.protocol import Hello, Welcome
from seam.runtime.replies import expect
from seam.runtime.transport import UeSocket

GRACE_ROUND_TRIPS = 4  # after the first answer, the others have this many of its round trips to answer
MIN_GRACE_S = 0.05


@dataclass
class Greeted:
    """An edge that answered the handshake: its socket, its welcome and what it offers."""

    socket: UeSocket
    welcome: Welcome
    offer: EdgeOffer


def greet(address: str, connect: Callable[[str], UeSocket], hello: Hello) -> Greeted:
    """Connects to ``address`` and greets it, retrying within the connection's timeout while it is not up."""
    socket = connect(address)
    try:
        started = time.perf_counter()
        welcome = expect(socket.request_with_retries(hello), Welcome)
        offer = EdgeOffer.from_load(address, time.perf_counter() - started, welcome.load)
    except BaseException:
        socket.close()
        raise
    return Greeted(socket, welcome, offer)


def greet_best(addresses: Sequence[str], connect: Callable[[str], UeSocket], hello: Hello, timeout_s: float,
               kv_bytes: int = 0, chooser: str = "") -> Greeted:
    """The best of the edges at ``addresses`` that answer within ``timeout_s``: alone, an edge is greeted as it
    always was and its own error raised; of several, each on a thread, the first answers open a short grace for
    the others. ``chooser`` names this UE for ``rank_edges``' tie-break. Raises the last error seen when none answers or every one is draining."""
    if len(addresses) == 1:
        return greet(addresses[0], connect, hello)
    lock, arrived = threading.Lock(), threading.Condition()
    answers: list[Greeted] = []
    errors: list[BaseException] = []
    settled = [False]  # once the choice is made, late answers close their own sockets

    def attempt(address: str) -> None:
        try:
            greeted = greet(address, connect, hello)
        except BaseException as error:  # every failure is one candidate less, reported if all fail
            with arrived:
                errors.append(error)
                arrived.notify_all()
            return
        with lock:
            late = settled[0]
            if not late:
                answers.append(greeted)
        if late:
            greeted.socket.close()
        with arrived:
            arrived.notify_all()

    for address in addresses:
        threading.Thread(target=attempt, args=(address,), name="seam-greet", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    with arrived:
        while not answers and len(errors) < len(addresses) and time.monotonic() < deadline:
            arrived.wait(deadline - time.monotonic())
        if answers:
            grace = max(GRACE_ROUND_TRIPS * min(a.offer.round_trip_s for a in answers), MIN_GRACE_S)
            until = min(time.monotonic() + grace, deadline)
            while len(answers) + len(errors) < len(addresses) and time.monotonic() < until:
                arrived.wait(until - time.monotonic())
    with lock:
        settled[0] = True
        greeted = list(answers)
    ranked = rank_edges([g.offer for g in greeted], kv_bytes, chooser)
    best = next((g for g in greeted if ranked and g.offer is ranked[0]), None)
    for other in greeted:
        if other is not best:
            other.socket.close()
    if best is not None:
        return best
    if greeted:
        raise SeamError(f"every edge server that answered ({', '.join(g.offer.address for g in greeted)}) is "
                        "draining; wait for one to come back or add another with --server")
    if errors:
        raise errors[-1]
    raise SeamError(f"none of the edge servers {', '.join(addresses)} answered within {timeout_s:g} s; check that "
                    "they are running and reachable, or raise --timeout")
