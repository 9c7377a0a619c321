"""The UE's Python API: connect to an edge server, open sessions, and stream tokens.

    with EdgeClient("artifacts/small-llama", "tcp://edge:5555") as client:
        with client.session(split=6) as session:
            for tokens in session.generate([prompt_ids], max_new_tokens=32):
                ...

The UE runs layers ``[0, split)`` with its own KV cache and sends only hidden states (never token ids, unless
split 0 is explicitly allowed); the edge runs the rest, samples, and returns the token with its compute time.
``EdgeClient`` holds the connection, the handshake's outcome and the blocks; each ``RemoteSession``
(``seam.ue_client.session``) one generation.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from seam.planning.cost_model import Link
from seam.runtime.addresses import split_servers
from seam.runtime.artifact import Artifact
from seam.runtime.codecs import CODECS, CODECS_CAPABILITY, negotiate, offered
from seam.runtime.emulation import EmulatedLink, connect
from seam.runtime.errors import SeamError
from seam.runtime.executor import SessionPool
from seam.runtime.ort_options import providers_for
from seam.runtime.protocol import PRIVATE_OUTPUT_CAPABILITY, PROTOCOL_VERSION, Hello
from seam.runtime.registry import Registry
from seam.runtime.sampling import SamplingParams
from seam.runtime.text import load_tokenizer
from seam.runtime.transport import TransportConfig, UeSocket
from seam.ue_client.fleet import greet_best
from seam.ue_client.session import RemoteSession

PRIOR_BYTES_PER_S = 10e6 / 8  # 10 Mbit/s


class EdgeClient:
    def __init__(
        self,
        artifact: str | Path | Artifact,
        server: str | Sequence[str],
        transport: TransportConfig | None = None,
        threads: int | None = None,
        curve_secret: Path | None = None,
        server_key: Path | None = None,
        link: Link | None = None,
        emulated: EmulatedLink | None = None,
        ue_slowdown: float = 1.0,
        codec: str = "fp32",
        variant: str | None = None,
        device: str = "cpu",
        pool: SessionPool | None = None,
        registry: str | None = None,
    ):
        if ue_slowdown < 1:
            raise SeamError(f"a UE slowdown of {ue_slowdown:g} would make this device faster; use 1 or more")
        self.ue_slowdown = ue_slowdown  # emulates a device this many times slower (bench and demo on one machine)
        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
        self.variant = self.artifact.check_variant(variant)  # the UE's blocks: the export dtype, or int8
        providers_for(device)  # a device this onnxruntime cannot use is refused before the network
        # Clients of one device share its blocks: each connection to the edge needs its own client, since a
        # socket serves one thread (the HTTP endpoint serves each request on a connection of its own).
        self.pool = pool or SessionPool(self.artifact, threads, device)
        # The fleet: sessions open on the best of these and fail over to the next best; with a registry, the
        # edges announced there now, read again at each failover.
        self.registry = Registry(registry, min(self._timeout(transport), 5.0)) if registry else None
        self.servers = self._fleet() if self.registry else split_servers(server)
        self._connection = (transport or TransportConfig(), curve_secret, server_key, emulated)
        self.chooser = uuid.uuid4().hex  # spreads UEs over edges that rank alike (``rank_edges``)
        self.hello = Hello(PROTOCOL_VERSION, self.artifact.manifest.artifact_fingerprint,
                           ["sampling", CODECS_CAPABILITY + ",".join(CODECS)])
        greeted = greet_best(self.servers, self._connect, self.hello, self._connection[0].timeout_s,
                             chooser=self.chooser)
        self.server, self.socket, self.welcome = greeted.offer.address, greeted.socket, greeted.welcome
        handshake_s = greeted.offer.round_trip_s
        # What sessions start from until their own traffic says better: a probed link profile, else the
        # handshake's round trip and a modest bandwidth that the first probes replace.
        self.link = link or Link(handshake_s, PRIOR_BYTES_PER_S, PRIOR_BYTES_PER_S)
        self.codecs = [name for name in CODECS if name in offered(self.welcome.capabilities)] or ["fp32"]
        self.codec, warning = negotiate(list(CODECS), self.codecs, codec)
        self.warnings = [warning] if warning else []  # for the caller to show

    def check_split(self, split: int, allow_token_upload: bool) -> None:
        """Refuses a split the artifact does not have, or the edge does not serve (a stage of a pipeline serves
        splits only before the layer where the next stage begins)."""
        self.artifact.check_split(split, allow_token_upload)
        if split not in self.welcome.split_points:
            raise SeamError(f"the edge serves splits {self.welcome.split_points}, not {split} (it is a stage of a "
                            "pipeline whose later stages run the layers beyond); choose one of those")

    @functools.cached_property
    def tokenizer(self):
        """The artifact's tokenizer, loaded once for every chat of this client."""
        return load_tokenizer(self.artifact)

    def check_private_output(self) -> None:
        """Refuses private output when this artifact or the edge cannot serve it, saying which and why."""
        self.artifact.check_private_output()
        if PRIVATE_OUTPUT_CAPABILITY not in self.welcome.capabilities:
            raise SeamError(f"the edge at {self.server} cannot keep the output private (an older version, an "
                            "artifact exported before private output, or a stage of a pipeline); run without "
                            "--private-output, or point at an edge that serves it")

    def session(self, split: int, sampling: SamplingParams | None = None, allow_token_upload: bool = False,
                fallback_local: bool = False, private_output: bool = False):
        """A generation's sequences at ``split``; with ``private_output`` this device keeps the final norm, the
        LM head and sampling, and the edge returns the last layer's hidden states instead of tokens."""
        return RemoteSession(self, split, sampling or SamplingParams(), allow_token_upload, fallback_local,
                             private_output)

    def connect_again(self, timeout_s: float) -> UeSocket:
        """A second connection to the same edge, for a thread of its own (a socket serves one thread)."""
        transport = replace(self._connection[0], timeout_s=timeout_s)
        return connect(self.server, transport, *self._connection[1:])

    @staticmethod
    def _timeout(transport: TransportConfig | None) -> float:
        return (transport or TransportConfig()).timeout_s

    def _fleet(self) -> list[str]:
        """The edges the registry lists for this artifact now; refused in one line when it lists none."""
        addresses = self.registry.addresses(self.artifact.manifest.artifact_fingerprint)
        if not addresses:
            raise SeamError(f"no edge server of this artifact is announced in the registry at {self.registry.url}; "
                            "start one with --registry, or check that it holds the same artifact")
        return addresses

    def _connect(self, address: str) -> UeSocket:
        return connect(address, *self._connection)

    def fail_over(self) -> tuple[str, UeSocket]:
        """Greets the fleet's other edges and keeps the best that answers in place of the current one, which was
        lost or is shutting down: returns that one's address and socket, still open, for the caller to close.
        Raises SeamError when no other edge answers."""
        if self.registry is not None:
            try:
                self.servers = self._fleet()
            except SeamError:
                pass  # the registry is down or empty: the edges it listed last may still answer
        others = [address for address in self.servers if address != self.server]
        if not others:
            raise SeamError(f"the edge server at {self.server} was the only one; give several with --server A,B,...")
        greeted = greet_best(others, self._connect, self.hello, self._connection[0].timeout_s,
                             chooser=self.chooser)
        left = (self.server, self.socket)
        self.server, self.socket, self.welcome = greeted.offer.address, greeted.socket, greeted.welcome
        return left

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
