"""The UE's Python API: connect to an edge server, open sessions, and stream tokens.

    with EdgeClient("artifacts/small-llama", "tcp://edge:5555") as client:
        with client.session(split=6) as session:
            for tokens in session.generate([prompt_ids], max_new_tokens=32):
                ...

The UE runs layers ``[0, split)`` with its own KV cache and sends only hidden states (never token ids, unless
split 0 is explicitly allowed); the edge runs the rest, samples, and returns the token with its compute time.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from seam.runtime.artifact import Artifact
from seam.runtime.codecs import CODECS, CODECS_CAPABILITY, negotiate, offered, to_message_fields
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool, SpanRunner
from seam.runtime.generation import left_pad, positions_from_mask
from seam.runtime.impairments import Impairment
from seam.runtime.migration import pack_kv, recompute, resplit, unpack_kv
from seam.runtime.protocol import (
    PROTOCOL_VERSION,
    Close,
    Closed,
    Error,
    Hello,
    Message,
    OpenSession,
    Ping,
    Pong,
    Resplit,
    Resplitted,
    SessionOpened,
    Step,
    StepResult,
    Welcome,
)
from seam.profiler.cost_model import Link, downlink_bytes, uplink_bytes
from seam.runtime.sampling import Sampler, SamplingParams
from seam.runtime.spans import Span
from seam.runtime.emulation import EmulatedLink
from seam.runtime.transport import TransportConfig, TransportTimeout, UeSocket
from seam.ue_client.link_estimate import LinkEstimator, Sample


def expect(reply: Message, kind: type) -> Message:
    if isinstance(reply, Error):
        raise SeamError(f"edge server: {reply.message}")
    if not isinstance(reply, kind):
        raise SeamError(f"edge server answered {reply.kind!r} where {kind.kind!r} was expected")
    return reply


@dataclass
class StepTiming:
    ue_s: float  # head blocks on the UE
    network_s: float  # round trip minus the edge's compute
    edge_s: float  # tail blocks and sampling on the edge


@dataclass
class GenerationStats:
    timings: list[StepTiming] = field(default_factory=list)  # prefill first
    started: float = 0.0
    arrivals: list[float] = field(default_factory=list)

    @property
    def time_to_first_token_s(self) -> float:
        return self.arrivals[0] - self.started

    @property
    def tokens_per_second(self) -> float:
        if len(self.arrivals) < 2:
            return float("nan")
        return (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])

    def decode_medians_ms(self) -> dict[str, float]:
        decode = self.timings[1:] or self.timings
        return {part: 1e3 * statistics.median(getattr(t, part) for t in decode) for part in ("ue_s", "network_s", "edge_s")}


class EdgeClient:
    def __init__(
        self,
        artifact: str | Path | Artifact,
        server: str,
        transport: TransportConfig | None = None,
        threads: int | None = None,
        curve_secret: Path | None = None,
        server_key: Path | None = None,
        link: Link | None = None,
        emulated: EmulatedLink | None = None,
        ue_slowdown: float = 1.0,
        codec: str = "fp32",
    ):
        if ue_slowdown < 1:
            raise SeamError(f"a UE slowdown of {ue_slowdown:g} would make this device faster; use 1 or more")
        self.ue_slowdown = ue_slowdown  # emulates a device this many times slower (bench and demo on one machine)
        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
        self.pool = SessionPool(self.artifact, threads)
        self._connection = (server, transport or TransportConfig(), curve_secret, server_key, emulated)
        self.socket = UeSocket(*self._connection)
        try:
            hello = Hello(PROTOCOL_VERSION, self.artifact.manifest.artifact_fingerprint,
                          ["sampling", CODECS_CAPABILITY + ",".join(CODECS)])
            started = time.perf_counter()
            self.welcome = expect(self.socket.request_with_retries(hello), Welcome)
            handshake_s = time.perf_counter() - started
        except BaseException:
            self.socket.close()
            raise
        # What sessions start from until their own traffic says better: a probed link profile, else the
        # handshake's round trip and a modest bandwidth that the first probes replace.
        self.link = link or Link(handshake_s, PRIOR_BYTES_PER_S, PRIOR_BYTES_PER_S)
        self.codecs = [name for name in CODECS if name in offered(self.welcome.capabilities)] or ["fp32"]
        self.codec, warning = negotiate(list(CODECS), self.codecs, codec)
        self.warnings = [warning] if warning else []  # for the caller to show

    def session(self, split: int, sampling: SamplingParams | None = None, allow_token_upload: bool = False,
                fallback_local: bool = False):
        return RemoteSession(self, split, sampling or SamplingParams(), allow_token_upload, fallback_local)

    def connect_again(self, timeout_s: float) -> UeSocket:
        """A second connection to the same edge, for a thread of its own (a socket serves one thread)."""
        server, transport, curve_secret, server_key, emulated = self._connection
        return UeSocket(server, replace(transport, timeout_s=timeout_s), curve_secret, server_key, emulated)

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Move:
    """One move of the split during a generation."""

    before_step: int
    from_split: int
    to_split: int
    sent_bytes: int  # KV cache, or hidden states to recompute it from, that crossed the link
    seconds: float
    reason: str = ""


T = TypeVar("T")
SplitPolicy = Callable[["RemoteSession", int], None]  # called before each step after the first; may move the split
PRIOR_BYTES_PER_S = 10e6 / 8  # 10 Mbit/s
PROBE_TRIES = 3  # sizes grow 8x a try: from 8 KiB to 512 KiB, enough for hundreds of Mbit/s


class RemoteSession:
    """One generation's sequences, layers [0, split) on this device and the rest on the edge.

    The split may move between steps (``move_split``, or a policy given to ``generate``); at split L this device
    runs every layer and samples itself, and the edge holds nothing until the split moves back.
    """

    def __init__(self, client: EdgeClient, split: int, sampling: SamplingParams, allow_token_upload: bool,
                 fallback_local: bool = False):
        self.client = client
        self.fallback_local = fallback_local  # if the edge stops answering, finish on this device
        self.num_layers = client.artifact.num_layers
        self.allow_token_upload = allow_token_upload
        self.client.artifact.check_split(split, self.allow_token_upload)
        self.split = split
        self.sampling = sampling
        self.sampler = Sampler(sampling)  # samples while this device holds every layer; travels with the split
        self.codec = client.codec  # how hidden states cross; may change between steps, to one the edge offered
        self.impairment: Impairment | None = None  # research: corrupts the hidden states at the cut before coding
        self.impairment_rng = np.random.default_rng(0)
        self.head = client.pool.runner(Span(0, split), keep_boundaries=True)
        self.session_id = uuid.uuid4().hex
        self.stats = GenerationStats()
        self.moves: list[Move] = []
        self.edge_stats: dict = {}  # the edge's own account of the session, filled in on close
        self.open = False
        self.edge_step = 0
        self.batch = self.past = self.max_length = 0
        self.sequence = self.mask = None  # the tokens so far and their mask, from which moved layers are rebuilt
        self.link = LinkEstimator(client.link)
        self.probes = 0
        self.step_probes: deque[tuple[float, float]] = deque(maxlen=5)  # (at, seconds) of step-sized pings

    def _request(self, message: Message, kind: type) -> Message:
        return self._exchange(message, kind, self.client.socket)[0]

    def _exchange(self, message: Message, kind: type, socket: UeSocket) -> tuple[Message, float]:
        """One request and its reply, with its network time (the round trip less the edge's compute); its bytes
        and network time feed the link estimate."""
        sent, received, started = socket.bytes_sent, socket.bytes_received, time.perf_counter()
        reply = expect(socket.request(message), kind)
        compute = reply.edge_compute_s if isinstance(reply, StepResult) else 0.0
        seconds = time.perf_counter() - started - compute
        self.link.observe(Sample(started, socket.bytes_sent - sent, socket.bytes_received - received, seconds))
        return reply, seconds

    def probe_link(self, socket: UeSocket | None = None, step_sized: bool = False,
                   directions: Sequence[str] = ("up", "down")) -> None:
        """Measures those of ``directions`` whose bandwidth estimate is stale with one ping each, sized to measure
        it, after an empty ping that pins the round trip the rates are measured against; with ``step_sized``,
        also a ping the size of a decode step."""
        socket = socket or self.client.socket
        stale = [direction for direction in self.link.stale(time.perf_counter()) if direction in directions]
        if stale:
            self._ping(socket, 0, 0)
        if step_sized:
            # What a decode step would see on the network right now, if the edge ran the tail.
            dims = self.client.artifact.manifest.dims
            up = uplink_bytes(1, self.batch, 1, dims.hidden_size, self.head.kv_dtype.itemsize)
            started = time.perf_counter()
            self.step_probes.append((started, self._ping(socket, up, downlink_bytes(self.batch))))
        for direction in stale:
            for _ in range(PROBE_TRIES):  # a probe too quick to measure the rate is followed by a larger one
                size = self.link.probe_bytes(direction)
                self._ping(socket, *((size, 0) if direction == "up" else (0, size)))
                if direction not in self.link.stale(time.perf_counter()):
                    break

    def _ping(self, socket: UeSocket, up: int, down: int) -> float:
        self.probes += 1
        payload = np.zeros(up, dtype=np.uint8) if up else None
        return self._exchange(Ping(self.probes, down, payload), Pong, socket)[1]

    def _open(self, kv: np.ndarray | None = None, hidden: np.ndarray | None = None) -> None:
        mask = self.mask[:, : self.past] if self.past else None  # the edge keeps the mask of the positions so far
        opening = OpenSession(self.session_id, self.split, self.batch, vars(self.sampling), self.max_length,
                              self.allow_token_upload, self.sampler.state, kv, hidden, mask)
        self._request(opening, SessionOpened)
        self.open = True
        self.edge_step = 0

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, policy: SplitPolicy | None = None
    ) -> Iterator[np.ndarray]:
        """Yields the next token of every prompt [B], step by step; ``policy(session, step)`` runs before every
        step after the first and may move the split."""
        manifest = self.client.artifact.manifest
        ids, mask = left_pad(prompts, manifest.tokenizer["pad_token_id"])
        positions = positions_from_mask(mask)
        self.batch, self.past, self.max_length = len(prompts), 0, ids.shape[1] + max_new_tokens
        self.head.reset(self.batch)
        self.stats = GenerationStats(started=time.perf_counter())
        prober = BackgroundProber(self) if policy is not None else None
        try:
            if self.split < self.num_layers:
                self._open()
            first, self.sequence, self.mask = ids, ids, mask
            for step in range(max_new_tokens):
                if step and policy is not None:
                    policy(self, step)
                try:
                    tokens = self._step(first, mask, positions)
                except TransportTimeout as lost:
                    if not self.fallback_local:
                        raise
                    tokens = self._finish_locally(self.sequence, mask, lost)
                # The state moves on before the token is handed out, so a caller may move the split right away.
                self.past = mask.shape[1]
                mask = np.concatenate([mask, np.ones((self.batch, 1), dtype=np.int64)], axis=1)
                positions = positions[:, -1:] + 1
                first = tokens[:, None]
                self.sequence, self.mask = np.concatenate([self.sequence, first], axis=1), mask
                yield tokens
        finally:
            if prober is not None:
                prober.close()
            self.close()

    def kept_boundary(self, cut: int) -> bool:
        """Whether this device holds the hidden states at ``cut`` for every position so far (see SpanRunner)."""
        return bool(self.head.boundaries.get(cut))

    def _rebuild(self, layers: Span) -> SpanRunner:
        """A runner whose cache holds ``layers`` for every position so far, recomputed here in one pass from the
        hidden states at their start if this device kept them, else from the tokens."""
        mask = self.mask[:, : self.past]
        if self.kept_boundary(layers.start):
            start, first = layers.start, self.head.boundary(layers.start)
        else:
            start, first = 0, self.sequence[:, : self.past]
        pool = self.client.pool
        return self._compute(lambda: recompute(pool, Span(start, layers.end), first, mask, keep_boundaries=True))

    def _finish_locally(self, sequence: np.ndarray, mask: np.ndarray, lost: TransportTimeout) -> np.ndarray:
        """The edge stopped answering and its layers' cache went with it: this device takes every layer, rebuilds
        their cache from the whole sequence so far in one pass, and samples the step that was lost.

        Greedy output continues as before; a sampled one continues with this device's generator, since the edge's
        went down with it."""
        started, old = time.perf_counter(), self.split
        self.open = False
        self.head = self.client.pool.runner(Span(0, self.num_layers), keep_boundaries=True)
        self.head.reset(self.batch)
        logits = self._compute(lambda: self.head.run(sequence, mask, positions_from_mask(mask)))[:, -1, :]
        tokens = self.sampler(logits)
        arrived = time.perf_counter()
        self.split = self.num_layers
        self.stats.timings.append(StepTiming(arrived - started, 0.0, 0.0))
        self.stats.arrivals.append(arrived)
        self.moves.append(Move(len(self.stats.timings) - 1, old, self.split, 0, arrived - started,
                               f"the edge stopped answering ({lost}); finishing on this device"))
        return tokens

    def _compute(self, run: Callable[[], T]) -> T:
        """Runs UE compute; an emulated slower UE then idles for the extra time it would have taken."""
        started = time.perf_counter()
        output = run()
        if self.client.ue_slowdown > 1:
            time.sleep((self.client.ue_slowdown - 1) * (time.perf_counter() - started))
        return output

    def _step(self, first: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        began = time.perf_counter()
        output = self._compute(lambda: self.head.run(first, mask, positions))
        if self.split == self.num_layers:
            tokens = self.sampler(output[:, -1, :])
            arrived = time.perf_counter()
            timing = StepTiming(arrived - began, 0.0, 0.0)
        else:
            carried = {"input_ids": output} if self.split == 0 else self._coded(output)
            unseen = mask[:, mask.shape[1] - positions.shape[1]:]  # the edge holds the columns before these
            sent = time.perf_counter()
            result = self._request(Step(self.session_id, self.edge_step, unseen, positions, **carried), StepResult)
            arrived = time.perf_counter()
            self.edge_step += 1
            timing = StepTiming(sent - began, max(arrived - sent - result.edge_compute_s, 0.0), result.edge_compute_s)
            tokens = result.tokens.astype(np.int64)
        self.stats.timings.append(timing)
        self.stats.arrivals.append(arrived)
        return tokens

    def _coded(self, hidden: np.ndarray) -> dict[str, object]:
        """The Step fields that carry ``hidden``: impaired first when an impairment is set, then coded."""
        if self.codec not in self.client.codecs:
            raise SeamError(f"the edge offered no {self.codec!r} codec; choose one of {', '.join(self.client.codecs)}")
        if self.impairment is not None:
            hidden = self.impairment.apply(hidden.astype(np.float32), self.impairment_rng).astype(hidden.dtype)
        return to_message_fields(hidden, self.codec, self.client.artifact.manifest.dtype)

    def move_split(self, split: int, reason: str = "", rebuild: bool = False) -> None:
        """Moves the split between two steps; the layers that change side take their KV cache along, so the
        tokens that follow are the ones the old split would have produced.

        With ``rebuild``, the side that takes layers over recomputes their cache instead of receiving it: this
        device from the hidden states it kept at the old split (or from the tokens), the edge from the hidden
        states at the new split, which this device sends. Either beats carrying the cache on a slow link."""
        old, last = self.split, self.num_layers
        if split == old:
            return
        self.client.artifact.check_split(split, self.allow_token_upload)
        if rebuild and split < old and not self.kept_boundary(split):
            raise SeamError(f"this device kept no hidden states at layer {split} to rebuild from; move the cache")
        started = time.perf_counter()
        rebuilt: SpanRunner | None = None
        incoming: dict[str, np.ndarray] = {}
        if split < old:  # the edge takes layers [split, old) over
            kv, hidden = (None, self.head.boundary(split)) if rebuild else (pack_kv(self.head.cache, Span(split, old)), None)
            if old == last:
                self.split = split  # the session opens at its new split
                try:
                    self._open(kv, hidden)
                except BaseException:
                    self.split = old
                    raise
            else:
                mask = self.mask[:, : self.past] if rebuild else None
                self._request(Resplit(self.session_id, self.edge_step, split, kv=kv, hidden_states=hidden,
                                      attention_mask=mask), Resplitted)
            moved = (kv if kv is not None else hidden).nbytes
        else:  # this device takes layers [old, split) over
            reply = self._request(Resplit(self.session_id, self.edge_step, split, send_kv=not rebuild), Resplitted)
            if rebuild:
                rebuilt, moved = self._rebuild(Span(old, split)), 0
                incoming = rebuilt.cache
            else:
                incoming = unpack_kv(reply.kv, Span(old, split), self.head, self.batch, self.past)
                moved = reply.kv.nbytes
            if split == last:
                self.sampler.state = reply.sampler_state
                self.open = False  # the edge closed the session when it handed the last layer over
        self.head = resplit(self.client.pool, self.head, Span(0, split), incoming,
                            rebuilt.boundaries if rebuilt is not None else None)
        self.split = split
        self.moves.append(Move(len(self.stats.timings), old, split, moved, time.perf_counter() - started, reason))

    def close(self) -> None:
        if self.open:
            self.open = False
            try:
                closed = self.client.socket.request(Close(self.session_id), timeout_s=min(self.client.socket.config.timeout_s, 5))
                self.edge_stats = closed.stats if isinstance(closed, Closed) else {}
            except SeamError:
                pass  # the edge is gone or slow; its idle timeout reclaims the session

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BackgroundProber:
    """Keeps the link estimate fresh while the UE generates alone and sends nothing else, so that it sees the
    link come back; from a thread with a connection of its own, so that a probe never holds up a step.

    It stays quiet while the edge has layers: a probe sharing the link with steps would queue them behind it,
    and both would measure less than the link gives. Steps measure the link themselves then."""

    def __init__(self, session: RemoteSession, period_s: float = 0.25, timeout_s: float = 5.0):
        self.session = session
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.socket = session.client.connect_again(timeout_s)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="seam-link-prober", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.session.split == self.session.num_layers:
                    # Only the uplink: from here every move sends layers to the edge, and a probe of a
                    # collapsed downlink would hold the next step-sized ping back for seconds.
                    self.session.probe_link(self.socket, step_sized=True, directions=("up",))
            except SeamError:
                pass  # a lost edge shows in the steps themselves; the estimate just stays as it was
            self.stopping.wait(self.period_s)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(self.timeout_s + 1)
        if not self.thread.is_alive():  # a socket still in use by a stuck probe is left to the process exit
            self.socket.close()
