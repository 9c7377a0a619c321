"""The wire protocol between ``ue_client`` and ``edge_server``: versioned, typed messages; no pickle anywhere.

A message travels as one small JSON header frame (kind, fields, and each tensor's name, dtype and shape) followed
by one raw frame per tensor, sent without copying. ``decode`` checks everything a peer could get wrong: the
header's structure, the message kind, every field's type, the dtype allow-list, each tensor's byte length against
its shape, and the total size against a maximum; any violation raises ``ProtocolError``. Checks that need the
artifact (hidden size, split points) belong to the server.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np

from seam.runtime.errors import SeamError

PROTOCOL_VERSION = 4
PROBE_FINGERPRINT = ""  # a Hello with this fingerprint only probes the link (``seam probe``): no sessions
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
ALLOWED_DTYPES = frozenset({"float32", "float16", "int64", "int8", "uint8", "uint16"})
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}  # numpy's dtype.name runs Python code on each call
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
MAX_DIM = (1 << 31) - 1  # numpy refuses larger dimensions even for an empty tensor
PRIVATE_OUTPUT_CAPABILITY = "private-output"  # an edge that returns hidden states instead of tokens when asked


class ProtocolError(SeamError):
    """A message that does not follow the protocol; the receiver answers with an Error and carries on."""


_KINDS: dict[str, type[Message]] = {}  # every message class by its kind


class Message:
    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _KINDS[cls.kind] = cls


@functools.cache
def _layout(cls: type[Message]) -> dict[str, str | None]:
    """A message class's fields in order, each with its annotation, None for a tensor: read once per class,
    since every step encodes and decodes a message."""
    return {spec.name: None if "ndarray" in str(spec.type) else spec.type for spec in fields(cls)}


@dataclass
class Hello(Message):
    kind = "hello"
    protocol_version: int
    artifact_fingerprint: str
    capabilities: list = field(default_factory=list)


@dataclass
class Welcome(Message):
    kind = "welcome"
    protocol_version: int
    artifact_fingerprint: str
    split_points: list
    max_message_bytes: int
    capabilities: list = field(default_factory=list)
    load: dict = field(default_factory=dict)  # how busy the edge is: ``seam.planning.fleet.EdgeOffer.from_load``


@dataclass
class OpenSession(Message):
    kind = "open"
    session_id: str
    split: int  # layers [0, split) run on the UE
    batch: int
    sampling: dict  # temperature, top_k, top_p, seed
    max_length: int  # prompt plus generated tokens, bounds the KV the edge allocates
    allow_token_upload: bool = False
    sampler_state: dict = field(default_factory=dict)  # continues the UE's sampler when it generated locally so far
    kv: np.ndarray | None = None  # the cache of layers [split, L) when sequences are already running (see Resplit)
    hidden_states: np.ndarray | None = None  # or, instead of the cache, what to recompute it from (see Resplit)
    attention_mask: np.ndarray | None = None  # [B, past] int64 of the positions already run, with kv or hidden_states
    private_output: bool = False  # the UE keeps the head and samples: results carry hidden states, never a token


@dataclass
class SessionOpened(Message):
    kind = "opened"
    session_id: str
    edge_compute_s: float = 0.0  # opening a span's blocks, recomputing a cache: not the link's time


@dataclass
class Step(Message):
    """One prefill or decode step: the UE's boundary output for positions it has not sent before. The edge keeps
    the mask of the positions before (from the open and the steps): a whole mask would grow 8 bytes a token."""
    kind = "step"
    session_id: str
    step: int
    attention_mask: np.ndarray  # [B, S] int64: the mask columns of this step's positions
    position_ids: np.ndarray  # [B, S] int64
    hidden_states: np.ndarray | None = None  # [B, S, H], when the UE runs at least one layer
    input_ids: np.ndarray | None = None  # [B, S], only with allow_token_upload and split 0
    codec: str = ""  # how hidden_states is coded (runtime.codecs); "" = the artifact's own dtype, as it is
    hidden_scale: np.ndarray | None = None  # the codec's scales (int8, int4)


@dataclass
class StepResult(Message):
    kind = "result"
    session_id: str
    step: int
    edge_compute_s: float  # lets the UE separate network time from compute
    tokens: np.ndarray | None = None  # [B] int64, sampled by the edge
    hidden_states: np.ndarray | None = None  # or with private output [B, 1, H], the last layer's before the head
    draining: bool = False  # the edge is shutting down: the UE moves the session elsewhere before its next step


@dataclass
class Resplit(Message):
    """Moves a running session's split between two steps; the layers that change side take their KV cache along.

    When the edge gains layers the UE sends their cache, [2 * layers * B, kv_heads, past, head_dim] (each layer's
    keys then values), or the hidden states at the new split [B, past, H] and the mask [B, past] to recompute it
    from; when the UE gains layers the edge answers with their cache, unless ``send_kv`` is off (the UE recomputes).
    """
    kind = "resplit"
    session_id: str
    step: int  # the next step: a split moves only between steps
    split: int
    send_kv: bool = True  # False: the UE rebuilds the layers it takes over itself, so the edge just drops them
    kv: np.ndarray | None = None
    hidden_states: np.ndarray | None = None
    attention_mask: np.ndarray | None = None


@dataclass
class Resplitted(Message):
    kind = "resplitted"
    session_id: str
    split: int
    sampler_state: dict = field(default_factory=dict)  # at split L the edge hands its sampler over and closes
    kv: np.ndarray | None = None
    edge_compute_s: float = 0.0  # recomputing the cache of the layers the edge took over


@dataclass
class Close(Message):
    kind = "close"
    session_id: str


@dataclass
class Closed(Message):
    kind = "closed"
    session_id: str
    stats: dict


@dataclass
class Error(Message):
    kind = "error"
    code: str
    message: str
    session_id: str = ""


@dataclass
class Ping(Message):
    """A liveness check, and a link probe: ``payload`` measures the uplink, ``reply_bytes`` the downlink (before a
    hello, at most 4 KiB or the payload's own size)."""
    kind = "ping"
    nonce: int
    reply_bytes: int = 0
    payload: np.ndarray | None = None  # uint8


@dataclass
class Pong(Message):
    kind = "pong"
    nonce: int
    payload: np.ndarray | None = None  # uint8, reply_bytes long


# --- split fine-tuning ----------------------------------------------------------------------------------------
TRAINING_MODES = ("edge-loss", "u-shaped")


@dataclass
class OpenTraining(Message):
    """Opens a split fine-tuning session: the edge trains LoRA adapters on layers [cut, L). In ``edge-loss``
    mode it also computes the loss, from the labels each step sends; ``u-shaped`` returns the last layer's hidden
    states instead, and the UE keeps the head, the labels and the loss."""
    kind = "open_training"
    session_id: str
    cut: int
    mode: str
    lora: dict  # rank, alpha, seed
    optimizer: dict  # lr, weight_decay
    job: str = ""  # sessions of one job share the edge's adapters (sequential SplitFed); "" = a job of its own
    client: str = ""  # the UE's name in the edge's logs
    job_size: int = 0  # UEs each federated round of the job waits for (0: those training in it at the time)
    # Resuming: the edge's adapters and optimizer state as a FetchAdapter with optimizer=True returned them.
    resume_names: list = field(default_factory=list)
    resume_shapes: list = field(default_factory=list)
    resume: np.ndarray | None = None


@dataclass
class TrainingOpened(Message):
    kind = "training_opened"
    session_id: str
    edge_parameters: int  # LoRA parameters the edge trains for this session


@dataclass
class TrainForward(Message):
    """The UE layers' output at the cut for one batch; the edge runs its layers and keeps the graph for the
    ``TrainBackward`` that follows."""
    kind = "train_forward"
    session_id: str
    step: int
    hidden_states: np.ndarray  # [B, S, H] float32
    attention_mask: np.ndarray  # [B, S] int64, padding on the right
    labels: np.ndarray | None = None  # [B, S] int64, edge-loss mode only; -100 marks positions not scored


@dataclass
class TrainForwarded(Message):
    kind = "train_forwarded"
    session_id: str
    step: int
    edge_compute_s: float
    loss: float = 0.0  # edge-loss mode
    hidden_states: np.ndarray | None = None  # u-shaped: [B, S, H], the last layer's output


@dataclass
class TrainBackward(Message):
    """The gradient of the loss with respect to what the edge returned: [1] (the loss's own) in edge-loss mode,
    [B, S, H] u-shaped. The edge backpropagates, steps its optimizer and answers with the gradient at the cut."""
    kind = "train_backward"
    session_id: str
    step: int
    grad: np.ndarray


@dataclass
class CutGradient(Message):
    kind = "cut_gradient"
    session_id: str
    step: int
    edge_compute_s: float
    grad: np.ndarray  # [B, S, H] float32


@dataclass
class FetchAdapter(Message):
    kind = "fetch_adapter"
    session_id: str
    optimizer: bool = False  # also the optimizer's state, for a checkpoint to resume from


@dataclass
class AdapterWeights(Message):
    """LoRA weights as one flat float32 array, cut into ``names`` of ``shapes`` in order."""
    kind = "adapter_weights"
    session_id: str
    names: list
    shapes: list
    data: np.ndarray


@dataclass
class UploadAdapter(Message):
    """A UE's own adapters after a round of local training, for its job's federated average."""
    kind = "upload_adapter"
    session_id: str
    round: int
    samples: int  # training samples behind these weights: FedAvg weighs by them
    names: list
    shapes: list
    data: np.ndarray


@dataclass
class FetchRound(Message):
    kind = "fetch_round"
    session_id: str
    round: int


@dataclass
class RoundAverage(Message):
    """A round's FedAvg of the UEs' adapters, once every UE of the job uploaded or the round's time ran out;
    until then ``done`` is False and the UE asks again."""
    kind = "round_average"
    session_id: str
    round: int
    done: bool
    averaged: list = field(default_factory=list)  # the UEs (client names) in the average
    dropped: list = field(default_factory=list)  # the UEs of the job that did not upload in time
    names: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    data: np.ndarray | None = None


TRAINING_MESSAGES = (OpenTraining, TrainForward, TrainBackward, FetchAdapter, UploadAdapter, FetchRound)


def encode(message: Message) -> list:
    """Header frame plus one frame per tensor; tensors are handed to the socket without a copy."""
    header = {"kind": message.kind, "fields": {}, "tensors": []}
    frames: list = [b""]
    for name, annotation in _layout(type(message)).items():
        value = getattr(message, name)
        if annotation is None:
            if value is None:
                continue
            array = np.ascontiguousarray(value)
            header["tensors"].append({"name": name, "dtype": _DTYPE_NAMES.get(array.dtype) or array.dtype.name,
                                      "shape": list(array.shape)})
            frames.append(memoryview(array).cast("B") if array.size else b"")
        else:
            header["fields"][name] = value
    frames[0] = json.dumps(header, separators=(",", ":")).encode()
    return frames


# Field annotations are strings (postponed evaluation); these are the scalar kinds messages use.
_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,)}
# Names that reach the logs: a line break or another control character in one would forge log lines.
_IDENTIFIERS = frozenset({"session_id", "client", "job"})
MAX_IDENTIFIER = 128


