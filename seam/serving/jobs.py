"""One request's generation, on a thread of its own: its edge session (or every layer here when the edge is down
and ``--fallback-local`` allows it), its text handed to the HTTP handler as it streams, ended by the model's
end of turn, a stop string, ``max_tokens``, or the client leaving, and Seam's figures for the reply and the page.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass

from seam.runtime.errors import SeamError
from seam.runtime.replies import EdgeLost
from seam.runtime.transport import TransportTimeout
from seam.serving.lanes import Cancelled
from seam.serving.replies import Answer
from seam.serving.requests import ApiError, Completion
from seam.ue_client.display import TextStream
from seam.ue_client.local import local_tokens

log = logging.getLogger("seam.serving")
PROGRESS_EVERY_S = 0.25  # how often a generation tells the page how it goes, besides its first token and moves


@dataclass
class Job:
    request_id: str
    completion: Completion
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]  # ("text", str), then ("done", Answer) or ("error", ApiError); thread-safe
    cancelled: threading.Event


class _Sink:
    """Where ``TextStream`` writes: each piece of text is emitted as it comes, and kept for the whole answer."""

    def __init__(self, emit: Callable[[tuple], None]):
        self.emit, self.parts = emit, []

    def write(self, text: str) -> None:
        self.parts.append(text)
        self.emit(("text", text))

    def flush(self) -> None:
        pass


def run_job(service, job: Job) -> None:
    """Generates ``job``'s answer and emits it; every failure becomes an error in OpenAI's shape."""
    try:
        job.emit(("done", _generate(service, job)))
    except Cancelled:
        pass
    except (TransportTimeout, EdgeLost) as lost:
        job.emit(("error", ApiError(503, f"the edge server stopped answering ({lost}); retry, or start the "
                                         "endpoint with --fallback-local to finish answers on this device", None,
                                    "edge_unavailable", "server_error")))
    except SeamError as error:
        job.emit(("error", ApiError(500, str(error), None, "generation_failed", "server_error")))
    except Exception as error:  # a bug must not take the thread's request down silently
        log.exception("request %s failed", job.request_id)
        job.emit(("error", ApiError(500, f"internal error: {error!r}", None, "internal_error", "server_error")))
    finally:
        service.hub.publish({"request": job.request_id, "done": True})


def _generate(service, job: Job) -> Answer:
    sink = _Sink(job.emit)
    stream = TextStream(service.tokenizer, service.eos, sink, job.completion.stops)
    answer = Answer(prompt_tokens=len(job.prompt_ids))
    sampling = job.completion.sampling
    try:
        with service.lanes.lane(job.cancelled) as client:
            session = client.session(service.split, sampling, service.args.allow_token_upload,
                                     service.args.fallback_local, service.args.private_output)
            with session:
                session.impairment = service.impairment
                progress = Progress(service.hub, job.request_id, session)
                _take(job, session.generate([job.prompt_ids], job.max_tokens, service.new_policy()), stream, answer,
                      progress)
            answer.seam = figures(session)
    except TransportTimeout:
        if not service.args.fallback_local or answer.completion_tokens:
            raise
        # No connection to the edge could be made: every layer here, from the start.
        tokens = local_tokens(service.pool, service.variant, job.prompt_ids, job.max_tokens, sampling)
        _take(job, tokens, stream, answer)
        answer.seam = {"split": service.artifact.num_layers, "layers": service.artifact.num_layers,
                       "local": True}
    stream.end("")
    answer.text = "".join(sink.parts)
    return answer


def _take(job: Job, tokens: Iterator, stream: TextStream, answer: Answer, progress=None) -> None:
    """Streams ``tokens`` until the answer ends, counting each one the model produced."""
    answer.finish_reason = "length"
    with closing(tokens):  # closing the generator closes the edge session at once
        for token in tokens:
            answer.completion_tokens += 1
            if progress is not None:
                progress()
            if not stream.push(token):
                answer.finish_reason = "stop"
                return
            if job.cancelled.is_set():
                answer.finish_reason = None
                return


class Progress:
    """Publishes a generation's split, link estimate and rate to the page: at its first token, at every move of
    the split, and every ``PROGRESS_EVERY_S`` between."""

    def __init__(self, hub, request_id: str, session):
        self.hub, self.request_id, self.session = hub, request_id, session
        self.moves_sent = 0
        self.last = -math.inf

    def __call__(self) -> None:
        session, now = self.session, time.monotonic()
        if len(session.moves) == self.moves_sent and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        self.hub.publish({
            "request": self.request_id, "split": session.split, "layers": session.num_layers,
            "tokens": len(session.stats.arrivals), "tokens_per_s": _finite(session.stats.tokens_per_second),
            "link": _link(session), "moves": [_move(move) for move in session.moves[self.moves_sent:]],
        })
        self.moves_sent = len(session.moves)


def figures(session) -> dict:
    """Seam's account of one generation, for the reply's usage."""
    stats = session.stats
    medians = stats.decode_medians_ms() if stats.timings else {}
    return {
        "split": session.split, "first_split": session.first_split, "layers": session.num_layers, "codec": session.codec,
        "private_output": session.private_output,
        "tokens_per_s": _finite(stats.tokens_per_second),
        "time_to_first_token_ms": round(1e3 * stats.time_to_first_token_s, 2) if stats.arrivals else None,
        "per_token_ms": {part.removesuffix("_s"): round(ms, 3) for part, ms in medians.items()},
        "moves": [_move(move) for move in session.moves], "link": _link(session),
    }


def _link(session) -> dict:
    """The session's estimate of the link to the edge."""
    link = session.link.link()
    return {"up_mbit": round(link.up_mbit, 2), "down_mbit": round(link.down_mbit, 2),
            "rtt_ms": round(1e3 * link.rtt_s, 2)}


def _move(move) -> dict:
    return {"before_token": move.before_step + 1, "from": move.from_split, "to": move.to_split,
            "ms": round(1e3 * move.seconds, 1), "reason": move.reason}


def _finite(value: float) -> float | None:
    return round(value, 2) if math.isfinite(value) else None
