"""The edge server's configuration: one dataclass that ``edge_server``'s flags map into."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seam.runtime.codecs import CODECS
from seam.runtime.transport import TransportConfig


@dataclass
class EdgeConfig:
    artifact: Path  # exported artifact directory
    bind: str = "tcp://127.0.0.1:5555"  # ZeroMQ address to listen on: loopback unless the user says otherwise
    device: str = "cpu"  # 'cpu' or 'cuda'
    threads: int | None = None  # onnxruntime intra-op threads; None = physical cores
    max_sessions: int = 64  # open sessions before the least recently used is evicted
    memory_budget_mb: float = 4096.0  # sessions' KV caches at full length plus the largest step's working memory, MiB
    idle_timeout_s: float = 300.0  # a session unused this long is closed
    drain_s: float = 30.0  # on SIGTERM, the longest wait for the UEs to move their sessions elsewhere
    registry: str | None = None  # an etcd client URL to announce this edge in
    advertise: str | None = None  # the address announced there (default: the bound one)
    max_batch: int = 64  # sequences per session, and per batched decode run
    batch_decode: bool = True  # run the decode steps of sessions that are ready together as one batch
    max_burst: int = 256  # queued requests taken at once
    max_length: int = 4096  # prompt plus generated tokens per sequence
    prefill_chunk: int = 512  # prefill positions run at a time: attention memory grows with a run's length squared
    curve_secret: Path | None = None  # the server's NAME.key_secret; enables CURVE
    allowed_keys: Path | None = None  # directory of allowed UE public keys (*.key)
    log_messages: Path | None = None  # append one JSON line per received message header (debugging, audits)
    codecs: tuple[str, ...] = tuple(CODECS)  # activation codecs offered to UEs (fp32 always)
    max_training_sessions: int = 16  # split fine-tuning sessions open at once (with --train)
    training_memory_mb: float = 2048.0  # training jobs' adapters and optimizer state plus the graphs steps keep, MiB
    round_timeout_s: float = 60.0  # a federated round closes without the UEs that have not uploaded by then
    until: int | None = None  # a pipeline stage: the layer its spans end at, where the next stage begins
    next_stage: str | None = None  # the next stage's address, with ``until``
    next_timeout_s: float = 10.0  # longest wait for the next stage; under the UE's own, so its error arrives first
    next_server_key: Path | None = None  # the next stage's public key (CURVE, with this server's own secret)
    log_level: str = "info"  # debug, info (a line per session open, move and close), warning or error
    transport: TransportConfig = None

    def __post_init__(self):
        self.transport = self.transport or TransportConfig()
