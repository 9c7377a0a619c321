"""An exported artifact: ``manifest.json``, the ONNX blocks, the prelude, the tokenizer and the config.

The export step writes it (``export.exporter``); the UE, the edge and the profiler open it here. A block is the
span of layers between two consecutive cuts; a split at cut ``k`` puts layers ``[0, k)`` on the UE and
``[k, L)`` on the edge, so one export serves every split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from seam.runtime.errors import SeamError
from seam.runtime.spans import Span

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
NUMPY_DTYPES = {"fp32": "float32", "fp16": "float16"}
DTYPE_BYTES = {"fp32": 4, "fp16": 2}
FINAL_HIDDEN = "final_hidden"  # the last block's hidden states before the final norm and LM head, [B, K, H]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class OnnxFile:
    """One ONNX graph on disk, with its external weights file when the graph is too large to hold them."""

    file: str
    sha256: str
    weight_bytes: int
    data_file: str | None = None
    data_sha256: str | None = None

    def verify(self, root: Path) -> None:
        for name, expected in ((self.file, self.sha256), (self.data_file, self.data_sha256)):
            if name is None:
                continue
            path = root / name
            if not path.is_file():
                raise SeamError(f"artifact {root} is missing {name}; re-export it with 'seam export ... --force'")
            if sha256_file(path) != expected:
                raise SeamError(
                    f"artifact {root}: {name} does not match its sha256 in the manifest (corrupt or edited); "
                    "re-export it with 'seam export ... --force'"
                )


@dataclass(frozen=True)
class Block:
    index: int
    layers: Span
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    variants: dict[str, OnnxFile]  # "fp32" or "fp16" (the export dtype), and "int8" when quantised

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "layers": [self.layers.start, self.layers.end],
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "variants": {name: asdict(onnx_file) for name, onnx_file in self.variants.items()},
        }

    @classmethod
    def from_dict(cls, raw: dict) -> Block:
        return cls(
            index=raw["index"],
            layers=Span(*raw["layers"]),
            inputs=tuple(raw["inputs"]),
            outputs=tuple(raw["outputs"]),
            variants={name: OnnxFile(**onnx_file) for name, onnx_file in raw["variants"].items()},
        )


@dataclass(frozen=True)
class Dimensions:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


@dataclass
class Manifest:
    source: str
    fingerprint: str  # sha256 of the model's config and weights, before any dtype cast
    family: str
    model_type: str
    dims: Dimensions
    dtype: str
    cuts: list[int]
    prelude: OnnxFile
    blocks: list[Block]
    tokenizer: dict  # special token ids and the tokenizer files copied in
    export_args: dict
    validation: list[dict] = field(default_factory=list)
    # How blocks take their KV cache: "concat" (past in, past and new out) or "shared-buffer" (one buffer per
    # layer, bound as both past and present, written in place); artifacts from before the field are "concat".
    kv_layout: str = "concat"
    # The final norm and the LM head alone, taking the last block's ``final_hidden``: the UE runs it when the
    # edge returns hidden states instead of a token (private output). Artifacts from before it have none.
    head: OnnxFile | None = None
    schema_version: int = SCHEMA_VERSION
    seam_version: str = ""

    @property
    def activation_bytes_per_token(self) -> dict[str, int]:
        """Bytes of one token's hidden state crossing each cut, in the export dtype."""
        return {str(cut): self.dims.hidden_size * DTYPE_BYTES[self.dtype] for cut in self.cuts}

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.dims.num_kv_heads * self.dims.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def artifact_fingerprint(self) -> str:
        """Identifies exactly these graphs: both ends of a split compare it at handshake."""
        digest = hashlib.sha256(self.fingerprint.encode())
        for onnx_file in [self.prelude] + [v for b in self.blocks for v in b.variants.values()]:
            digest.update(onnx_file.sha256.encode())
        if self.head is not None:
            digest.update(self.head.sha256.encode())
        return digest.hexdigest()

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "seam_version": self.seam_version,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "artifact_fingerprint": self.artifact_fingerprint,
            "family": self.family,
            "model_type": self.model_type,
            "dims": asdict(self.dims),
            "dtype": self.dtype,
            "kv_layout": self.kv_layout,
            "cuts": self.cuts,
            "prelude": asdict(self.prelude),
            "head": asdict(self.head) if self.head is not None else None,
            "blocks": [block.to_dict() for block in self.blocks],
            "activation_bytes_per_token": self.activation_bytes_per_token,
            "kv_bytes_per_token_per_layer": self.kv_bytes_per_token_per_layer,
            "tokenizer": self.tokenizer,
            "export_args": self.export_args,
            "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> Manifest:
        return cls(
            schema_version=raw["schema_version"],
            seam_version=raw.get("seam_version", ""),
            source=raw["source"],
            fingerprint=raw["fingerprint"],
            family=raw["family"],
            model_type=raw["model_type"],
            dims=Dimensions(**raw["dims"]),
            dtype=raw["dtype"],
            kv_layout=raw.get("kv_layout", "concat"),
            cuts=list(raw["cuts"]),
            prelude=OnnxFile(**raw["prelude"]),
            head=OnnxFile(**raw["head"]) if raw.get("head") else None,
            blocks=[Block.from_dict(block) for block in raw["blocks"]],
            tokenizer=raw["tokenizer"],
            export_args=raw["export_args"],
            validation=raw.get("validation", []),
        )

    def write(self, directory: Path) -> None:
        path = directory / MANIFEST_NAME
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        partial.replace(path)


