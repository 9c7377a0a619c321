"""The edge's checks of what a UE asks, as pure functions: each turns a message into a checked, normalised value
or raises SeamError with what was wrong, and none mutates the message or touches a cache.

The server calls them before any compute (``seam.edge_server.compute``), so a step is checked exactly once,
whether it then runs alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from seam.runtime.artifact import Manifest
from seam.runtime.codecs import from_message_fields
from seam.runtime.errors import SeamError
from seam.runtime.migration import check_boundary
from seam.runtime.protocol import OpenSession, Ping, Resplit, Step
from seam.edge_server.sessions import EdgeSession

INT64 = np.dtype(np.int64)


@dataclass(frozen=True)
class Limits:
    """What the artifact and the server's configuration allow."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    hidden_dtype: np.dtype  # the artifact's own dtype, the one the blocks take
    max_batch: int
    max_length: int
    offered_codecs: tuple[str, ...]
    check_split: Callable[[int, bool], None]  # Artifact.check_split
    private_output_refusal: str = ""  # why this edge cannot return hidden states instead of tokens; "" if it can


@dataclass(frozen=True)
class CheckedStep:
    """A step ready to run: what the first block takes, the session's whole mask and the new positions."""

    first: np.ndarray  # [B, S, H] hidden states in the artifact's dtype, or [B, S] token ids at split 0
    attention_mask: np.ndarray  # [B, past + S] int64
    position_ids: np.ndarray  # [B, S] int64

    @property
    def new(self) -> int:
        return self.first.shape[1]


def private_output_refusal(manifest: Manifest, end: int) -> str:
    """Why an edge running its sessions' layers up to ``end`` cannot return hidden states instead of tokens
    (``Limits.private_output_refusal``), or ""."""
    if manifest.head is None:
        return "its artifact was exported before private output existed; re-export it with 'seam export --force'"
    if end < manifest.dims.num_layers:
        return "it is a stage of a pipeline, and private output is served by a single edge in this version"
    return ""


def check_open(request: OpenSession, limits: Limits) -> int:
    """Checks a session's opening; returns the positions it arrives with (0 for a new one)."""
    limits.check_split(request.split, request.allow_token_upload)
    if request.split == limits.num_layers:
        raise SeamError(f"split {request.split} leaves the edge no layers; the UE should generate locally")
    if not 1 <= request.batch <= limits.max_batch:
        raise SeamError(f"batch {request.batch} is outside 1..{limits.max_batch}")
    if not 1 <= request.max_length <= limits.max_length:
        raise SeamError(f"max_length {request.max_length} is outside 1..{limits.max_length}")
    if request.private_output and limits.private_output_refusal:
        raise SeamError(f"this edge_server cannot keep the output private: {limits.private_output_refusal}")
    if request.kv is None and request.hidden_states is None:
        if request.attention_mask is not None:
            raise SeamError("a new session carries no attention mask: its first step brings the mask columns")
        return 0
    if request.hidden_states is not None:  # sequences the UE ran alone, with the cache to recompute here
        check_moved_boundary(request, request.batch, None, limits)
        past = request.attention_mask.shape[1]
        if past >= request.max_length:
            raise SeamError("the recomputed cache must hold at most max_length - 1 positions")
        return past
    past = request.kv.shape[2] if request.kv.ndim == 4 else -1  # the same, with their cache
    if not 0 < past < request.max_length:
        raise SeamError(f"the KV cache must hold between 1 and max_length - 1 positions, got {past}")
    mask = request.attention_mask
    well_formed = mask is not None and mask.dtype == INT64 and mask.shape == (request.batch, past)
    if not well_formed or not ((mask == 0) | (mask == 1)).all():
        raise SeamError(f"a session opened with its KV cache needs the attention mask of its positions, int64 zeros "
                        f"and ones of shape [{request.batch}, {past}]")
    return past


def check_moved_boundary(request: OpenSession | Resplit, batch: int, past: int | None, limits: Limits) -> None:
    """Checks the hidden states (and their mask) a UE sent for the edge to recompute moved layers from."""
    if request.kv is not None:
        raise SeamError("send the moved layers' KV cache or the hidden states to recompute it from, not both")
    if request.split == 0:
        raise SeamError("a cache recomputed at split 0 would need the token ids; send the KV cache instead")
    check_boundary(request.hidden_states, request.attention_mask, batch, past, limits.hidden_size,
                   limits.hidden_dtype)
    if not np.isfinite(request.hidden_states).all() or not ((request.attention_mask == 0)
                                                            | (request.attention_mask == 1)).all():
        raise SeamError("boundary hidden states must be finite and their attention mask 0 or 1")


def check_resplit(session: EdgeSession, request: Resplit, limits: Limits) -> None:
    """Checks a move of ``session``'s split; the moved cache itself is checked as it is unpacked."""
    if request.step != session.next_step:
        raise SeamError(f"a resplit before step {request.step} arrived, expected one before step {session.next_step}")
    limits.check_split(request.split, session.allow_token_upload)
    if request.split == session.split:
        raise SeamError(f"the session already runs at split {request.split}")
    if request.split < session.split:
        if request.hidden_states is not None:
            check_moved_boundary(request, session.batch, session.runner.past_length, limits)
    elif request.kv is not None or request.hidden_states is not None:
        raise SeamError(f"moving the split from {session.split} to {request.split} hands layers to the UE: send no "
                        "cache with it")


