"""Moving a running session's split between two steps, and finishing on this device when the edge is lost.

The layers that change side take their KV cache along, or the side that takes them over recomputes it: this
device from the hidden states it kept at the old split (or from the tokens), the edge from the hidden states at
the new split, which this device sends. Either way the tokens that follow are the ones the old split would have
produced. Called by ``RemoteSession``, which owns the state these functions update.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from seam.runtime.errors import SeamError
from seam.runtime.executor import SpanRunner
from seam.runtime.generation import positions_from_mask
from seam.runtime.migration import pack_kv, recompute, resplit, unpack_kv
from seam.runtime.protocol import Close, Resplit, Resplitted
from seam.runtime.replies import EdgeLost
from seam.runtime.spans import Span
from seam.planning.snapshot import StepTiming
from seam.ue_client.stats import Move

if TYPE_CHECKING:
    from seam.ue_client.session import RemoteSession

FAILOVER_ATTEMPTS = 3  # edges that may fail in turn while taking one lost session over


def move_split(session: RemoteSession, split: int, reason: str = "", rebuild: bool = False,
               predicted_s: float | None = None) -> None:
    """Moves ``session`` to ``split``; with ``rebuild``, the side taking layers over recomputes their cache.
    ``predicted_s``, what a policy expected the move to take, is kept beside what it took."""
    old = session.split
    if split == old:
        return
    session.client.check_split(split, session.allow_token_upload)
    if rebuild and split < old and not session.kept_boundary(split):
        raise SeamError(f"this device kept no hidden states at layer {split} to rebuild from; move the cache")
    started = time.perf_counter()
    if split < old:
        moved, incoming, boundaries = _hand_to_edge(session, split, rebuild), {}, None
    else:
        moved, incoming, boundaries = _take_from_edge(session, split, rebuild)
    session.head = resplit(session.client.pool, session.head, Span(0, split), incoming, boundaries)
    session.split = split
    session.moves.append(Move(len(session.stats.timings), old, split, moved, time.perf_counter() - started, reason,
                              predicted_s))


def _hand_to_edge(session: RemoteSession, split: int, rebuild: bool) -> int:
    """The edge takes layers [split, old) over; returns the bytes that crossed."""
    old = session.split
    if rebuild:
        kv, hidden = None, session.head.boundary(split)
    else:
        kv, hidden = pack_kv(session.head.cache, Span(split, old)), None
    if old == session.num_layers:
        session.split = split  # the session opens at its new split
        try:
            session.open_on_edge(kv, hidden)
        except BaseException:
            session.split = old
            raise
    else:
        mask = session.mask[:, : session.past] if rebuild else None
        session.request(Resplit(session.session_id, session.edge_step, split, kv=kv, hidden_states=hidden,
                                attention_mask=mask), Resplitted)
    return (kv if kv is not None else hidden).nbytes


def _take_from_edge(session: RemoteSession, split: int,
                    rebuild: bool) -> tuple[int, dict[str, np.ndarray], dict | None]:
    """This device takes layers [old, split) over: (bytes that crossed, their cache, kept boundaries)."""
    old = session.split
    reply = session.request(Resplit(session.session_id, session.edge_step, split, send_kv=not rebuild), Resplitted)
    if split == session.num_layers:
        if not session.private_output:  # with private output this device sampled all along
            session.sampler.state = reply.sampler_state
        session.open = False  # the edge closed the session when it handed the last layer over
    if rebuild:
        rebuilt = rebuild_layers(session, Span(old, split))
        return 0, rebuilt.cache, rebuilt.boundaries
    return reply.kv.nbytes, unpack_kv(reply.kv, Span(old, split), session.head, session.batch, session.past), None


def rebuild_layers(session: RemoteSession, layers: Span) -> SpanRunner:
    """A runner whose cache holds ``layers`` for every position so far, recomputed here in one pass from the
    hidden states at their start if this device kept them, else from the tokens."""
    mask = session.mask[:, : session.past]
    if session.kept_boundary(layers.start):
        start, first = layers.start, session.head.boundary(layers.start)
    else:
        start, first = 0, session.sequence[:, : session.past]
    pool = session.client.pool
    return session.compute(lambda: recompute(pool, Span(start, layers.end), first, mask, session.head.variant,
                                             keep_boundaries=True)[0])


def fail_over(session: RemoteSession, lost: SeamError, close_there: bool = False) -> bool:
    """The edge was lost (``lost`` says how) or is shutting down: opens the session on the best other edge of the
    client's fleet at the same split, with the hidden states this device kept there, from which that edge
    rebuilds its layers' cache in one pass, and the sampler's position; the step in flight, if any, is then sent
    again. ``close_there``: the edge left still answers, and is told the session is gone once it has moved.
    False when the session cannot move: no other edge answers, or nothing was kept to rebuild from."""
    split, past, first_left = session.split, session.past, session.client.server
    if split == 0 or (past and not session.kept_boundary(split)):
        return False
    started, session.open = time.perf_counter(), False
    for attempt in range(FAILOVER_ATTEMPTS):  # an edge that fails while taking the session over: the next best
        try:
            left, socket = session.client.fail_over()
        except SeamError:
            return False
        if attempt == 0 and close_there:
            _close_quietly(socket, session.session_id)
        socket.close()
        try:
            session.open_on_edge(None, session.head.boundary(split)[:, :past] if past else None)
        except SeamError:
            continue
        seconds = time.perf_counter() - started
        session.moves.append(Move(len(session.stats.timings), split, split, 0, seconds,
                                  f"the edge at {first_left} {'is shutting down' if close_there else f'was lost ({lost})'}"
                                  f"; the session went on at {session.client.server} after {seconds:.2f} s",
                                  edge=session.client.server))
        return True
    return False


def _close_quietly(socket, session_id: str) -> None:
    try:
        socket.request(Close(session_id), timeout_s=min(socket.config.timeout_s, 2))
    except SeamError:
        pass  # it is going anyway; its drain deadline reclaims the session


def leave_draining_edge(session: RemoteSession) -> None:
    """The edge is shutting down: the session moves to another edge of the fleet, or, with none that answers,
    onto this device with its cache, before the edge goes."""
    session.edge_draining = False
    leaving = session.client.server
    if not fail_over(session, SeamError(f"{leaving} is shutting down"), close_there=True):
        if session.client.server != leaving:  # it left, but no other edge took the session: rebuild it here
            raise EdgeLost(f"the edge at {leaving} shut down and no other edge took the session")
        session.open = True
        move_split(session, session.num_layers, f"the edge at {leaving} is shutting down")


def finish_locally(session: RemoteSession, sequence: np.ndarray, mask: np.ndarray, lost: SeamError) -> np.ndarray:
    """The edge stopped answering, or answered without the session (it restarted), and its layers' cache went
    with it: this device takes every layer, rebuilds
    their cache from the whole sequence so far in one pass, and samples the step that was lost.

    The output continues as it would have on the edge, sampled output too: this device kept the position of the
    edge's generator (``Sampler.skip``)."""
    started, old = time.perf_counter(), session.split
    session.open = False
    session.head = session.client.pool.runner(Span(0, session.num_layers), session.client.variant,
                                              keep_boundaries=True)
    session.head.reset(session.batch)
    logits = session.compute(lambda: session.head.run(sequence, mask, positions_from_mask(mask)))[:, -1, :]
    tokens = session.sampler(logits)
    arrived = time.perf_counter()
    session.split = session.num_layers
    session.stats.record(StepTiming(arrived - started, 0.0, 0.0), arrived)
    session.moves.append(Move(len(session.stats.timings) - 1, old, session.split, 0, arrived - started,
                              f"the edge was lost ({lost}); finishing on this device"))
    return tokens
