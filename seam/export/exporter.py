"""``seam export``: loads a model, cuts it into ONNX blocks, validates them, and writes the artifact atomically.

Everything is written into a hidden staging directory next to the output and renamed into place only after
validation passed, so a failed or interrupted export leaves nothing half-written. Re-running with the same
model and arguments is a no-op unless forced.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from seam.export import onnx_writer
from seam.export.segment import Head, Prelude, Segment
from seam.export.sources import LoadedModel, fingerprint, gguf_sha256, load_model, merge_adapter
from seam.export.validate import pad_token_id, references_for, require_fp32_parity, validate
from seam.runtime.artifact import MANIFEST_NAME, Artifact, Block, Dimensions, Manifest
from seam.runtime.errors import SeamError
from seam.runtime.files import replace_directory, staging_directory
from seam.runtime.shell import bar_disabled
from seam.runtime.spans import Span
from seam.runtime.version import VERSION

DTYPES = ("fp32", "fp16")
QUANTIZATIONS = ("int8",)
# Example shapes for tracing; every one of these axes is exported as dynamic.
_BATCH, _SEQUENCE, _PAST = 2, 3, 4


@dataclass
class ExportRequest:
    model: str
    out: Path
    cuts: str = "all"  # "all", "none", or a comma-separated list of layer indices
    dtype: str = "fp32"
    quantize_ue: str | None = None
    force: bool = False
    validate: bool = True
    quiet: bool = False
    adapter: Path | None = None  # a peft LoRA adapter to merge into the model before cutting it
    kv_layout: str | None = None  # "shared-buffer" or "concat"; None: the family's first (its best)


@dataclass
class ExportOutcome:
    manifest: Manifest
    up_to_date: bool


def parse_cuts(spec: str, num_layers: int) -> list[int]:
    """Cut points as layer indices in ``1..num_layers-1``, sorted and unique."""
    if spec == "all":
        return list(range(1, num_layers))
    if spec == "none":
        return []
    try:
        cuts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise SeamError(f"--cuts {spec!r} is not 'all', 'none' or a comma-separated list of layer indices") from None
    for cut in cuts:
        if not 1 <= cut < num_layers:
            raise SeamError(f"cut {cut} is out of range: cuts must lie in 1..{num_layers - 1} for a {num_layers}-layer model")
    if len(set(cuts)) != len(cuts):
        raise SeamError(f"--cuts {spec!r} lists a layer twice; give each cut once")
    if cuts != sorted(cuts):
        raise SeamError(f"--cuts {spec!r} is not in increasing order; write them sorted, e.g. {','.join(map(str, sorted(cuts)))}")
    return cuts


def _check_request(request: ExportRequest) -> None:
    if request.dtype not in DTYPES:
        raise SeamError(f"--dtype {request.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if request.quantize_ue not in (None, *QUANTIZATIONS):
        raise SeamError(f"--quantize-ue {request.quantize_ue!r} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    if request.force:
        _refuse_foreign(Path(request.out))


def _staging_dir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return staging_directory(out)
    except OSError as error:
        raise SeamError(f"cannot write the artifact to {out}: {error.strerror or error}; choose a writable --out") from None


def _existing_manifest(out: Path) -> dict | None:
    if not out.exists():
        return None
    if not out.is_dir():
        raise SeamError(f"--out {out} is a file, not a directory; choose another path")
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return {}
    return {} if any(out.iterdir()) else None


# What an export writes: its manifest, graphs and their external weights, and the model's config and tokenizer.
EXPORT_FILES = ("manifest.json", "*.onnx", "*.onnx.data", "config.json", "generation_config.json", "tokenizer*",
                "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*")


def _up_to_date(out: Path, model_fingerprint: str, export_args: dict) -> bool:
    """Whether ``out`` already holds this export; refuses a different one (``--force`` replaces it). The same
    export by a Seam from before the head had a graph of its own is written again."""
    existing = _existing_manifest(out)
    if existing is None:
        return False
    if existing.get("fingerprint") != model_fingerprint or existing.get("export_args") != export_args:
        raise SeamError(f"{out} already holds a different export or other files; pass --force to replace it")
    if existing.get("head"):
        return True
    _refuse_foreign(out)
    return False


def _refuse_foreign(out: Path) -> None:
    """Refuses to replace ``out`` unless it is empty or a Seam artifact and nothing else: ``--force`` replaces an
    export, never a user's files (profiles and adapters written into an artifact included)."""
    if not out.is_dir():
        return
    entries = sorted(out.iterdir())
    if entries and not (out / MANIFEST_NAME).is_file():
        raise SeamError(f"{out} is not a Seam artifact (no {MANIFEST_NAME}) and holds {entries[0].name}; --force "
                        "replaces only an artifact: choose an empty or new --out")
    foreign = next((entry for entry in entries
                    if entry.is_dir() or not any(fnmatch.fnmatch(entry.name, pattern) for pattern in EXPORT_FILES)), None)
    if foreign is not None:
        raise SeamError(f"{out} holds {foreign.name}{'/' if foreign.is_dir() else ''}, which no export wrote; "
                        "--force would delete it: move it out of the artifact, or export to another --out")