def check_step(session: EdgeSession, step: Step, limits: Limits) -> CheckedStep:
    """Checks ``step`` against its session and returns it normalised: hidden states decoded from their codec and
    the mask whole."""
    batch, past = session.batch, session.runner.past_length
    if step.step != session.next_step:
        raise SeamError(f"step {step.step} arrived, expected step {session.next_step}")
    first, name, dtype = _first_input(session, step, limits)
    new = first.shape[1] if first.ndim >= 2 else -1
    expected = (batch, new, limits.hidden_size) if session.split else (batch, new)
    if first.shape != expected or new < 1 or first.dtype != dtype:
        raise SeamError(f"{name} must be {dtype.name} of shape {list(expected)}, got {first.dtype.name} "
                        f"{list(first.shape)}")
    columns = step.attention_mask
    if columns.shape != (batch, new) or columns.dtype != INT64:
        raise SeamError(f"attention_mask must be int64 of shape [{batch}, {new}]: the mask columns of the step's "
                        "own positions")
    if step.position_ids.shape != (batch, new) or step.position_ids.dtype != INT64:
        raise SeamError(f"position_ids must be int64 of shape [{batch}, {new}]")
    if past + new > session.max_length:
        raise SeamError(f"the session would reach {past + new} tokens, beyond its max_length {session.max_length}")
    check_values(first, columns, step.position_ids, session.max_length, limits.vocab_size)
    mask = columns if session.mask is None else np.concatenate([session.mask, columns], axis=1)
    return CheckedStep(first, mask, step.position_ids)


def check_values(first: np.ndarray, mask: np.ndarray, positions: np.ndarray, max_length: int,
                 vocab_size: int) -> None:
    """Refuses values the blocks would turn into garbage for this session or for its batch-mates: non-finite
    hidden states, token ids outside the vocabulary, mask entries other than 0 and 1, positions outside
    [0, max_length)."""
    if first.dtype.kind == "f" and not np.isfinite(first).all():
        raise SeamError("hidden_states hold NaN or infinite values; the UE's blocks or its codec produced them")
    if first.dtype.kind == "i" and first.size and not (0 <= first.min() and first.max() < vocab_size):
        raise SeamError(f"input_ids must lie in [0, {vocab_size}), the model's vocabulary")
    if not ((mask == 0) | (mask == 1)).all():
        raise SeamError("attention_mask entries must be 0 (padding) or 1")
    if positions.size and not (0 <= positions.min() and positions.max() < max_length):
        raise SeamError(f"position_ids must lie in [0, {max_length}), the session's max_length")


def _first_input(session: EdgeSession, step: Step, limits: Limits) -> tuple[np.ndarray, str, np.dtype]:
    """What the session's first block takes from ``step``, decoded, with its name and the dtype it must have."""
    if session.split == 0:
        if step.hidden_states is not None:
            raise SeamError("a split-0 session sends input_ids, not hidden_states")
        if step.input_ids is None:
            raise SeamError("step carries no input_ids")
        return step.input_ids, "input_ids", INT64
    if step.input_ids is not None:
        raise SeamError("token ids are refused: this session's UE runs the first layers itself")
    if step.hidden_states is None:
        raise SeamError("step carries no hidden_states")
    if not step.codec:
        return step.hidden_states, "hidden_states", limits.hidden_dtype
    if step.codec not in limits.offered_codecs:
        raise SeamError(f"activation codec {step.codec!r} is not one this server offered "
                        f"({', '.join(limits.offered_codecs)})")
    if step.position_ids.ndim != 2:
        raise SeamError(f"a step coded with {step.codec} carries malformed position_ids")
    shape = (session.batch, step.position_ids.shape[1], limits.hidden_size)
    decoded = from_message_fields(step.codec, step.hidden_states, step.hidden_scale, shape, limits.hidden_dtype)
    return decoded, "hidden_states", limits.hidden_dtype


UNGREETED_REPLY_BYTES = 4096  # the most a ping from a peer that has not said hello gets back beyond what it sent


def check_ping(ping: Ping, max_message_bytes: int, greeted: bool) -> None:
    """Bounds a pong: by the message limit, and before a hello by what the ping itself carried, so that nobody
    gets a large reply for a small request without a handshake first."""
    limit = max_message_bytes - (1 << 12)
    if not greeted:
        limit = min(limit, max(UNGREETED_REPLY_BYTES, 0 if ping.payload is None else ping.payload.nbytes))
    if not 0 <= ping.reply_bytes <= limit:
        hint = "" if greeted else "; send hello first (an empty artifact fingerprint is enough to probe the link)"
        raise SeamError(f"reply_bytes {ping.reply_bytes} is outside 0..{limit}{hint}")
