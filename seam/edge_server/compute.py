"""The edge's compute: opens sessions (with a cache carried over or recomputed), runs checked steps alone or as
one batch, samples their tokens, and moves a session's split. Its spans end at the last layer, or, on a stage of
a pipeline, at the layer where the next stage begins. No socket and no dispatch: the server (``seam.edge_server.server``)
checks each request first (``seam.edge_server.validation``) and hands this the checked value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from seam.edge_server.sessions import EdgeSession, SessionKey, SessionTable
from seam.edge_server.validation import CheckedStep, Limits
from seam.planning.memory import step_working_bytes
from seam.runtime.artifact import DTYPE_BYTES, Artifact
from seam.runtime.batching import compact, run_together
from seam.runtime.executor import SessionPool
from seam.runtime.migration import pack_kv, recompute, resplit, unpack_kv
from seam.runtime.protocol import OpenSession, Resplit, Resplitted, StepResult
from seam.runtime.sampling import Sampler, SamplingParams
from seam.runtime.spans import Span


@dataclass(frozen=True)
class Onward:
    """What a session opened with a past hands the next stage of a pipeline: the packed cache of the layers
    beyond this stage, or the hidden states at its end to recompute theirs from."""

    kv: np.ndarray | None = None
    hidden_states: np.ndarray | None = None


class EdgeCompute:
    def __init__(self, artifact: Artifact, pool: SessionPool, table: SessionTable, limits: Limits,
                 prefill_chunk: int, end: int):
        self.artifact, self.pool, self.table, self.limits = artifact, pool, table, limits
        self.end = end  # the layer this edge's spans end at: the last, or where the next stage begins
        self.prefill_chunk = prefill_chunk  # positions a prefill runs at a time, bounding its activations
        self.reshaped = False  # a batched step or a move since the last settle: caches may view larger arrays
        self.settled_sessions: frozenset[SessionKey] = frozenset()

    def kv_bytes(self, batch: int, max_length: int, split: int) -> int:
        """KV reserved for a session: its full length on every edge layer, so admission never over-commits."""
        layers = self.end - split
        return batch * max_length * layers * self.artifact.manifest.kv_bytes_per_token_per_layer

    def working_bytes(self, rows: int, new: int, past: int, split: int, stacked: bool = False) -> int:
        """What a step of ``rows`` sequences at ``split`` holds while it runs, beyond their caches; a batch
        (``stacked``) copies the caches first only in the concat layout (shared buffers step in place)."""
        stacked = stacked and self.artifact.manifest.kv_layout != "shared-buffer"
        manifest = self.artifact.manifest
        return step_working_bytes(manifest.dims, manifest.kv_bytes_per_token_per_layer, DTYPE_BYTES[manifest.dtype],
                                  self.end - split, rows, new, past, stacked)

    def largest_step_bytes(self, batch: int, max_length: int, split: int) -> int:
        """The working memory of a session's largest step: its last prefill chunk, ending at ``max_length``."""
        new = min(self.prefill_chunk, max_length)
        return self.working_bytes(batch, new, max_length - new, split)

    def settle(self) -> None:
        """Frees what batched caches pin beyond what their sessions use, and records what stays pinned; run
        between bursts, after the replies went out. Only a batched step or a move makes a cache view a larger
        array, and only one of those or a session that left can strand one, so otherwise nothing is walked."""
        sessions = frozenset(self.table.sessions)
        if not self.reshaped and self.settled_sessions <= sessions:
            return
        live, held = compact([session.runner for session in self.table.sessions.values()],
                             (self.pool.arenas or {}).values())
        self.table.pinned_bytes = held - live
        self.reshaped, self.settled_sessions = False, sessions

    def open(self, key: SessionKey, request: OpenSession, past: int) -> tuple[EdgeSession, list[EdgeSession], Onward]:
        """A session for a checked ``request`` arriving with ``past`` positions, the sessions evicted to make room
        for it, and what a next stage needs of the sequences' past (nothing when it arrives without one)."""
        sampler = None if request.private_output else Sampler(SamplingParams.from_dict(request.sampling))
        if sampler is not None and request.sampler_state:
            sampler.state = request.sampler_state
        span = Span(request.split, self.end)
        runner = self.pool.runner(span, head=not request.private_output)
        runner.reset(request.batch)
        onward = Onward()
        if request.kv is not None:  # sequences the UE has been running alone until now
            ours, theirs = request.kv, None
            if self.end < self.artifact.num_layers and request.kv.ndim == 4:  # the rest is the next stage's to check
                ours, theirs = np.split(request.kv, [2 * len(span) * request.batch])
            runner.cache = unpack_kv(ours, span, runner, request.batch, past)
            onward = Onward(kv=theirs)
        elif request.hidden_states is not None:  # the same, with the cache to recompute here
            runner, output = recompute(self.pool, span, request.hidden_states, request.attention_mask,
                                       head=not request.private_output)
            onward = Onward(hidden_states=output if self.end < self.artifact.num_layers else None)
        # The span's graphs joined now, once per span and process: built in the background, they would slow the
        # steps of every session meanwhile, which the UEs' policies would read as a slower link.
        runner.join_blocks(wait=True)
        kv_bytes = self.kv_bytes(request.batch, request.max_length, request.split)
        working_bytes = self.largest_step_bytes(request.batch, request.max_length, request.split)
        victims = self.table.admit(key, kv_bytes, working_bytes)
        now = time.monotonic()
        session = EdgeSession(key, runner, sampler, request.split, request.batch, request.max_length, kv_bytes,
                              working_bytes, now, now, request.allow_token_upload, mask=request.attention_mask)
        self.table.add(session)
        return session, victims, onward

    def run_steps(self, group: list[tuple[EdgeSession, CheckedStep]]) -> list[np.ndarray]:
        """Runs checked steps of sessions at one split; one step runs on its own, several as one batch (their
        caches left-padded to a common length). Returns each session's output: the last position's logits, or
        on a pipeline stage the hidden states of every new position; a failed run raises before any cache has
        changed."""
        if len(group) == 1:
            session, checked = group[0]
            outputs = [session.runner.run_in_chunks(checked.first, checked.attention_mask, checked.position_ids,
                                                    self.prefill_chunk)]
        else:
            outputs = run_together(
                [session.runner for session, _ in group],
                [checked.first for _, checked in group],
                [checked.attention_mask for _, checked in group],
                [checked.position_ids for _, checked in group],
            )
            for session, _ in group:
                session.batched_steps += 1
            self.reshaped = True
        return outputs

    @staticmethod
    def sample(group: list[tuple[EdgeSession, CheckedStep]], outputs: list[np.ndarray]) -> list[np.ndarray | Exception]:
        """Each session's tokens [B] from its step's logits, or what sampling them raised, so that one session's
        fault stays its own; a session keeping its output private gets the last position's hidden states."""
        results: list[np.ndarray | Exception] = []
        for (session, _), output in zip(group, outputs):
            if session.private_output:
                results.append(output[:, -1:, :])
                continue
            try:
                results.append(session.sampler(output[:, -1, :]))
            except Exception as error:  # e.g. logits a session's own inputs made non-finite
                results.append(error)
        return results

    @staticmethod
    def advance(session: EdgeSession, checked: CheckedStep, step: int, compute_s: float,
                output: np.ndarray) -> StepResult:
        """Records a step that ran and returns its result: ``output`` is its tokens, or with private output the
        hidden states the UE samples from."""
        session.next_step += 1
        session.mask = checked.attention_mask
        session.tokens += session.batch
        session.compute_s += compute_s
        if session.private_output:
            return StepResult(session.key[1], step, compute_s, hidden_states=output)
        return StepResult(session.key[1], step, compute_s, output)

    def resplit(self, session: EdgeSession, request: Resplit) -> Resplitted:
        """Moves a checked ``request``'s session to its split; at split L the session is handed over whole and
        the caller removes it."""
        old, new, last = session.split, request.split, self.artifact.num_layers
        end = min(new, self.end)  # a stage hands over its own layers; the next stage hands over the rest
        runner, past = session.runner, session.runner.past_length
        if new < old:  # the edge takes layers [new, old) over, with their cache or what to recompute it from
            recomputing = request.hidden_states is not None
            if not recomputing:
                incoming = unpack_kv(request.kv, Span(new, old), runner, session.batch, past)
            self.table.reserve(session, self.kv_bytes(session.batch, session.max_length, new),
                               self.largest_step_bytes(session.batch, session.max_length, new))
            if recomputing:  # only once the move is known to fit
                incoming = recompute(self.pool, Span(new, old), request.hidden_states, request.attention_mask)[0].cache
            outgoing, sampler_state = None, {}
        else:  # the UE takes layers [old, new) over
            incoming = {}
            outgoing = pack_kv(runner.cache, Span(old, end)) if request.send_kv else None
            sampler_state = session.sampler.state if new == last and session.sampler is not None else {}
            session.kv_bytes = self.kv_bytes(session.batch, session.max_length, new)
            session.working_bytes = self.largest_step_bytes(session.batch, session.max_length, new)
        session.moves += 1
        self.reshaped = True
        if new < last:
            session.runner = resplit(self.pool, runner, Span(new, self.end), incoming)
            session.runner.join_blocks(wait=True)
            session.split = new
        return Resplitted(request.session_id, new, sampler_state, outgoing)