def _check_field(kind: str, name: str, annotation: str, value) -> None:
    allowed = _FIELD_TYPES[annotation]
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise ProtocolError(f"{kind}.{name} must be {annotation}, got {type(value).__name__}")
    if name in _IDENTIFIERS and (len(value) > MAX_IDENTIFIER or not value.isprintable()):
        raise ProtocolError(f"{kind}.{name} must be at most {MAX_IDENTIFIER} printable characters, without line "
                            "breaks or other control characters")


def decode(frames: list, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parses and checks one message; raises ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("empty message")
    sizes = [len(frame) for frame in frames]
    if sum(sizes) > max_bytes:
        raise ProtocolError(f"message of {sum(sizes)} bytes exceeds the limit of {max_bytes}")
    try:
        header = json.loads(bytes(frames[0]))
    except (ValueError, RecursionError):  # not JSON, too deeply nested, or a number too long to parse
        raise ProtocolError("header frame is not JSON this decoder accepts") from None
    if not isinstance(header, dict) or set(header) != {"kind", "fields", "tensors"}:
        raise ProtocolError("header must hold exactly 'kind', 'fields' and 'tensors'")
    cls = _KINDS.get(header["kind"]) if isinstance(header["kind"], str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {_shown(header['kind'])}")
    raw_fields, raw_tensors = header["fields"], header["tensors"]
    if not isinstance(raw_fields, dict) or not isinstance(raw_tensors, list):
        raise ProtocolError("header 'fields' must be an object and 'tensors' a list")
    layout = _layout(cls)
    unknown = {name for name in raw_fields if layout.get(name) is None}
    if unknown:
        raise ProtocolError(f"{cls.kind} has no field(s) {sorted(unknown)}")
    for name, value in raw_fields.items():
        _check_field(cls.kind, name, layout[name], value)
    if len(raw_tensors) != len(frames) - 1:
        raise ProtocolError(f"header lists {len(raw_tensors)} tensors but {len(frames) - 1} tensor frames arrived")
    tensors = dict(_tensor(cls, layout, spec, frame) for spec, frame in zip(raw_tensors, frames[1:]))
    try:
        return cls(**raw_fields, **tensors)
    except TypeError as error:  # a required field is missing
        raise ProtocolError(f"{cls.kind}: {error}") from None


def _shown(value) -> str:  # a peer's value for an error line, cut short: a hostile one may be huge
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 64 else text[:61] + "..."


def _tensor(cls, layout: dict[str, str | None], spec, frame) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
        raise ProtocolError("each tensor header needs exactly 'name', 'dtype' and 'shape'")
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str) or name not in layout or layout[name] is not None:
        raise ProtocolError(f"{cls.kind} has no tensor {_shown(name)}")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"tensor {name!r} has dtype {_shown(dtype)}; allowed: {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > 4 or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        raise ProtocolError(f"tensor {name!r} has an invalid shape {_shown(shape)}")
    if len(frame) != (expected := math.prod(shape) * _DTYPES[dtype].itemsize):
        raise ProtocolError(f"tensor {name!r} of shape {shape} {dtype} needs {expected} bytes, got {len(frame)}")
    return name, np.frombuffer(frame, dtype=_DTYPES[dtype]).reshape(shape)
