"""The link from one stage of an inference pipeline to the next: this edge runs layers ``[split, end)`` of each
session and hands the hidden states at ``end`` to the next stage (an ``edge_server`` holding the same artifact,
itself perhaps a stage) exactly as a UE hands its own over; the token that the last stage samples comes back
through here to the UE. Each session here has one on the next stage, opened, moved and closed with it.

Steps that ran here as one batch go on as one burst, so the next stage batches them too. A next stage that does
not answer within the timeout ends the sessions that were waiting on it with ``StageLost``, which the UE reads as
a lost edge.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from seam.edge_server.compute import Onward
from seam.edge_server.sessions import SessionKey
from seam.edge_server.validation import CheckedStep
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.protocol import (PROTOCOL_VERSION, Close, Closed, Hello, OpenSession, Resplit, Resplitted,
                                   SessionOpened, Step, StepResult, Welcome)
from seam.runtime.replies import expect
from seam.runtime.transport import TransportConfig, TransportTimeout, UeSocket

CLOSE_TIMEOUT_S = 1.0  # a close is a courtesy: the next stage's idle timeout reclaims what it misses


def stage_end(artifact: Artifact, until: int | None, next_address: str | None) -> int:
    """The layer an edge's spans end at: the last, or ``until`` when a next stage at ``next_address`` runs the
    rest; a stage without a next one, or a next one without a stage, is refused in one line."""
    last, cuts = artifact.num_layers, artifact.manifest.cuts
    if until is None or until == last:
        if next_address is not None:
            raise SeamError("--next needs --until, the layer where the next stage begins")
        return last
    if until not in cuts:
        raise SeamError(f"--until {until} is not a cut of this artifact; choose one of {list(cuts)}")
    if next_address is None:
        raise SeamError(f"--until {until} leaves layers [{until}, {last}) to a next stage: give its address with "
                        "--next tcp://HOST:PORT")
    return until


class StageLost(SeamError):
    """The next stage of the pipeline did not answer within the timeout."""


class NextStage:
    def __init__(self, address: str, fingerprint: str, end: int, transport: TransportConfig,
                 curve_secret: Path | None = None, server_key: Path | None = None):
        self.address, self.end, self.timeout_s = address, end, transport.timeout_s
        if server_key is not None and curve_secret is None:
            raise SeamError("--next-server-key needs this server's own --curve-secret, its key at the next stage")
        # This server's key secures its own UEs too; the link on is secured only when the next stage's key is given.
        self.socket = UeSocket(address, transport, curve_secret if server_key else None, server_key)
        try:
            try:
                welcome = expect(self.socket.request_with_retries(Hello(PROTOCOL_VERSION, fingerprint)), Welcome)
            except TransportTimeout:
                raise SeamError(f"the next stage at {address} did not answer within {self.timeout_s:g} s; start it "
                                "first, or check --next") from None
            except SeamError as error:
                raise SeamError(f"the next stage at {address}: {error}") from None
            if end not in welcome.split_points or end == welcome.split_points[-1]:
                raise SeamError(f"the next stage at {address} serves splits {welcome.split_points[:-1]}, not {end}; "
                                "start it on this artifact, or give --until one of those")
        except BaseException:
            self.socket.close()
            raise
        # This edge's session -> its twin's name on the next stage. The twin opens with the session and steps
        # with it, so it expects the session's own step numbers.
        self.ids: dict[SessionKey, str] = {}
        self.numbers = itertools.count()

    def _expect(self, send, kind: type):
        try:
            return expect(send(), kind)
        except TransportTimeout:
            raise self.lost() from None

    def lost(self) -> StageLost:
        return StageLost(f"the next pipeline stage at {self.address} did not answer within {self.timeout_s:g} s; "
                         "the session there is lost: check that stage, then start the session again")

    def open(self, key: SessionKey, request: OpenSession, onward: Onward) -> None:
        """Opens ``key``'s twin on the next stage at this stage's end, with the past the UE brought."""
        name = f"s{next(self.numbers)}"
        mask = request.attention_mask if onward.kv is not None or onward.hidden_states is not None else None
        twin = OpenSession(name, self.end, request.batch, request.sampling, request.max_length, False,
                           request.sampler_state, onward.kv, onward.hidden_states, mask)
        self._expect(lambda: self.socket.request(twin), SessionOpened)
        self.ids[key] = name

    def forward(self, group: list[tuple[SessionKey, int, CheckedStep]],
                outputs: list[np.ndarray]) -> list[np.ndarray | Exception]:
        """Sends each session's hidden states of its step (key, step number, checked step) on, all before waiting
        for any, and returns each one's tokens [B], or the error its twin answered with."""
        steps = [Step(self.ids[key], number, checked.attention_mask[:, -checked.new:], checked.position_ids,
                      hidden_states=output) for (key, number, checked), output in zip(group, outputs)]
        try:
            replies = self.socket.request_all(steps, self.timeout_s)
        except TransportTimeout:
            raise self.lost() from None
        by_name = {getattr(reply, "session_id", ""): reply for reply in replies}
        results: list[np.ndarray | Exception] = []
        for step in steps:
            try:
                reply = by_name.get(step.session_id)
                if reply is None:
                    raise SeamError(f"the next pipeline stage at {self.address} answered without this session")
                results.append(expect(reply, StepResult).tokens)
            except SeamError as error:
                results.append(error)
        return results

    def hand_over(self, key: SessionKey, request: Resplit) -> Resplitted:
        """Moves ``key``'s twin to the last layer: the next stage hands its layers' cache (when asked for) and its
        sampler over and closes its twin."""
        reply = self._expect(lambda: self.socket.request(Resplit(self.ids[key], request.step, request.split,
                                                                 request.send_kv)), Resplitted)
        self.forget(key)
        return reply

    def close(self, key: SessionKey) -> dict:
        """Closes ``key``'s twin, if it still has one; returns its stats (none when the stage did not answer)."""
        if key not in self.ids:
            return {}
        name = self.ids[key]
        self.forget(key)
        try:
            closed = self.socket.request(Close(name), timeout_s=min(self.timeout_s, CLOSE_TIMEOUT_S))
        except SeamError:
            return {}
        return closed.stats if isinstance(closed, Closed) else {}

    def forget(self, key: SessionKey) -> None:
        self.ids.pop(key, None)

    def close_link(self) -> None:
        self.socket.close()
