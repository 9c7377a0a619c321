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
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.artifact import Artifact
from runtime.errors import SeamError
from runtime.executor import SessionPool
from runtime.generation import left_pad, positions_from_mask
from runtime.protocol import (
    PROTOCOL_VERSION,
    Close,
    Closed,
    Error,
    Hello,
    Message,
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
    Welcome,
)
from runtime.sampling import SamplingParams
from runtime.spans import Span
from runtime.transport import TransportConfig, UeSocket


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
    ):
        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
        self.pool = SessionPool(self.artifact, threads)
        self.socket = UeSocket(server, transport or TransportConfig(), curve_secret, server_key)
        try:
            hello = Hello(PROTOCOL_VERSION, self.artifact.manifest.artifact_fingerprint, ["sampling"])
            self.welcome = expect(self.socket.request_with_retries(hello), Welcome)
        except BaseException:
            self.socket.close()
            raise

    def session(self, split: int, sampling: SamplingParams | None = None, allow_token_upload: bool = False):
        return RemoteSession(self, split, sampling or SamplingParams(), allow_token_upload)

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteSession:
    def __init__(self, client: EdgeClient, split: int, sampling: SamplingParams, allow_token_upload: bool):
        if split not in client.artifact.split_points:
            raise SeamError(f"split {split} is not a split point; choose one of {client.artifact.split_points}")
        if split == client.artifact.num_layers:
            raise SeamError(f"split {split} keeps every layer on this device, leaving the edge nothing to run; "
                            "choose a smaller split")
        if split == 0 and not allow_token_upload:
            raise SeamError("split 0 sends raw token ids to the edge; pass --allow-token-upload to permit it")
        self.client = client
        self.split = split
        self.sampling = sampling
        self.allow_token_upload = allow_token_upload
        self.head = client.pool.runner(Span(0, split))
        self.session_id = uuid.uuid4().hex
        self.stats = GenerationStats()
        self.edge_stats: dict = {}  # the edge's own account of the session, filled in on close
        self.open = False

    def _request(self, message: Message, kind: type) -> Message:
        return expect(self.client.socket.request(message), kind)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Iterator[np.ndarray]:
        """Yields the next token of every prompt [B], step by step."""
        manifest = self.client.artifact.manifest
        ids, mask = left_pad(prompts, manifest.tokenizer["pad_token_id"])
        positions = positions_from_mask(mask)
        self.head.reset(len(prompts))
        self.stats = GenerationStats(started=time.perf_counter())
        self._request(
            OpenSession(
                self.session_id,
                self.split,
                len(prompts),
                vars(self.sampling),
                ids.shape[1] + max_new_tokens,
                self.allow_token_upload,
            ),
            SessionOpened,
        )
        self.open = True
        try:
            first = ids
            for step in range(max_new_tokens):
                began = time.perf_counter()
                boundary = self.head.run(first, mask, positions)
                sent = time.perf_counter()
                carried = {"input_ids": boundary} if self.split == 0 else {"hidden_states": boundary}
                result = self._request(Step(self.session_id, step, mask, positions, **carried), StepResult)
                arrived = time.perf_counter()
                self.stats.timings.append(
                    StepTiming(sent - began, max(arrived - sent - result.edge_compute_s, 0.0), result.edge_compute_s)
                )
                self.stats.arrivals.append(arrived)
                tokens = result.tokens.astype(np.int64)
                yield tokens
                mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
                positions = positions[:, -1:] + 1
                first = tokens[:, None]
        finally:
            self.close()

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