def kv_layout_for(request: ExportRequest, family) -> str:
    """The KV layout the request asks for, or the family's best; refused when the family cannot export it."""
    if request.kv_layout is None:
        return family.kv_layouts[0]
    if request.kv_layout not in family.kv_layouts:
        raise SeamError(f"--kv-layout {request.kv_layout} is not available for the {family.name} family; choose "
                        f"{' or '.join(family.kv_layouts)}")
    return request.kv_layout


def _export_args(request: ExportRequest, loaded: LoadedModel, cuts: list[int]) -> dict:
    """What the export was made with, as the manifest records it: an export with other arguments is another."""
    export_args = {"cuts": cuts, "dtype": request.dtype, "quantize_ue": request.quantize_ue,
                   "kv_layout": kv_layout_for(request, loaded.family)}
    if (digest := gguf_sha256(request.model)) is not None:  # the checkpoint file itself, beside its source path
        export_args["gguf_sha256"] = digest
    if request.adapter is not None:
        export_args["adapter"] = merge_adapter(loaded, Path(request.adapter))
    return export_args


def _blocks(cuts: list[int], num_layers: int) -> list[Span]:
    bounds = [0, *cuts, num_layers]
    return [Span(start, end) for start, end in zip(bounds, bounds[1:])]


def _write_graphs(loaded: LoadedModel, staging: Path, cuts: list[int], dtype, quantize: str | None, kv_layout: str,
                  bar) -> tuple:
    import torch

    family, config = loaded.family, loaded.model.config
    hidden_size = config.hidden_size
    prelude = Prelude(family, dtype, kv_layout)
    mask = torch.ones((_BATCH, _PAST + _SEQUENCE), dtype=torch.int64)
    mask[0, 0] = 0  # a left-padded row, so tracing sees a real mask
    positions = torch.arange(_PAST, _PAST + _SEQUENCE).repeat(_BATCH, 1)
    prelude_file = onnx_writer.export_module(
        prelude, (mask, positions), staging, "prelude.onnx", prelude.input_names, prelude.output_names
    )
    with torch.no_grad():
        shared = dict(zip(prelude.output_names, prelude(mask, positions)))
    shared["position_ids"] = positions
    shared["logits_to_keep"] = torch.tensor(1)
    generator = torch.Generator().manual_seed(0)
    shared["input_ids"] = torch.randint(0, config.vocab_size, (_BATCH, _SEQUENCE), generator=generator)
    shared["hidden_states"] = torch.randn((_BATCH, _SEQUENCE, hidden_size), generator=generator).to(dtype)
    # A shared buffer holds more positions than the sequences have so far.
    capacity = _PAST if kv_layout == "concat" else _PAST + _SEQUENCE + 1
    kv_shape = (_BATCH, family.num_kv_heads(), capacity, family.head_dim())
    blocks = []
    spans = _blocks(cuts, config.num_hidden_layers)
    for index, span in enumerate(spans):
        segment = Segment(family, span, is_first=index == 0, is_last=index == len(spans) - 1, kv_layout=kv_layout)
        example = tuple(
            shared[name] if name in shared else torch.randn(kv_shape, generator=generator).to(dtype)
            for name in segment.input_names
        )
        variants = {
            "fp16" if dtype == torch.float16 else "fp32": onnx_writer.export_module(
                segment, example, staging, f"block_{index:02d}.onnx", segment.input_names, segment.output_names
            )
        }
        bar.update(1)
        if quantize:
            variants[quantize] = onnx_writer.quantize_int8(
                staging, next(iter(variants.values())), f"block_{index:02d}.{quantize}.onnx"
            )
            bar.update(1)
        blocks.append(Block(index, span, tuple(segment.input_names), tuple(segment.output_names), variants))
    head = Head(family)
    kept = torch.randn((_BATCH, 1, hidden_size), generator=generator).to(dtype)
    head_file = onnx_writer.export_module(head, (kept,), staging, "head.onnx", head.input_names, head.output_names)
    return prelude_file, blocks, head_file


