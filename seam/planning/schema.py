"""Profile files: what a device measured for an artifact's blocks, and what a link probe measured, as versioned JSON.

A device profile is keyed by (artifact fingerprint, device, provider, threads, dtype), so profiles measured on
different machines are portable: measure on the Jetson, copy the file to the edge, plan from both. Loading checks
the schema and refuses anything else with one clear line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from seam.runtime.errors import SeamError
from seam.runtime.files import write_atomically

SCHEMA = "seam.profile"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Timing:
    """Latency of one run shape: ``length`` is the prompt length (prefill) or the past length (decode)."""

    batch: int
    length: int
    median_s: float
    p90_s: float


def p90(samples: list[float]) -> float:
    """The 90th percentile of measured times, as every profile records it."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


@dataclass
class BlockProfile:
    """One graph of the artifact: a block (``index`` >= 0) or the prelude (``index`` -1, layers [0, 0))."""

    index: int
    layers: tuple[int, int]  # half-open
    variant: str
    weight_bytes: int
    load_s: float
    load_rss_bytes: int  # resident memory the loaded session added
    kv_bytes_per_token: int  # for the block's layers, batch 1
    activation_bytes_per_token: int  # of the block's output hidden state, batch 1
    prefill: list[Timing] = field(default_factory=list)
    decode: list[Timing] = field(default_factory=list)
    # Fine-tuning (``seam profile --training``): a forward and backward of the block's layers with LoRA in
    # PyTorch; ``batch`` is the micro-batch and ``length`` the sequence.
    train: list[Timing] = field(default_factory=list)


@dataclass(frozen=True)
class ProfileKey:
    artifact_fingerprint: str
    device: str
    provider: str
    threads: int
    dtype: str

    def file_name(self) -> str:
        return f"{self.device}-{self.provider}-t{self.threads}-{self.dtype}-{self.artifact_fingerprint[:12]}.json"


@dataclass
class DeviceProfile:
    key: ProfileKey
    host: dict
    settings: dict  # the measured grid: lengths, batches, repeats, warm-up
    prelude: BlockProfile
    blocks: list[BlockProfile]
    num_layers: int
    hidden_size: int
    peak_rss_bytes: int
    peak_cuda_bytes: int | None = None
    created: str = ""
    kind: str = "device"
    head_train: list[Timing] = field(default_factory=list)  # the final norm and LM head scoring every position
    # The final norm and LM head alone (index -2, layers [L, L)): what a UE keeping the output private runs after
    # each step, and what an edge serving it leaves out. Profiles of artifacts without a head graph have none.
    head: BlockProfile | None = None

    @property
    def trained(self) -> bool:
        """Whether fine-tuning was measured for every block and the head (``seam profile --training``)."""
        return bool(self.head_train) and all(block.train for block in self.blocks)

    def slowed(self, factor: float) -> DeviceProfile:
        """The profile a device ``factor`` times slower would have measured (a UE emulated on a faster machine)."""

        def timings(measured: list[Timing]) -> list[Timing]:
            return [replace(t, median_s=t.median_s * factor, p90_s=t.p90_s * factor) for t in measured]

        def block(graph: BlockProfile) -> BlockProfile:
            return replace(graph, **{phase: timings(getattr(graph, phase)) for phase in ("prefill", "decode", "train")})

        return replace(self, prelude=block(self.prelude), blocks=[block(b) for b in self.blocks],
                       head_train=timings(self.head_train), head=block(self.head) if self.head else None)


@dataclass(frozen=True)
class LinkSample:
    up_bytes: int
    down_bytes: int
    median_s: float


@dataclass
class LinkProfile:
    server: str
    host: dict
    rtt_s: float
    up_bytes_per_s: float
    down_bytes_per_s: float
    samples: list[LinkSample] = field(default_factory=list)
    gap_s: float = 0.0  # idle time before each ping
    created: str = ""
    kind: str = "link"


def to_json(profile: DeviceProfile | LinkProfile) -> str:
    return json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(profile)}, indent=1) + "\n"


def save(profile: DeviceProfile | LinkProfile, path: Path) -> Path:
    """Writes atomically, so a reader never sees half a profile."""
    return write_atomically(path, lambda out: out.write(to_json(profile)))


def _block(raw: dict) -> BlockProfile:
    raw = dict(raw)
    raw["layers"] = tuple(raw["layers"])
    raw["prefill"] = [Timing(**timing) for timing in raw["prefill"]]
    raw["decode"] = [Timing(**timing) for timing in raw["decode"]]
    raw["train"] = [Timing(**timing) for timing in raw.get("train", [])]
    return BlockProfile(**raw)


def from_dict(raw: dict) -> DeviceProfile | LinkProfile:
    if raw.get("schema") != SCHEMA:
        raise ValueError("not a Seam profile")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema version {raw.get('schema_version')}, this Seam reads {SCHEMA_VERSION}")
    body = {name: value for name, value in raw.items() if name not in ("schema", "schema_version")}
    if body.get("kind") == "device":
        body["key"] = ProfileKey(**body["key"])
        body["prelude"] = _block(body["prelude"])
        body["blocks"] = [_block(block) for block in body["blocks"]]
        body["head_train"] = [Timing(**timing) for timing in body.get("head_train", [])]
        body["head"] = _block(body["head"]) if body.get("head") else None
        return DeviceProfile(**body)
    if body.get("kind") == "link":
        body["samples"] = [LinkSample(**sample) for sample in body["samples"]]
        return LinkProfile(**body)
    raise ValueError(f"unknown profile kind {body.get('kind')!r}")


def load(path: Path, kind: type | None = None) -> DeviceProfile | LinkProfile:
    """Reads a profile; ``kind`` (DeviceProfile or LinkProfile) also checks which one it is."""
    try:
        profile = from_dict(json.loads(Path(path).read_text()))
    except OSError as error:
        raise SeamError(f"cannot read profile {path}: {error.strerror}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise SeamError(f"{path} is not a valid profile ({error}); measure it again with 'seam profile'") from None
    if kind is not None and not isinstance(profile, kind):
        wanted = "device profile (seam profile)" if kind is DeviceProfile else "link profile (seam probe)"
        raise SeamError(f"{path} is a {profile.kind} profile; a {wanted} is needed here")
    return profile
