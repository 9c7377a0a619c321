"""What a split policy sees: a small, explicit snapshot of a running session, and the decision it returns.

The UE's session builds a ``SessionSnapshot`` before each step and applies the ``Decision`` a policy returns;
policies read nothing else, so each one is a pure function that tests can feed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from seam.planning.cost_model import Link
from seam.planning.wire_sizes import ID_BYTES
from seam.runtime.artifact import Manifest


@dataclass(frozen=True)
class StepTiming:
    """Where one step's time went, as the UE measured it."""

    ue_s: float  # head blocks on the UE
    network_s: float  # round trip minus the edge's compute
    edge_s: float  # tail blocks and sampling on the edge


@dataclass(frozen=True)
class ArtifactFacts:
    """What a policy needs of the artifact and of the blocks the UE runs; fixed for a session."""

    num_layers: int
    kv_bytes_per_token_per_layer: int
    block_layers: tuple[int, ...]  # layers in each block, in order
    block_weight_bytes: tuple[int, ...]  # weights of each block in the variant the UE runs
    boundary_bytes_per_token: int  # the hidden states of one position at a cut, with its mask entry

    @classmethod
    def of(cls, manifest: Manifest, variant: str, kv_itemsize: int) -> ArtifactFacts:
        return cls(
            manifest.dims.num_layers,
            manifest.kv_bytes_per_token_per_layer,
            tuple(len(block.layers) for block in manifest.blocks),
            tuple(block.variants[variant].weight_bytes for block in manifest.blocks),
            manifest.dims.hidden_size * kv_itemsize + ID_BYTES,
        )


@dataclass(frozen=True)
class SessionSnapshot:
    """A session between two steps."""

    artifact: ArtifactFacts
    step: int  # the step about to run (0 is the prefill)
    now_s: float  # the clock the probe times below are on
    split: int
    past: int  # positions already run
    batch: int
    max_length: int  # prompt plus every token the generation may produce
    codec: str  # how hidden states cross now
    allow_token_upload: bool  # split 0 (raw token ids to the edge) is allowed
    offered_codecs: tuple[str, ...]  # what the edge decodes
    link: Link  # the session's estimate of the link
    timings_since_move: tuple[StepTiming, ...] = ()  # the decode steps since the split last moved, oldest first
    step_probes: tuple[tuple[float, float], ...] = ()  # (sent at, network seconds) of step-sized pings
    move_steps: tuple[int, ...] = ()  # the step before which each move so far happened
    kept: frozenset[int] = field(default_factory=frozenset)  # cuts where the UE holds every position's hidden states
    link_history: tuple[tuple[float, float], ...] = ()  # (at, uplink bytes/s) before each step once measured
    move_costs: tuple[tuple[bool, float, float], ...] = ()  # (towards the UE, predicted s, measured s) per move
    up_measured_at: float | None = None  # when the uplink estimate was last measured (None: the prior)
    down_measured_at: float | None = None  # when the downlink estimate was last measured (None: the prior)
    prior: Link | None = None  # the link the session expected before measuring any
    served: tuple[int, ...] = ()  # the splits the edge serves (a pipeline stage serves fewer); () = every one
    private_output: bool = False  # the UE runs the head and the edge returns hidden states instead of tokens

    @property
    def alone(self) -> bool:
        """Whether this device runs every layer and the edge none."""
        return self.split == self.artifact.num_layers


@dataclass(frozen=True)
class Decision:
    split: int
    per_token_s: dict[int, float]  # predicted decode latency of each candidate
    reason: str
    rebuild: bool = False  # the side taking layers over recomputes their cache instead of receiving it
    codec: str | None = None  # how the hidden states should cross at the chosen split (None: as they are)
    move_s: float | None = None  # what the move was predicted to take, from the profiles alone
