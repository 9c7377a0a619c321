"""The edge server: serves many UEs at once, each session running the tail blocks of its own split.

One thread owns the socket and the sessions. Every request is checked before it touches a KV cache; a bad
request gets an Error reply and the server carries on serving every other session.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seam.edge_server.sessions import EdgeSession, SessionTable
from seam.runtime.artifact import NUMPY_DTYPES, Artifact
from seam.runtime.codecs import CODECS, CODECS_CAPABILITY, EncodedActivation
from seam.runtime.codecs import decode as decode_activation
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool, run_together
from seam.runtime.migration import check_boundary, pack_kv, recompute, resplit, unpack_kv
from seam.runtime.protocol import (
    PROTOCOL_VERSION,
    TRAINING_MESSAGES,
    Close,
    Closed,
    Error,
    Hello,
    Message,
    OpenSession,
    Ping,
    Pong,
    ProtocolError,
    Resplit,
    Resplitted,
    SessionOpened,
    Step,
    StepResult,
    Welcome,
    decode,
)
from seam.runtime.sampling import Sampler, SamplingParams
from seam.runtime.spans import Span
from seam.runtime.transport import EdgeSocket, TransportConfig

log = logging.getLogger("edge_server")


@dataclass
class EdgeConfig:
    artifact: Path  # exported artifact directory
    bind: str = "tcp://0.0.0.0:5555"  # ZeroMQ address to listen on
    device: str = "cpu"  # 'cpu' or 'cuda'
    threads: int | None = None  # onnxruntime intra-op threads; None = physical cores
    max_sessions: int = 64  # open sessions before the least recently used is evicted
    kv_budget_mb: float = 4096.0  # KV cache reserved across sessions, MiB
    idle_timeout_s: float = 300.0  # a session unused this long is closed
    max_batch: int = 64  # sequences per session, and per batched decode run
    batch_decode: bool = True  # run the decode steps of sessions that are ready together as one batch
    max_burst: int = 256  # queued requests taken at once
    max_length: int = 4096  # prompt plus generated tokens per sequence
    curve_secret: Path | None = None  # the server's NAME.key_secret; enables CURVE
    allowed_keys: Path | None = None  # directory of allowed UE public keys (*.key)
    log_messages: Path | None = None  # append one JSON line per received message header (debugging, audits)
    codecs: tuple[str, ...] = tuple(CODECS)  # activation codecs offered to UEs (fp32 always)
    train: bool = False  # also serve split fine-tuning (needs torch, transformers and peft)
    round_timeout_s: float = 60.0  # a federated round closes without the UEs that have not uploaded by then
    transport: TransportConfig = None

    def __post_init__(self):
        self.transport = self.transport or TransportConfig()


class EdgeServer:
    def __init__(self, config: EdgeConfig):
        self.config = config
        self.artifact = Artifact.open(config.artifact)
        self.manifest = self.artifact.manifest
        self.pool = SessionPool(self.artifact, config.threads, config.device)
        self.offered_codecs = [name for name in CODECS if name == "fp32" or name in config.codecs]
        self.pool.preload(Span(0, self.artifact.num_layers))
        self.table = SessionTable(config.max_sessions, int(config.kv_budget_mb * 2**20), config.idle_timeout_s)
        self.training = None
        if config.train:
            try:
                from seam.finetune.edge import TrainingService
            except ModuleNotFoundError as error:
                raise SeamError(f"--train needs {error.name}; install it with: pip install 'seam[export,finetune]'") \
                    from None
            self.training = TrainingService(self.artifact, config.threads, config.idle_timeout_s,
                                            config.round_timeout_s)
        self.welcomed: set[bytes] = set()
        self.hidden_dtype = np.dtype(NUMPY_DTYPES[self.manifest.dtype])
        self.socket = EdgeSocket(config.bind, config.transport, config.curve_secret, config.allowed_keys)
        self.running = True
        self.message_log = open(config.log_messages, "a") if config.log_messages else None

    @property
    def address(self) -> str:
        return self.socket.address

    def serve(self) -> None:
        try:
            while self.running:
                received = self.socket.receive(timeout_s=0.2)
                for session in self.table.idle(time.monotonic()):
                    self._log_close(session, "idle timeout")
                if received is None:
                    continue
                # Requests that queued up while the last step ran are handled together, so their decode steps
                # can share one batched run.
                burst = [received]
                while len(burst) < self.config.max_burst and (more := self.socket.receive(timeout_s=0)) is not None:
                    burst.append(more)
                for peer, reply in self.handle_burst(burst):
                    self.socket.send(peer, reply)
        finally:
            for session in list(self.table.sessions.values()):
                self._log_close(self.table.remove(session.key), "server shutdown")
            self.socket.close()
            if self.message_log:
                self.message_log.close()

    def stop(self, *_) -> None:
        self.running = False

    def handle_burst(self, burst: list[tuple[bytes, list]]) -> list[tuple[bytes, Message]]:
        """Replies to each (peer, frames) request, in order per session; ready decode steps run batched."""
        replies, ready, waiting = [], [], set()
        for peer, frames in burst:
            message = self._decode(frames)
            session = self._ready_decode_step(peer, message) if isinstance(message, Step) else None
            if session is None or session.key in waiting or not self.config.batch_decode:
                replies += self._run_ready(ready)  # earlier steps first: a close or a second step may depend on them
                ready, waiting = [], set()
            if session is not None and self.config.batch_decode:
                ready.append((session, message))
                waiting.add(session.key)
            else:
                replies.append((peer, self.handle(peer, message)))
        return replies + self._run_ready(ready)

    def handle(self, peer: bytes, message: Message | Error) -> Message:
        if isinstance(message, Error):
            return message
        session_id = getattr(message, "session_id", "")
        try:
            if isinstance(message, Hello):
                return self._hello(peer, message)
            if isinstance(message, Ping):  # needs no artifact, so a link can be probed before choosing one
                return self._pong(message)
            if peer not in self.welcomed:
                return Error("no_handshake", "send hello before anything else", session_id)
            if isinstance(message, TRAINING_MESSAGES) or (
                    isinstance(message, Close) and self.training and self.training.owns(peer, session_id)):
                if self.training is None:
                    raise SeamError("this edge_server does not train; start it with --train")
                return self.training.handle(peer, message)
            if isinstance(message, OpenSession):
                return self._open(peer, message)
            if isinstance(message, Step):
                return self._step(peer, message)
            if isinstance(message, Resplit):
                return self._resplit(peer, message)
            if isinstance(message, Close):
                return self._close(peer, message)
            return Error("bad_message", f"a UE does not send {message.kind!r} messages", session_id)
        except SeamError as error:
            return Error("rejected", str(error), session_id)
        except Exception as error:  # a fault in one session must not take the others down
            log.exception("internal error in session %r", session_id)
            if (peer, session_id) in self.table.sessions:
                self.table.remove((peer, session_id), "closed after an internal error")
            return Error("internal", f"{type(error).__name__}: {error}; the session was closed", session_id)

    def _decode(self, frames: list) -> Message | Error:
        try:
            message = decode(frames, self.config.transport.max_message_bytes)
        except ProtocolError as error:
            return Error("bad_message", f"{error}")
        self._audit(message)
        return message

    def _ready_decode_step(self, peer: bytes, step: Step) -> EdgeSession | None:
        """The session of a well-formed single-position step that may join a batch; None sends it the slow way."""
        if peer not in self.welcomed:
            return None
        session = self.table.sessions.get((peer, step.session_id))
        if session is None:
            return None
        try:
            first = self._check_step(session, step)
        except SeamError:
            return None  # handled alone, which replies with the same check's error
        return session if first.shape[1] == 1 else None

    def _run_ready(self, ready: list[tuple[EdgeSession, Step]]) -> list[tuple[bytes, Message]]:
        """Runs checked decode steps, one batched run per split, and replies to each."""
        replies = []
        by_split: dict[int, list[tuple[EdgeSession, Step]]] = {}
        for session, step in ready:
            by_split.setdefault(session.split, []).append((session, step))
        for group in by_split.values():
            chunk, rows = [], 0
            for session, step in group:
                if chunk and rows + session.batch > self.config.max_batch:
                    replies += self._step_together(chunk)
                    chunk, rows = [], 0
                chunk.append((session, step))
                rows += session.batch
            if chunk:
                replies += self._step_together(chunk)
        return replies

    def _step_together(self, group: list[tuple[EdgeSession, Step]]) -> list[tuple[bytes, Message]]:
        if len(group) == 1:
            session, step = group[0]
            return [(session.key[0], self.handle(session.key[0], step))]
        now = time.monotonic()
        for session, _ in group:
            self.table.get(session.key, now)  # marks it used
        started = time.perf_counter()
        try:
            outputs = run_together(
                [session.runner for session, _ in group],
                [self._first_input(step) for _, step in group],
                [step.attention_mask for _, step in group],
                [step.position_ids for _, step in group],
            )
            tokens = [session.sampler(output[:, -1, :]) for (session, _), output in zip(group, outputs)]
        except Exception as error:  # a fault in the batch closes its sessions, never the server
            log.exception("internal error in a batch of %d sessions", len(group))
            replies = []
            for session, step in group:
                self.table.remove(session.key, "closed after an internal error")
                reply = Error("internal", f"{type(error).__name__}: {error}; the session was closed", step.session_id)
                replies.append((session.key[0], reply))
            return replies
        compute = time.perf_counter() - started  # every session in the batch waited this long
        for session, _ in group:
            session.batched_steps += 1
        return [
            (session.key[0], self._advance(session, step, compute, session_tokens))
            for (session, step), session_tokens in zip(group, tokens)
        ]

    def _hello(self, peer: bytes, hello: Hello) -> Message:
        if hello.protocol_version != PROTOCOL_VERSION:
            return Error(
                "version_mismatch",
                f"the UE speaks protocol {hello.protocol_version}, this server {PROTOCOL_VERSION}; update the older side",
            )
        if hello.artifact_fingerprint != self.manifest.artifact_fingerprint:
            return Error(
                "artifact_mismatch",
                "the UE and the server hold different artifacts (fingerprints differ); copy the server's artifact "
                "to the UE or export both from the same model with the same arguments",
            )
        self.welcomed.add(peer)
        return Welcome(
            PROTOCOL_VERSION,
            self.manifest.artifact_fingerprint,
            self.artifact.split_points,
            self.config.transport.max_message_bytes,
            ["sampling", CODECS_CAPABILITY + ",".join(self.offered_codecs)],
        )

    def _pong(self, ping: Ping) -> Message:
        limit = self.config.transport.max_message_bytes - (1 << 12)
        if not 0 <= ping.reply_bytes <= limit:
            raise SeamError(f"reply_bytes {ping.reply_bytes} is outside 0..{limit}")
        payload = np.zeros(ping.reply_bytes, dtype=np.uint8) if ping.reply_bytes else None
        return Pong(ping.nonce, payload)

    def _open(self, peer: bytes, request: OpenSession) -> Message:
        config = self.config
        self._check_split(request.split, request.allow_token_upload)
        if request.split == self.artifact.num_layers:
            raise SeamError(f"split {request.split} leaves the edge no layers; the UE should generate locally")
        if not 1 <= request.batch <= config.max_batch:
            raise SeamError(f"batch {request.batch} is outside 1..{config.max_batch}")
        if not 1 <= request.max_length <= config.max_length:
            raise SeamError(f"max_length {request.max_length} is outside 1..{config.max_length}")
        sampler = Sampler(SamplingParams.from_dict(request.sampling))
        if request.sampler_state:
            sampler.state = request.sampler_state
        span = Span(request.split, self.artifact.num_layers)
        runner = self.pool.runner(span)
        runner.reset(request.batch)
        if request.kv is not None:  # sequences the UE has been running alone until now
            past = request.kv.shape[2] if request.kv.ndim == 4 else -1
            if not 0 < past < request.max_length:
                raise SeamError(f"the KV cache must hold between 1 and max_length - 1 positions, got {past}")
            runner.cache = unpack_kv(request.kv, span, runner, request.batch, past)
        elif request.hidden_states is not None:  # the same, with the cache to recompute here
            self._check_boundary(request, request.batch, None)
            if request.attention_mask.shape[1] >= request.max_length:
                raise SeamError("the recomputed cache must hold at most max_length - 1 positions")
            runner = recompute(self.pool, span, request.hidden_states, request.attention_mask)
        key = (peer, request.session_id)
        kv_bytes = self._kv_bytes(request.batch, request.max_length, request.split)
        for victim in self.table.admit(key, kv_bytes):
            self._log_close(victim, "evicted for room")
        now = time.monotonic()
        self.table.add(
            EdgeSession(key, runner, sampler, request.split, request.batch, request.max_length, kv_bytes, now, now,
                        request.allow_token_upload)
        )
        log.info("open  %s peer=%s split=%d batch=%d max_length=%d sessions=%d", request.session_id, peer.hex()[:8],
                 request.split, request.batch, request.max_length, len(self.table.sessions))
        return SessionOpened(request.session_id)

    def _check_boundary(self, request: OpenSession | Resplit, batch: int, past: int | None) -> None:
        if request.kv is not None:
            raise SeamError("send the moved layers' KV cache or the hidden states to recompute it from, not both")
        if request.split == 0:
            raise SeamError("a cache recomputed at split 0 would need the token ids; send the KV cache instead")
        check_boundary(request.hidden_states, request.attention_mask, batch, past, self.manifest.dims.hidden_size,
                       self.hidden_dtype)

    def _kv_bytes(self, batch: int, max_length: int, split: int) -> int:
        """KV reserved for a session: its full length on every edge layer, so admission never over-commits."""
        return batch * max_length * (self.artifact.num_layers - split) * self.manifest.kv_bytes_per_token_per_layer

    def _check_split(self, split: int, allow_token_upload: bool) -> None:
        if split not in self.artifact.split_points:
            raise SeamError(f"split {split} is not a split point; choose one of {self.artifact.split_points}")
        if split == 0 and not allow_token_upload:
            raise SeamError("split 0 would send raw token ids to the edge; the UE must allow token upload explicitly")

    def _resplit(self, peer: bytes, request: Resplit) -> Message:
        """Moves a session's split; the edge keeps serving it from the next step, or hands it over at split L."""
        session = self.table.get((peer, request.session_id), time.monotonic())
        old, new, last = session.split, request.split, self.artifact.num_layers
        if request.step != session.next_step:
            raise SeamError(f"a resplit before step {request.step} arrived, expected one before step {session.next_step}")
        self._check_split(new, session.allow_token_upload)
        if new == old:
            raise SeamError(f"the session already runs at split {new}")
        runner, past = session.runner, session.runner.past_length
        if new < old:  # the edge takes layers [new, old) over, with their cache or what to recompute it from
            recomputing = request.hidden_states is not None
            if recomputing:
                self._check_boundary(request, session.batch, past)
            else:
                incoming = unpack_kv(request.kv, Span(new, old), runner, session.batch, past)
            self.table.reserve(session, self._kv_bytes(session.batch, session.max_length, new))
            if recomputing:  # only once the move is known to fit
                incoming = recompute(self.pool, Span(new, old), request.hidden_states, request.attention_mask).cache
            outgoing, sampler_state = None, {}
        else:  # the UE takes layers [old, new) over
            if request.kv is not None or request.hidden_states is not None:
                raise SeamError(f"moving the split from {old} to {new} hands layers to the UE: send no cache with it")
            incoming = {}
            outgoing = pack_kv(runner.cache, Span(old, new)) if request.send_kv else None
            sampler_state = session.sampler.state if new == last else {}
            session.kv_bytes = self._kv_bytes(session.batch, session.max_length, new)
        session.moves += 1
        log.info("move  %s peer=%s split %d -> %d at past %d", request.session_id, peer.hex()[:8], old, new, past)
        if new == last:  # nothing left to run here: the UE generates alone from now on
            self._log_close(self.table.remove(session.key), "moved to the UE")
        else:
            session.runner = resplit(self.pool, runner, Span(new, last), incoming)
            session.split = new
        return Resplitted(request.session_id, new, sampler_state, outgoing)

    def _check_step(self, session: EdgeSession, step: Step) -> np.ndarray:
        batch, past = session.batch, session.runner.past_length
        if step.step != session.next_step:
            raise SeamError(f"step {step.step} arrived, expected step {session.next_step}")
        if session.split == 0:
            first, name, dtype = step.input_ids, "input_ids", np.dtype(np.int64)
            if step.hidden_states is not None:
                raise SeamError("a split-0 session sends input_ids, not hidden_states")
        else:
            if step.input_ids is not None:
                raise SeamError("token ids are refused: this session's UE runs the first layers itself")
            if step.codec:
                self._decode_activation(step, batch)
            first, name, dtype = step.hidden_states, "hidden_states", self.hidden_dtype
        if first is None:
            raise SeamError(f"step carries no {name}")
        new = first.shape[1] if first.ndim >= 2 else -1
        expected = (batch, new, self.manifest.dims.hidden_size) if session.split else (batch, new)
        if first.shape != expected or new < 1 or first.dtype != dtype:
            raise SeamError(f"{name} must be {dtype.name} of shape {list(expected)}, got {first.dtype.name} {list(first.shape)}")
        mask = step.attention_mask
        if past and mask.shape == (batch, new) and mask.dtype == np.int64:  # the new columns only
            if session.mask is None or session.mask.shape[1] != past:
                raise SeamError(f"attention_mask covers the {new} new positions only, and this session holds no "
                                f"mask of its {past} past ones; send the whole mask")
            step.attention_mask = np.concatenate([session.mask, mask], axis=1)  # in place: a batch checks twice
        elif mask.shape != (batch, past + new) or mask.dtype != np.int64:
            raise SeamError(f"attention_mask must be int64 of shape [{batch}, {past + new}], or [{batch}, {new}] "
                            "for the new positions alone")
        if step.position_ids.shape != (batch, new) or step.position_ids.dtype != np.int64:
            raise SeamError(f"position_ids must be int64 of shape [{batch}, {new}]")
        if past + new > session.max_length:
            raise SeamError(f"the session would reach {past + new} tokens, beyond its max_length {session.max_length}")
        return first

    def _decode_activation(self, step: Step, batch: int) -> None:
        """Decodes a coded activation into the artifact's dtype in place, once: the batched path looks at a
        step twice."""
        if step.codec not in self.offered_codecs:
            raise SeamError(f"activation codec {step.codec!r} is not one this server offered "
                            f"({', '.join(self.offered_codecs)})")
        if step.hidden_states is None or step.position_ids.ndim != 2:
            raise SeamError(f"a step coded with {step.codec} carries no hidden_states or malformed position_ids")
        arrays = {"data": step.hidden_states}
        if step.hidden_scale is not None:
            arrays["scale"] = step.hidden_scale
        shape = (batch, step.position_ids.shape[1], self.manifest.dims.hidden_size)
        decoded = decode_activation(EncodedActivation(step.codec, shape, arrays))
        step.hidden_states, step.hidden_scale, step.codec = decoded.astype(self.hidden_dtype, copy=False), None, ""

    def _step(self, peer: bytes, step: Step) -> Message:
        session = self.table.get((peer, step.session_id), time.monotonic())
        first = self._check_step(session, step)
        started = time.perf_counter()
        logits = session.runner.run(first, step.attention_mask, step.position_ids)[:, -1, :]  # [B, V]
        tokens = session.sampler(logits)
        return self._advance(session, step, time.perf_counter() - started, tokens)

    @staticmethod
    def _first_input(step: Step) -> np.ndarray:
        return step.input_ids if step.hidden_states is None else step.hidden_states

    @staticmethod
    def _advance(session: EdgeSession, step: Step, compute_s: float, tokens: np.ndarray) -> StepResult:
        session.next_step += 1
        session.mask = step.attention_mask
        session.tokens += session.batch
        session.compute_s += compute_s
        return StepResult(step.session_id, step.step, compute_s, tokens)

    def _close(self, peer: bytes, request: Close) -> Message:
        session = self.table.get((peer, request.session_id), time.monotonic())
        self.table.remove(session.key)
        stats = self._log_close(session, "closed by UE")
        return Closed(request.session_id, stats)

    def _log_close(self, session: EdgeSession, reason: str) -> dict:
        stats = {
            "steps": session.next_step,
            "tokens": session.tokens,
            "batched_steps": session.batched_steps,
            "moves": session.moves,
            "edge_compute_s": round(session.compute_s, 4),
            "open_s": round(time.monotonic() - session.opened_at, 3),
        }
        log.info("close %s peer=%s (%s) %s", session.key[1], session.key[0].hex()[:8], reason,
                 " ".join(f"{k}={v}" for k, v in stats.items()))
        return stats

    def _audit(self, message: Message) -> None:
        if self.message_log is None:
            return
        record = {"kind": message.kind}
        for name, value in vars(message).items():
            if isinstance(value, np.ndarray):
                record[name] = {"dtype": value.dtype.name, "shape": list(value.shape)}
            elif value is not None:
                record[name] = value
        self.message_log.write(json.dumps(record) + "\n")
        self.message_log.flush()
