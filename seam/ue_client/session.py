"""A generation's sequences on this device and the edge: ``RemoteSession`` runs layers [0, split) here with
their KV cache, sends the hidden states at the split, and takes the token the edge samples.

Before each step after the first a policy may see a ``SessionSnapshot`` of the session and return a decision,
which the session applies (``seam.ue_client.moving``); while the UE runs alone a background prober keeps the link
estimate fresh (``seam.ue_client.probing``). Created by ``EdgeClient.session``.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from seam.planning.link_estimate import LinkEstimator
from seam.planning.snapshot import ArtifactFacts, Decision, SessionSnapshot, StepTiming
from seam.runtime.chat import encode_conversation
from seam.runtime.codecs import to_message_fields
from seam.runtime.errors import SeamError
from seam.runtime.generation import left_pad, positions_from_mask
from seam.runtime.impairments import Impairment
from seam.runtime.protocol import Close, Closed, Message, OpenSession, SessionOpened, Step, StepResult
from seam.runtime.replies import EdgeLost
from seam.runtime.sampling import Sampler, SamplingParams
from seam.runtime.spans import Span
from seam.runtime.transport import TransportTimeout
from seam.ue_client import moving
from seam.ue_client.connection import exchange
from seam.ue_client.probing import BackgroundProber, LinkProber
from seam.ue_client.stats import GenerationStats, Move

if TYPE_CHECKING:
    from seam.ue_client.client import EdgeClient

T = TypeVar("T")
SplitPolicy = Callable[[SessionSnapshot], "Decision | None"]  # consulted before each step after the first
TIMINGS_SEEN = 8  # the most recent steps a snapshot carries: policies calibrate on a window of a few
LINK_HISTORY = 1024  # link estimates a snapshot carries: minutes of a generation, for the link's dynamics


class RemoteSession:
    """One generation's sequences, layers [0, split) on this device and the rest on the edge.

    The split may move between steps (``move_split``, or a policy given to ``generate``); at split L this device
    runs every layer and samples itself, and the edge holds nothing until the split moves back.
    """

    def __init__(self, client: EdgeClient, split: int, sampling: SamplingParams, allow_token_upload: bool,
                 fallback_local: bool = False, private_output: bool = False):
        self.client = client
        self.fallback_local = fallback_local  # if the edge stops answering, finish on this device
        # This device keeps the head and samples every token: the edge sees no token, logit or sampling setting.
        self.private_output = private_output
        if private_output:
            client.check_private_output()
        self.num_layers = client.artifact.num_layers
        self.allow_token_upload = allow_token_upload
        client.check_split(split, allow_token_upload)
        self.split = split
        self.sampling = sampling
        self.sampler = Sampler(sampling)  # samples while this device holds every layer; travels with the split
        self.codec = client.codec  # how hidden states cross; may change between steps, to one the edge offered
        self.impairment: Impairment | None = None  # research: corrupts the hidden states at the cut before coding
        self.impairment_rng = np.random.default_rng(0)
        self.head = client.pool.runner(Span(0, split), client.variant, keep_boundaries=True)
        # The span a generation starts on, joined before it starts: built in the background meanwhile, it would
        # slow the steps the policy measures (a span the split moves to later is joined in the background).
        self.head.join_blocks(wait=True)
        self.facts = ArtifactFacts.of(client.artifact.manifest, self.head.variant, self.head.kv_dtype.itemsize)
        self.session_id = uuid.uuid4().hex
        self.stats = GenerationStats()
        self.moves: list[Move] = []
        self.first_split = split  # where the sequences started, and why when a policy chose it (see _start)
        self.start_reason = ""
        self.edge_stats: dict = {}  # the edge's own account of the session, filled in on close
        self.open = False
        self.edge_step = 0
        self.edge_draining = False  # the edge said it is shutting down: the session moves before its next step
        self.batch = self.past = self.max_length = 0
        self.sequence = self.mask = None  # the tokens so far and their mask, from which moved layers are rebuilt
        self.reused = 0  # positions the last chat turn found held from earlier turns
        self.link = LinkEstimator(client.link)
        self.link_history: deque[tuple[float, float]] = deque(maxlen=LINK_HISTORY)  # (at, uplink bytes/s)
        self.prober = LinkProber(self.link, client.artifact.manifest.dims.hidden_size, self.head.kv_dtype.itemsize)

    @property
    def probes(self) -> int:
        return self.prober.pings

    def request(self, message: Message, kind: type) -> Message:
        return exchange(self.client.socket, message, kind, self.link)[0]

    def probe_link(self) -> None:
        """Pings the edge to refresh the stale directions of the link estimate."""
        self.prober.probe(self.client.socket, self.batch)

    def open_on_edge(self, kv: np.ndarray | None = None, hidden: np.ndarray | None = None) -> None:
        """Opens the session on the edge at the current split, with the cache of its layers (``kv``) or the hidden
        states to recompute it from when sequences are already running."""
        mask = self.mask[:, : self.past] if self.past else None  # the edge keeps the mask of the positions so far
        sampling, state = ({}, {}) if self.private_output else (vars(self.sampling), self.sampler.state)
        opening = OpenSession(self.session_id, self.split, self.batch, sampling, self.max_length,
                              self.allow_token_upload, state, kv, hidden, mask, self.private_output)
        self.request(opening, SessionOpened)
        self.open = True
        self.edge_step = 0

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 policy: SplitPolicy | None = None) -> Iterator[np.ndarray]:
        """Yields the next token of every prompt [B], step by step; before every step after the first, the
        ``policy`` sees the session's snapshot and its decision, if any, is applied."""
        ids, mask = left_pad(prompts, self.client.artifact.manifest.tokenizer["pad_token_id"])
        try:
            self._start(len(prompts), ids.shape[1] + max_new_tokens, policy, ids.shape[1])
            yield from self._run(ids, ids, mask, positions_from_mask(mask), max_new_tokens, policy)
        finally:
            self.close()

    def chat(self, messages: Sequence[dict], max_new_tokens: int, policy: SplitPolicy | None = None,
             max_length: int = 2048) -> Iterator[int]:
        """One turn of a conversation: yields the answer's token ids to ``messages`` (the whole conversation so
        far) until the caller stops taking them. The session stays open for the next turn, whose positions
        already held here and on the edge are not run again: only what the conversation added since is. A
        conversation whose rendering no longer starts with what the session holds starts over, as does the
        first; ``max_length`` bounds the whole conversation."""
        ids = encode_conversation(self.client.artifact, self.client.tokenizer, messages)
        held = self.past if self.sequence is not None and self.batch == 1 and (
            self.open or self.split == self.num_layers) else 0
        if held and (len(ids) <= held or ids[:held] != self.sequence[0, :held].tolist()):
            held = 0  # the conversation changed under the session: run it all again
        limit = self.max_length if held else max_length
        if len(ids) + max_new_tokens > limit:
            raise SeamError(f"the conversation and its answer would pass {limit} positions; start a new one")
        if not held:
            self.close()
            self._start(1, max_length, policy, len(ids))
        sequence = np.array([ids], np.int64)
        positions = np.arange(held, len(ids), dtype=np.int64)[None]
        self.reused = held
        for tokens in self._run(sequence[:, held:], sequence, np.ones_like(sequence), positions, max_new_tokens,
                                policy):
            yield int(tokens[0])

    def _start(self, batch: int, max_length: int, policy: SplitPolicy | None = None, prompt_length: int = 1) -> None:
        """New sequences: an empty cache here, and the session opened on the edge when it has layers. With a
        ``policy``, they start at the split it chooses for steps at the context of a ``prompt_length`` prompt:
        nothing is held yet, so starting elsewhere costs nothing, where a move after the prefill would carry or
        recompute a cache. It decides on the link as the session knows it so far (the connection's round trip
        and the prior rates, or what earlier generations measured): a probe sized to measure a fast link would
        send hundreds of KB before every prompt, and the prefill measures the uplink anyway."""
        self.batch, self.past, self.max_length = batch, 0, max_length
        if policy is not None:  # the blocks it may move to are preloaded by _run, before the prompt runs
            decision = policy(replace(self.snapshot(0), past=prompt_length))
            if decision is not None and decision.split != self.split:
                self.head = self.client.pool.runner(Span(0, decision.split), self.head.variant, keep_boundaries=True)
                self.head.join_blocks(wait=True)
                self.split, self.start_reason = decision.split, decision.reason
            if decision is not None and decision.codec is not None:
                self.codec = decision.codec
        self.first_split = self.split
        self.head.reset(batch)
        if self.split < self.num_layers:
            self.open_on_edge()

    def _run(self, first: np.ndarray, sequence: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             max_new_tokens: int, policy: SplitPolicy | None) -> Iterator[np.ndarray]:
        """Steps from ``first`` (the positions ``positions`` of ``sequence`` not yet run, under ``mask``),
        yielding each step's tokens [B]."""
        prober = None
        if policy is not None:
            self.preload(policy, self.snapshot(0))
        self.stats = GenerationStats(started=time.perf_counter())
        self.sequence, self.mask = sequence, mask
        try:
            for step in range(max_new_tokens):
                if step and policy is not None:
                    # Probing starts after the prefill, which measures the uplink itself: a probe sent beside it
                    # waits for this device's CPU, and a small one so delayed reads as a link ten times slower.
                    if prober is None:
                        prober = self._background_prober()
                    self.record_link()
                    self.apply(policy(self.snapshot(step)))
                try:
                    if self.edge_draining and self.open:
                        moving.leave_draining_edge(self)
                    tokens = self._step(first, mask, positions)
                except (TransportTimeout, EdgeLost) as lost:
                    if not self.fallback_local:
                        self.open = False  # the edge is gone: a close would only wait out another timeout
                        raise
                    tokens = moving.finish_locally(self, self.sequence, mask, lost)
                # The state moves on before the token is handed out, so a caller may move the split right away.
                self.past = mask.shape[1]
                mask = np.concatenate([mask, np.ones((self.batch, 1), dtype=np.int64)], axis=1)
                positions = positions[:, -1:] + 1
                first = tokens[:, None]
                self.sequence, self.mask = np.concatenate([self.sequence, first], axis=1), mask
                if prober is not None and prober.server != self.client.server:  # the session changed edges
                    prober.close()
                    prober = self._background_prober()
                yield tokens
        finally:
            if prober is not None:
                prober.close()

    def record_link(self) -> None:
        """Adds the uplink estimate to the link's history, from its first measurement on (the prior giving way
        to one is no change of the link), the first entry dated when that measurement was taken, so that the
        state the session found the link in is as old as what it has seen of it."""
        if not self.link.measured("up"):
            return
        first = None if self.link_history else self.link.measured_at("up")
        self.link_history.append((first or time.perf_counter(), self.link.link().up_bytes_per_s))

    def _background_prober(self) -> BackgroundProber:
        return BackgroundProber(self.prober, self.client.connect_again(5.0), lambda: self.split == self.num_layers,
                                lambda: self.batch, server=self.client.server)

    def preload(self, policy: SplitPolicy, snapshot: SessionSnapshot) -> None:
        """Opens every block a move may need on this device before the prompt, so that no move waits for one to
        load; a policy without candidates leaves the blocks to load on first use."""
        candidates = getattr(policy, "candidates", None)
        if candidates is not None:
            self.client.pool.preload(Span(0, max(candidates(snapshot))), self.head.variant)

    def snapshot(self, step: int) -> SessionSnapshot:
        """What a policy may see of this session before ``step``."""
        since_move = self.moves[-1].before_step if self.moves else 1  # the prefill is no decode step
        return SessionSnapshot(
            artifact=self.facts, step=step, now_s=time.perf_counter(), split=self.split, past=self.past,
            batch=self.batch, max_length=self.max_length, codec=self.codec,
            allow_token_upload=self.allow_token_upload, offered_codecs=tuple(self.client.codecs),
            link=self.link.link(), timings_since_move=tuple(self.stats.timings[max(since_move, 1):][-TIMINGS_SEEN:]),
            step_probes=tuple(self.prober.step_probes), move_steps=tuple(move.before_step for move in self.moves),
            kept=frozenset(cut for cut in range(self.num_layers + 1) if self.kept_boundary(cut)),
            link_history=tuple(self.link_history), up_measured_at=self.link.measured_at("up"),
            down_measured_at=self.link.measured_at("down"),
            prior=self.link.prior,
            served=tuple(self.client.welcome.split_points),
            move_costs=tuple((move.to_split > move.from_split, move.predicted_s, move.seconds)
                             for move in self.moves if move.predicted_s is not None),
            private_output=self.private_output,
        )

    def apply(self, decision: Decision | None) -> None:
        """Moves the split (and switches the codec) as a policy decided."""
        if decision is None:
            return
        self.move_split(decision.split, decision.reason, decision.rebuild, decision.move_s)
        if decision.codec is not None:
            self.codec = decision.codec

    def move_split(self, split: int, reason: str = "", rebuild: bool = False, predicted_s: float | None = None) -> None:
        """Moves the split between two steps (see ``seam.ue_client.moving``)."""
        moving.move_split(self, split, reason, rebuild, predicted_s)

    def kept_boundary(self, cut: int) -> bool:
        """Whether this device holds the hidden states at ``cut`` for every position so far (see SpanRunner)."""
        return bool(self.head.boundaries.get(cut))

    def compute(self, run: Callable[[], T]) -> T:
        """Runs UE compute; an emulated slower UE then idles for the extra time it would have taken."""
        started = time.perf_counter()
        output = run()
        if self.client.ue_slowdown > 1:
            time.sleep((self.client.ue_slowdown - 1) * (time.perf_counter() - started))
        return output

    def _step(self, first: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        began = time.perf_counter()
        output = self.compute(lambda: self.head.run(first, mask, positions))
        if self.split == self.num_layers:
            tokens = self.sampler(output[:, -1, :])
            arrived = time.perf_counter()
            self.stats.record(StepTiming(arrived - began, 0.0, 0.0), arrived)
            return tokens
        while True:
            try:
                return self._on_edge(output, mask, positions, began)
            except (TransportTimeout, EdgeLost) as lost:
                if not moving.fail_over(self, lost):  # no other edge took the session: the caller decides
                    raise

    def _on_edge(self, output: np.ndarray, mask: np.ndarray, positions: np.ndarray, began: float) -> np.ndarray:
        """Sends this device's ``output`` at the split as the next step and returns the edge's tokens."""
        carried = {"input_ids": output} if self.split == 0 else self._coded(output)
        unseen = mask[:, mask.shape[1] - positions.shape[1]:]  # the edge holds the columns before these
        sent = time.perf_counter()
        result = self.request(Step(self.session_id, self.edge_step, unseen, positions, **carried), StepResult)
        arrived = time.perf_counter()
        self.edge_step += 1
        self.edge_draining = result.draining
        network_s = max(arrived - sent - result.edge_compute_s, 0.0)
        if self.private_output:
            tokens = self.compute(lambda: self.sampler(self._head_logits(result)))
            done = time.perf_counter()  # the head ran here: this device's time, not the network's
            self.stats.record(StepTiming(sent - began + done - arrived, network_s, result.edge_compute_s), done)
            return tokens
        self.sampler.skip(self.batch)  # the edge sampled: this device keeps its generator's position
        self.stats.record(StepTiming(sent - began, network_s, result.edge_compute_s), arrived)
        if result.tokens is None or result.tokens.shape != (self.batch,):
            raise SeamError(f"the edge's step result carries no token for each of the {self.batch} sequences")
        return result.tokens.astype(np.int64)

    def _head_logits(self, result: StepResult) -> np.ndarray:
        """The logits [B, V] of the last position from the last layer's hidden states the edge returned."""
        expected = (self.batch, 1, self.client.artifact.manifest.dims.hidden_size)
        hidden = result.hidden_states
        if hidden is None or hidden.shape != expected or hidden.dtype != self.head.kv_dtype:
            raise SeamError(f"the edge's step result carries no {self.head.kv_dtype.name} hidden states of shape "
                            f"{list(expected)}; it does not serve private output as this version does")
        return self.client.pool.head_logits(hidden)[:, -1, :]

    def _coded(self, hidden: np.ndarray) -> dict[str, object]:
        """The Step fields that carry ``hidden``: impaired first when an impairment is set, then coded."""
        if self.codec not in self.client.codecs:
            raise SeamError(f"the edge offered no {self.codec!r} codec; choose one of {', '.join(self.client.codecs)}")
        if self.impairment is not None:
            hidden = self.impairment.apply(hidden.astype(np.float32), self.impairment_rng).astype(hidden.dtype)
        return to_message_fields(hidden, self.codec, self.client.artifact.manifest.dtype)

    def close(self) -> None:
        if self.open:
            self.open = False
            try:
                closed = self.client.socket.request(Close(self.session_id),
                                                    timeout_s=min(self.client.socket.config.timeout_s, 5))
                self.edge_stats = closed.stats if isinstance(closed, Closed) else {}
            except SeamError:
                pass  # the edge is gone or slow; its idle timeout reclaims the session

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
