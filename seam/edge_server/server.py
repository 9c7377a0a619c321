"""The edge server's handler: the receive loop, a table from message kind to handler, the handshake, and turning
every failure into an Error reply, so that one bad request or one faulty session never takes the others down.

One thread owns the socket and the sessions. Requests that queued up while the last step ran are taken as one
burst; each step is checked once (``seam.edge_server.validation``), and ready decode steps of different sessions
run as one batch (``seam.edge_server.compute``). A prefill longer than one chunk runs a chunk between bursts, so
the sessions decoding meanwhile wait for one chunk at most, not for the whole prompt. Services such as split
fine-tuning register their message kinds with ``register``, so this module depends on none of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from seam.edge_server.audit import MessageLog
from seam.edge_server.compute import EdgeCompute
from seam.edge_server.config import EdgeConfig
from seam.edge_server.load import LoadReport
from seam.edge_server.sessions import EdgeSession, SessionTable, UnknownSession
from seam.edge_server.stage import NextStage, StageLost, stage_end
from seam.edge_server.validation import (CheckedStep, Limits, check_open, check_ping, check_resplit, check_step,
                                         private_output_refusal)
from seam.runtime.artifact import NUMPY_DTYPES, Artifact
from seam.runtime.codecs import CODECS, CODECS_CAPABILITY
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.protocol import (PRIVATE_OUTPUT_CAPABILITY, PROBE_FINGERPRINT, PROTOCOL_VERSION, TRAINING_MESSAGES,
                                   Close, Closed, Error, Hello, Message, OpenSession, Ping, Pong, ProtocolError,
                                   Resplit, SessionOpened, Step, Welcome)
from seam.runtime.spans import Span
from seam.runtime.transport import EdgeSocket

log = logging.getLogger("edge_server")
Handler = Callable[[bytes, Message], Message]
Ready = tuple[EdgeSession, CheckedStep, Step]


class EdgeServer:
    def __init__(self, config: EdgeConfig):
        self.config = config
        self.artifact = Artifact.open(config.artifact)
        self.manifest = self.artifact.manifest
        self.pool = SessionPool(self.artifact, config.threads, config.device, shared_rows=True)
        self.end = stage_end(self.artifact, config.until, config.next_stage)
        self.pool.preload(Span(0, self.end))
        self.offered_codecs = [name for name in CODECS if name == "fp32" or name in config.codecs]
        self.table = SessionTable(config.max_sessions, int(config.memory_budget_mb * 2**20), config.idle_timeout_s)
        self.limits = Limits(self.artifact.num_layers, self.manifest.dims.hidden_size, self.manifest.dims.vocab_size,
                             np.dtype(NUMPY_DTYPES[self.manifest.dtype]), config.max_batch, config.max_length,
                             tuple(self.offered_codecs), self._check_split,
                             private_output_refusal(self.manifest, self.end))
        self.compute = EdgeCompute(self.artifact, self.pool, self.table, self.limits, config.prefill_chunk, self.end)
        self.prefills: list[tuple[Ready, int]] = []  # long prefills under way, oldest first: positions run so far
        self.welcomed: set[bytes] = set()  # peers holding this artifact: they may open sessions
        self.greeted: set[bytes] = set()  # peers that said hello, with or without an artifact: they may probe
        # Steps are not here: ``handle_burst`` checks and runs them itself, so that ready ones run as one batch.
        self.handlers: dict[type, Handler] = {OpenSession: self._open, Resplit: self._resplit, Close: self._close}
        self.owners: list[tuple[Callable[[bytes, str], bool], Handler]] = []  # services' own sessions
        self.next_stage = None if self.end == self.artifact.num_layers else NextStage(
            config.next_stage, self.manifest.artifact_fingerprint, self.end,
            replace(config.transport, timeout_s=config.next_timeout_s), config.curve_secret, config.next_server_key)
        try:
            self.socket = EdgeSocket(config.bind, config.transport, config.curve_secret, config.allowed_keys)
        except BaseException:
            if self.next_stage is not None:
                self.next_stage.close_link()
            raise
        self.running = True
        self.draining_until: float | None = None  # set by ``drain``: the moment the server stops waiting for UEs
        self.load = LoadReport()
        self.published, self.publish_at = self.welcome(), 0.0  # for other threads: the registry's announcer
        self.message_log = MessageLog(config.log_messages)

    @property
    def address(self) -> str:
        return self.socket.address

    def register(self, kinds: tuple[type, ...], handler: Handler, owns: Callable[[bytes, str], bool]) -> None:
        """Hands messages of ``kinds``, and any message of a session ``owns(peer, session_id)`` claims, to a
        service's ``handler``."""
        for kind in kinds:
            self.handlers[kind] = handler
        self.owners.append((owns, handler))

    def serve(self) -> None:
        try:
            while self.running and not self._drained():
                if time.monotonic() >= self.publish_at:  # built on this thread, which owns the session table
                    self.published, self.publish_at = self.welcome(), time.monotonic() + 1.0
                received = self.socket.receive(timeout_s=0 if self.prefills else 0.2)
                for session in self.table.idle(time.monotonic()):
                    self._log_close(session, "idle timeout")
                if received is None:
                    self._send(self._prefill_chunk())
                    self.compute.settle()
                    continue
                burst = [received]
                while len(burst) < self.config.max_burst and (more := self.socket.receive(timeout_s=0)) is not None:
                    burst.append(more)
                try:
                    replies = self.handle_burst(burst)
                except Exception:  # every handler is guarded; this keeps a bug in the loop from ending it
                    log.exception("internal error in a burst of %d messages; they go unanswered", len(burst))
                    continue
                self._send(replies)
                self._send(self._prefill_chunk())
                self.compute.settle()  # after the replies: it costs the UEs no time
        finally:
            for session in list(self.table.sessions.values()):
                self._log_close(self.table.remove(session.key), "server shutdown")
            self.socket.close()
            if self.next_stage is not None:
                self.next_stage.close_link()
            self.message_log.close()

    def stop(self, *_) -> None:
        self.running = False

    def drain(self, within_s: float) -> None:
        """Stops taking sessions and tells each UE, in its next step's reply, to move its session elsewhere; the
        server stops once none is left or ``within_s`` has passed. Draining a second time stops it at once."""
        if self.draining_until is not None:
            self.stop()
        self.draining_until = time.monotonic() + within_s
        log.info("draining: %d sessions to move within %g s", len(self.table.sessions), within_s)

    def _drained(self) -> bool:
        return self.draining_until is not None and (not self.table.sessions or time.monotonic() >= self.draining_until)

    def _send(self, replies: list[tuple[bytes, Message]]) -> None:
        for peer, reply in replies:
            self.socket.send(peer, reply)

    def _prefill_chunk(self) -> list[tuple[bytes, Message]]:
        """Runs the next chunk of the oldest prefill under way; the replies once its last chunk has run."""
        if not self.prefills:
            return []
        (session, checked, step), done = self.prefills[0]
        if self.table.sessions.get(session.key) is not session:  # closed or evicted meanwhile
            self.prefills.pop(0)
            return []
        chunk = self.compute.prefill_chunk
        if checked.new - done <= chunk:  # the last chunk samples and replies as a whole step would
            self.prefills.pop(0)
            rest = CheckedStep(checked.first[:, done:], checked.attention_mask, checked.position_ids[:, done:])
            return self._run_group([(session, rest, step)])
        past = session.runner.past_length
        try:
            session.runner.run(checked.first[:, done: done + chunk], checked.attention_mask[:, : past + chunk],
                               checked.position_ids[:, done: done + chunk])
        except Exception as error:  # what the chunks before it wrote is of a step that never finished
            self.prefills.pop(0)
            return self._replies([(session, checked, step)], [error], 0.0)
        self.prefills[0] = ((session, checked, step), done + chunk)
        return []

    def handle_burst(self, burst: list[tuple[bytes, Message | ProtocolError]]) -> list[tuple[bytes, Message]]:
        """Replies to each (peer, message), in order per peer; ready decode steps run batched."""
        replies: list[tuple[bytes, Message]] = []
        ready: list[Ready] = []
        waiting: set[tuple[bytes, str]] = set()  # the sessions with a step in ``ready``

        def flush() -> None:  # earlier steps first: what follows may depend on them, and replies keep order
            replies.extend(self._run_ready(ready))
            ready.clear()
            waiting.clear()

        for peer, message in burst:
            if isinstance(message, ProtocolError):
                flush()
                replies.append((peer, Error("bad_message", str(message))))
                continue
            self.message_log.record(message)
            if not isinstance(message, Step):
                flush()
                replies.append((peer, self.handle(peer, message)))
                continue
            if (peer, message.session_id) in waiting:
                flush()  # this step is checked against the one before it
            prepared = self._prepared_step(peer, message)
            if isinstance(prepared, tuple) and prepared[1].new == 1 and self.config.batch_decode:
                ready.append(prepared)
                waiting.add(prepared[0].key)
                continue
            flush()
            if isinstance(prepared, tuple) and prepared[1].new > self.compute.prefill_chunk and self.next_stage is None:
                self.prefills.append((prepared, 0))  # a chunk at a time, between bursts (``serve``)
            elif isinstance(prepared, tuple):
                replies.extend(self._run_group([prepared]))
            else:
                replies.append((peer, prepared or self.handle(peer, message)))
        flush()
        return replies

    def handle(self, peer: bytes, message: Message) -> Message:
        """The reply to one message other than a step of a welcomed peer (``handle_burst`` runs those); what a
        handler raises becomes an Error reply."""
        session_id = getattr(message, "session_id", "")
        return self._guarded(peer, session_id, lambda: self._dispatch(peer, message))

    def _dispatch(self, peer: bytes, message: Message) -> Message:
        session_id = getattr(message, "session_id", "")
        if isinstance(message, Hello):
            return self._hello(peer, message)
        if isinstance(message, Ping):  # needs no artifact, so a link can be probed before choosing one
            check_ping(message, self.config.transport.max_message_bytes, peer in self.greeted)
            return Pong(message.nonce, np.zeros(message.reply_bytes, np.uint8) if message.reply_bytes else None)
        if peer not in self.welcomed:
            return Error("no_handshake", "send hello before anything else", session_id)
        for owns, handler in self.owners:
            if owns(peer, session_id):
                return handler(peer, message)
        handler = self.handlers.get(type(message))
        if handler is None:
            if isinstance(message, TRAINING_MESSAGES):
                raise SeamError("this edge_server does not train; start it with --train")
            return Error("bad_message", f"a UE does not send {message.kind!r} messages", session_id)
        return handler(peer, message)

    def _guarded(self, peer: bytes, session_id: str, work: Callable[[], Message]) -> Message:
        try:
            return work()
        except UnknownSession as error:  # its own code: the UE treats the session as lost, as after a timeout
            return Error("unknown_session", str(error), session_id)
        except StageLost as error:  # the same: the session's layers beyond this stage are gone
            if (peer, session_id) in self.table.sessions:
                self.next_stage.forget((peer, session_id))
                self._log_close(self.table.remove((peer, session_id), str(error)), "the next stage was lost")
            return Error("stage_lost", str(error), session_id)
        except SeamError as error:
            return Error("rejected", str(error), session_id)
        except Exception as error:  # a fault in one session must not take the others down
            log.exception("internal error in session %r", session_id)
            if (peer, session_id) in self.table.sessions:
                self.table.remove((peer, session_id), "closed after an internal error")
            return Error("internal", f"{type(error).__name__}: {error}; the session was closed", session_id)

    def _prepared_step(self, peer: bytes, step: Step) -> Ready | Message | None:
        """The session and checked step of a step from a welcomed peer, or the Error its check gave; None for a
        peer that skipped the handshake, which the handler answers."""
        if peer not in self.welcomed:
            return None

        def prepare():
            session = self.table.get((peer, step.session_id), time.monotonic())
            return session, check_step(session, step, self.limits), step

        return self._guarded(peer, step.session_id, prepare)

    def _run_ready(self, ready: list[Ready]) -> list[tuple[bytes, Message]]:
        """Runs checked decode steps, one batched run per split as far as ``max_batch`` sequences and the memory
        the budget leaves free allow."""
        # Sessions keeping their output private run a graph without the head: they batch among themselves.
        by_split: dict[tuple[int, bool], list[Ready]] = {}
        # In the order of their rows in the span's arena (shared buffers): a run then covers few rows it does not step.
        for prepared in sorted(ready, key=lambda prepared: prepared[0].runner.buffers.first_row
                               if prepared[0].runner.buffers is not None else 0):
            by_split.setdefault((prepared[0].split, prepared[0].private_output), []).append(prepared)
        free = self.table.budget_bytes - self.table.kv_reserved - self.table.pinned_bytes
        replies = []
        for (split, _), group in by_split.items():
            run: list[Ready] = []
            rows = longest = 0
            for prepared in group:
                session = prepared[0]
                grown_rows, grown_longest = rows + session.batch, max(longest, session.runner.past_length)
                working = self.compute.working_bytes(grown_rows, 1, grown_longest, split, stacked=bool(run))
                if run and (grown_rows > self.config.max_batch or working > free):
                    replies += self._run_group(run)
                    run, grown_rows, grown_longest = [], session.batch, session.runner.past_length
                run.append(prepared)
                rows, longest = grown_rows, grown_longest
            if run:
                replies += self._run_group(run)
        return replies

    def _run_group(self, group: list[Ready]) -> list[tuple[bytes, Message]]:
        started = time.perf_counter()
        pairs = [(session, checked) for session, checked, _ in group]
        try:
            outputs = self.compute.run_steps(pairs)
        except Exception as error:
            if len(group) > 1:  # no cache changed: alone, each step fails or succeeds on its own account
                log.warning("a run of %d sessions failed (%s); running them one by one", len(group), error)
                return [reply for prepared in group for reply in self._run_group([prepared])]
            outputs, results = [], [error]
        if outputs:
            results = self._tokens(pairs, outputs)
        self.load.step(time.perf_counter() - started)
        return self._replies(group, results, time.perf_counter() - started)  # every session waited this long

    def _replies(self, group: list[Ready], results: list, compute_s: float) -> list[tuple[bytes, Message]]:
        """Each step's reply from its result: its tokens, or the error that closes its session."""
        replies = []
        for (session, checked, step), result in zip(group, results):
            if isinstance(result, StageLost):
                self.next_stage.forget(session.key)
                self._log_close(self.table.remove(session.key, str(result)), "the next stage was lost")
                reply = Error("stage_lost", str(result), step.session_id)
            elif isinstance(result, Exception):  # a fault in one session closes it, never the server
                log.error("internal error in session %r: %s: %s", step.session_id, type(result).__name__, result)
                self.table.remove(session.key, "closed after an internal error")
                reply = Error("internal", f"{type(result).__name__}: {result}; the session was closed", step.session_id)
            else:
                reply = self.compute.advance(session, checked, step.step, compute_s, result)
                reply.draining = self.draining_until is not None
            replies.append((session.key[0], reply))
        return replies

    def _tokens(self, pairs: list[tuple[EdgeSession, CheckedStep]], outputs: list[np.ndarray]) -> list:
        """Each session's tokens from its step's outputs: sampled here, or by the pipeline's later stages."""
        if self.next_stage is None:
            return self.compute.sample(pairs, outputs)
        try:
            return self.next_stage.forward([(session.key, session.next_step, checked) for session, checked in pairs],
                                           outputs)
        except StageLost as lost:
            return [lost] * len(pairs)

    def _check_split(self, split: int, allow_token_upload: bool) -> None:
        self.artifact.check_split(split, allow_token_upload)
        if self.end <= split < self.artifact.num_layers:
            raise SeamError(f"this edge_server is a pipeline stage running layers up to {self.end}; split {split} "
                            f"is not served here: choose one below {self.end}, or {self.artifact.num_layers} to run "
                            "every layer on the UE")

    def _hello(self, peer: bytes, hello: Hello) -> Message:
        if hello.protocol_version != PROTOCOL_VERSION:
            return Error("version_mismatch", f"the UE speaks protocol {hello.protocol_version}, this server "
                                             f"{PROTOCOL_VERSION}; update the older side")
        self.greeted.add(peer)
        if hello.artifact_fingerprint == PROBE_FINGERPRINT:  # a link probe: welcome, but no sessions
            return self.welcome()
        if hello.artifact_fingerprint != self.manifest.artifact_fingerprint:
            return Error("artifact_mismatch",
                         "the UE and the server hold different artifacts (fingerprints differ); copy the server's "
                         "artifact to the UE or export both from the same model with the same arguments")
        self.welcomed.add(peer)
        return self.welcome()

    def welcome(self) -> Welcome:
        served = [split for split in self.artifact.split_points
                  if split < self.end or split == self.artifact.num_layers]
        private = [] if self.limits.private_output_refusal else [PRIVATE_OUTPUT_CAPABILITY]
        return Welcome(PROTOCOL_VERSION, self.manifest.artifact_fingerprint, served,
                       self.config.transport.max_message_bytes,
                       ["sampling", CODECS_CAPABILITY + ",".join(self.offered_codecs), *private],
                       self.load.report(self.table, self.draining_until is not None))

    def _open(self, peer: bytes, request: OpenSession) -> Message:
        if self.draining_until is not None:
            return Error("draining", "this edge_server is shutting down; open the session on another edge",
                         request.session_id)
        past, started = check_open(request, self.limits), time.perf_counter()
        session, victims, onward = self.compute.open((peer, request.session_id), request, past)
        for victim in victims:
            self._log_close(victim, "evicted for room")
        if self.next_stage is not None:
            try:
                self.next_stage.open(session.key, request, onward)
            except BaseException:
                self.table.remove(session.key)
                raise
        log.info("open  %s peer=%s split=%d batch=%d max_length=%d sessions=%d", request.session_id, peer.hex()[:8],
                 request.split, request.batch, request.max_length, len(self.table.sessions))
        return SessionOpened(request.session_id, time.perf_counter() - started)

    def _resplit(self, peer: bytes, request: Resplit) -> Message:
        """Moves a session's split; the edge keeps serving it from the next step, or hands it over at split L."""
        session = self.table.get((peer, request.session_id), time.monotonic())
        check_resplit(session, request, self.limits)
        old, past, started = session.split, session.runner.past_length, time.perf_counter()
        reply = self.compute.resplit(session, request)
        if self.next_stage is not None and request.split == self.artifact.num_layers:
            onward = self.next_stage.hand_over(session.key, request)
            kv = None if reply.kv is None else np.concatenate([reply.kv, onward.kv])
            reply = replace(reply, sampler_state=onward.sampler_state, kv=kv)
        log.info("move  %s peer=%s split %d -> %d at past %d", request.session_id, peer.hex()[:8], old,
                 request.split, past)
        if request.split == self.artifact.num_layers:  # nothing left to run here: the UE generates alone
            self._log_close(self.table.remove(session.key), "moved to the UE")
        return replace(reply, edge_compute_s=time.perf_counter() - started)

    def _close(self, peer: bytes, request: Close) -> Message:
        session = self.table.get((peer, request.session_id), time.monotonic())
        self.table.remove(session.key)
        return Closed(request.session_id, self._log_close(session, "closed by UE"))

    def _log_close(self, session: EdgeSession, reason: str) -> dict:
        stats = session.stats()
        if self.next_stage is not None:
            stats["next_stage"] = self.next_stage.close(session.key)
        log.info("close %s peer=%s (%s) %s", session.key[1], session.key[0].hex()[:8], reason,
                 " ".join(f"{k}={v}" for k, v in stats.items()))
        return stats