class Artifact:
    """An artifact directory opened for running: its manifest plus paths to its files."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, directory: str | Path, verify: bool = True) -> Artifact:
        root = Path(directory)
        path = root / MANIFEST_NAME
        if root.exists() and not root.is_dir():
            raise SeamError(f"{root} is a file, not an artifact directory; give the directory 'seam export' wrote")
        if not root.is_dir():
            raise SeamError(f"artifact directory {root} does not exist; create it with 'seam export MODEL --out {root}'")
        if not path.is_file():
            raise SeamError(f"{root} holds no {MANIFEST_NAME}; it is not a Seam artifact (run 'seam export' first)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("schema_version") != SCHEMA_VERSION:
                raise SeamError(
                    f"{path} has schema version {raw.get('schema_version')}, this Seam reads {SCHEMA_VERSION}; "
                    "re-export the model with this version"
                )
            manifest = Manifest.from_dict(raw)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise SeamError(f"{path} is not a valid manifest ({error}); re-export with 'seam export ... --force'")
        artifact = cls(root, manifest)
        if verify:
            for onnx_file in artifact.all_files():
                onnx_file.verify(root)
        return artifact

    def all_files(self) -> list[OnnxFile]:
        head = [self.manifest.head] if self.manifest.head is not None else []
        return [self.manifest.prelude, *head] + [v for b in self.manifest.blocks for v in b.variants.values()]

    def check_private_output(self) -> None:
        """Refuses private output (the UE keeps the head) on an artifact exported before the head had a graph."""
        if self.manifest.head is None:
            raise SeamError(f"{self.root} was exported before private output existed (it has no head graph); "
                            "re-export it with 'seam export ... --force'")

    @property
    def num_layers(self) -> int:
        return self.manifest.dims.num_layers

    @property
    def context_length(self) -> int | None:
        """The most positions the model was trained for, from its config (None when it does not say)."""
        try:
            config = json.loads((self.root / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        length = config.get("max_position_embeddings") or config.get("n_positions")
        return length if isinstance(length, int) and length > 0 else None

    def check_variant(self, variant: str | None) -> str:
        """The block variant ``variant`` names (None: the export dtype), refused unless every block has it."""
        variant = variant or self.manifest.dtype
        if any(variant not in block.variants for block in self.manifest.blocks):
            common = sorted(set.intersection(*(set(block.variants) for block in self.manifest.blocks)))
            raise SeamError(f"this artifact has no {variant!r} blocks, only {', '.join(common)}; 'seam export MODEL "
                            "--out DIR --quantize-ue int8' also writes int8 ones")
        return variant

    def check_context(self, positions: int, what: str) -> None:
        """Refuses ``positions`` beyond the model's context, naming ``what`` asked for them."""
        if self.context_length is not None and positions > self.context_length:
            raise SeamError(f"{what} need {positions} positions, beyond the model's context of {self.context_length}; "
                            "ask for fewer")

    @property
    def split_points(self) -> list[int]:
        """Every layer index the model can be split at: 0 (all on the edge), each cut, and L (all on the UE)."""
        return [0, *self.manifest.cuts, self.num_layers]

    def check_split(self, split: int, allow_token_upload: bool) -> None:
        """Refuses a split that is no split point of this artifact, or split 0 (raw token ids cross) unless the
        UE allowed token upload."""
        if split not in self.split_points:
            raise SeamError(f"split {split} is not a split point; choose one of {self.split_points}")
        if split == 0 and not allow_token_upload:
            raise SeamError("split 0 sends raw token ids to the edge; the UE must allow token upload explicitly "
                            "(ue_client --allow-token-upload)")

    @property
    def default_split(self) -> int:
        """The middle split point: the UE and the edge each get about half of the cuts."""
        return self.split_points[len(self.split_points) // 2]

    def blocks_for(self, span: Span) -> list[Block]:
        """The blocks that make up ``span``; its ends must be split points."""
        for end in (span.start, span.end):
            self.check_split(end, allow_token_upload=True)
        return [block for block in self.manifest.blocks if span.covers(block.layers)]

    def path(self, onnx_file: OnnxFile) -> Path:
        return self.root / onnx_file.file

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"