def _copy_model_files(loaded: LoadedModel, staging: Path) -> dict:
    loaded.tokenizer.save_pretrained(staging)
    loaded.model.config.save_pretrained(staging)
    if not (staging / "tokenizer.json").is_file():
        raise SeamError(f"{loaded.source} has no fast tokenizer (tokenizer.json); the runtime needs one")
    tokenizer = loaded.tokenizer
    return {
        "file": "tokenizer.json",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_token_id(tokenizer),
    }


def export(request: ExportRequest) -> ExportOutcome:
    import torch

    _check_request(request)
    out = Path(request.out)
    staging = _staging_dir(out)
    try:
        loaded = load_model(request.model)
        config = loaded.model.config
        num_layers = config.num_hidden_layers
        cuts = parse_cuts(request.cuts, num_layers)
        export_args = _export_args(request, loaded, cuts)
        model_fingerprint = fingerprint(loaded.model)
        if not request.force and _up_to_date(out, model_fingerprint, export_args):
            return ExportOutcome(Artifact.open(out, verify=False).manifest, up_to_date=True)
        references = references_for(loaded.model, loaded.tokenizer) if request.validate else []
        dtype = torch.float16 if request.dtype == "fp16" else torch.float32
        loaded.model.to(dtype)
        graphs = (len(cuts) + 1) * (2 if request.quantize_ue else 1)
        with tqdm(total=graphs, desc="export", unit="graph", disable=bar_disabled(request.quiet), leave=False) as bar:
            prelude_file, blocks, head_file = _write_graphs(loaded, staging, cuts, dtype, request.quantize_ue,
                                                            export_args["kv_layout"], bar)
        family = loaded.family
        manifest = Manifest(
            source=request.model,
            fingerprint=model_fingerprint,
            family=family.name,
            model_type=config.model_type,
            dims=Dimensions(
                num_layers=num_layers,
                hidden_size=config.hidden_size,
                num_attention_heads=config.num_attention_heads,
                num_kv_heads=family.num_kv_heads(),
                head_dim=family.head_dim(),
                vocab_size=config.vocab_size,
            ),
            dtype=request.dtype,
            kv_layout=export_args["kv_layout"],
            cuts=cuts,
            prelude=prelude_file,
            head=head_file,
            blocks=blocks,
            tokenizer=_copy_model_files(loaded, staging),
            export_args=export_args,
            seam_version=VERSION,
        )
        manifest.write(staging)
        if request.validate:
            artifact = Artifact.open(staging)
            pad_id = pad_token_id(loaded.tokenizer)
            manifest.validation = validate(artifact, references, pad_id, request.quiet)
            require_fp32_parity(manifest.validation, artifact, loaded.model, references, pad_id)
            manifest.write(staging)
        replace_directory(staging, out)
        return ExportOutcome(manifest, up_to_date=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def revalidate(directory: Path, model: str | None = None, quiet: bool = False) -> Manifest:
    """``seam validate``: re-checks an artifact against its source model and records the results."""
    artifact = Artifact.open(directory)
    manifest = artifact.manifest
    loaded = load_model(model or manifest.source)
    if fingerprint(loaded.model) != manifest.fingerprint:
        raise SeamError(
            f"the model {model or manifest.source!r} is not the one {directory} was exported from "
            "(fingerprints differ); pass the original with --model or re-export"
        )
    references = references_for(loaded.model, loaded.tokenizer)
    pad_id = pad_token_id(loaded.tokenizer)
    manifest.validation = validate(artifact, references, pad_id, quiet)
    manifest.write(artifact.root)
    require_fp32_parity(manifest.validation, artifact, loaded.model, references, pad_id)
    return manifest
